"""lit_gen's DeepSpeed strategy: Lightning's ``DeepSpeedStrategy`` with a safe, checked resume.

Two additions, both in ``load_checkpoint`` (nothing else changes; the recipes/scale/deepspeed_stage*.yaml overlays use
this class):
1. DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``; here every load runs with
   ``weights_only=True`` and only three plain DeepSpeed record classes allow-listed (``lit_gen.scale.checkpoints``),
   so resuming from a tampered folder cannot run code.
2. ZeRO partitions optimizer state (and at stage 3 parameters) by rank: a folder written by N ranks cannot resume on
   M != N ranks. That is checked before DeepSpeed tries, with a one-line error naming the two ways forward.

One argument is added: ``param_persistence_threshold`` (DeepSpeed's ``stage3_param_persistence_threshold``, which
Lightning does not expose; default DeepSpeed's 1e5): ZeRO-3 keeps parameters with at most this many elements whole on
every rank. recipes/scale/deepspeed_cpu_stage3.yaml sets 0 so the toy networks' small layers are partitioned too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
