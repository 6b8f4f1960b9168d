"""Data: shard writing (``shards``), the WebDataset DataModule (``datamodule``), ``dataset.json`` and the normalisation
convention (``info``), built-in datasets (``builtin``: toy 2-D mixtures, scikit-learn digits).

Import the submodules directly; this package imports nothing, so ``lit_gen.data.builtin`` stays cheap to import.
"""
