"""lit_gen's DeepSpeed strategy: Lightning's ``DeepSpeedStrategy`` with a safe, checked resume.

Three additions (nothing else changes; the recipes/scale/deepspeed_stage*.yaml overlays use this class), two in
``load_checkpoint``:
1. DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``; here every load runs with
   ``weights_only=True`` and only three plain DeepSpeed record classes allow-listed (``lit_gen.scale.checkpoints``),
   so resuming from a tampered folder cannot run code.
2. ZeRO partitions optimizer state (and at stage 3 parameters) by rank: a folder written by N ranks cannot resume on
   M != N ranks. That is checked before DeepSpeed tries, with a one-line error naming the two ways forward.

and one in the training step:

3. Under ``precision: bf16-mixed`` (or ``16-mixed``) Lightning turns DeepSpeed's ``bf16`` mode on, which stores the
   engine's weights in bf16 (fp32 master copies in the optimizer), and casts only the *batch* to bf16. Every
   tensor a method makes inside its step (noise levels, noise, the noised input) is fp32, so the first convolution
   met fp32 input and bf16 weights ("Input type (float) and bias type (c10::BFloat16) should be the same", measured
   with benchmarks/gpu.py --tiny). The step runs under ``torch.autocast`` with the same dtype, as Lightning's DDP
   ``bf16-mixed`` does: matmuls and convolutions take bf16 operands, reductions and losses stay fp32.

One argument is added: ``param_persistence_threshold`` (DeepSpeed's ``stage3_param_persistence_threshold``, which
Lightning does not expose; default DeepSpeed's 1e5): ZeRO-3 keeps parameters with at most this many elements whole on
every rank. recipes/scale/deepspeed_cpu_stage3.yaml sets 0 so the toy networks' small layers are partitioned too.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from lit_gen.errors import LitGenError, first_line, load_torch_file


def written_world_size(path: str | Path) -> int | None:
    """The data-parallel world size a DeepSpeed checkpoint folder was written with (None if unknown)."""
    from lit_gen.scale.checkpoints import _model_states, _tag_dir, _weights_only_loads

    path = Path(path)
    if not path.is_dir():
        return None
    states = _model_states(_tag_dir(path))
    with _weights_only_loads():
        client = load_torch_file(states, f"DeepSpeed checkpoint {path}", mmap=True)
    if not isinstance(client, dict):
        raise LitGenError(f"{states} is not a DeepSpeed model-states file")
    size = client.get("dp_world_size")
    return int(size) if size is not None else None


class DeepSpeed(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` (same arguments) whose resume loads with ``weights_only=True`` and checks world size."""

    strategy_name = "lit_gen_deepspeed"

    def _autocast(self) -> Any:
        """Autocast in the engine's half dtype under a mixed precision (addition 3 of the module docstring)."""
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(self.precision_plugin.precision))
        return torch.autocast(self.root_device.type, dtype=dtype) if dtype is not None else nullcontext()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._autocast():
            return super().training_step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._autocast():
            return super().validation_step(*args, **kwargs)

    def __init__(self, *args: Any, param_persistence_threshold: int | None = None, **kwargs: Any) -> None:
        """Lightning's ``DeepSpeedStrategy`` arguments, plus ``param_persistence_threshold``: ZeRO-3 keeps
        parameters of at most this many elements whole on every rank (None = DeepSpeed's default, 1e5)."""
        super().__init__(*args, **kwargs)
        if param_persistence_threshold is not None:
            if param_persistence_threshold < 0:
                raise LitGenError(f"param_persistence_threshold must be >= 0, got {param_persistence_threshold}")
            zero = self.config.setdefault("zero_optimization", {})
            zero["stage3_param_persistence_threshold"] = int(param_persistence_threshold)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from lit_gen.scale.checkpoints import _weights_only_loads

        written = written_world_size(checkpoint_path)
        if written is not None and written != self.world_size:
            raise LitGenError(
                f"{checkpoint_path} was written by {written} DeepSpeed ranks but this run has {self.world_size}: ZeRO "
                "partitions cannot be re-split on resume. Resume with the same number of devices x nodes, or start a "
                "new run from its weights (lit-gen export --weights raw, then model.teacher / init from the file), "
                "or convert it with DeepSpeed's ds_to_universal.py and load_universal_checkpoint"
            )
        try:
            with _weights_only_loads():
                return super().load_checkpoint(checkpoint_path, weights_only)
        except LitGenError:
            raise
        except Exception as err:  # noqa: BLE001 - damaged files fail in arbitrary ways (see errors.load_torch_file)
            raise LitGenError(
                f"cannot resume from DeepSpeed checkpoint {checkpoint_path}: {type(err).__name__}: {first_line(err)}"
            ) from None
