"""Scale-out helpers: strategy presets (recipes/scale/ overlays), DeepSpeed on CPU for tests, launch files.

Modules are imported on demand (``lit_gen.scale.deepspeed_cpu`` pulls in DeepSpeed), so importing this package is
free of side effects.
"""
