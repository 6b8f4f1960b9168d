"""Read a DeepSpeed checkpoint folder (any ZeRO stage) as one lit_gen checkpoint dict, without running pickled code.

Lightning's DeepSpeed strategy saves ``last.ckpt/`` as a folder: ``latest`` (the tag), ``<tag>/mp_rank_00_model_states
.pt`` (the module's state dict as the engine holds it — bf16 under bf16 training, empty placeholders under ZeRO-3 —
plus Lightning's client state: ``lit_gen`` description, ``callbacks``, ``ema_state_dict``, ...) and one
``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank holding that rank's partition of the fp32 master weights.

The raw weights are consolidated from the fp32 partitions by DeepSpeed's own ``zero_to_fp32`` (the same code as the
``zero_to_fp32.py`` script DeepSpeed drops in the folder), so they equal the consolidated fp32 weights for every
stage and world size. DeepSpeed reads those files with ``weights_only=False``; here every ``torch.load`` during the
conversion is forced to ``weights_only=True`` with exactly three DeepSpeed classes allow-listed (plain records: the
loss-scaler settings, the ZeRO stage enum and a fragment address), so a tampered file cannot run code.

ZeRO-3 (issue 20): the trainable parameters come from the fp32 partitions, the frozen ones (a partitioned teacher,
EMA / target / self-teacher copies) from the per-rank frozen fragments DeepSpeed saves in each
``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` — ``zero_to_fp32`` merges both. Networks a distillation kept outside
the partitioning (``teacher_zero3: replicate``) are in rank 0's client state under ``replicated_state_dict`` and are
merged into ``state_dict`` here, so a stage-3 folder reads like any other checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lit_gen.errors import LitGenError, first_line, load_torch_file

MODEL_STATES = "mp_rank_00_model_states.pt"
REPLICATED_KEY = "replicated_state_dict"  # lit_gen.methods.distill: networks kept whole outside ZeRO-3


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def _model_states(tag_dir: Path) -> Path | None:
    """Rank 0's module file, which carries the client state: ``mp_rank_00_model_states.pt`` (ZeRO 1/2) or
    ``zero_pp_rank_0_mp_rank_00_model_states.pt`` (ZeRO-3)."""
    for name in (MODEL_STATES, f"zero_pp_rank_0_{MODEL_STATES}"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    return None


def _tag_dir(path: Path) -> Path:
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else None
    candidates = [path / tag] if tag else sorted(p.parent for p in path.glob("*/*model_states.pt"))
    for candidate in candidates:
        if _model_states(candidate) is not None:
            return candidate
    raise LitGenError(f"{path} is not a complete DeepSpeed checkpoint (no model states); was its save interrupted?")


def _allowed_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's own calls included) goes through ``errors.load_torch_file``:
    ``weights_only=True``, and a damaged or hostile file is one LitGenError line naming it."""
    original = torch.load

    @functools.wraps(original)
    def safe_load(f: Any, map_location: Any = None, *_pickle_module: Any, **kwargs: Any) -> Any:
        if map_location is not None:
            kwargs["map_location"] = map_location
        return load_torch_file(f, f"DeepSpeed checkpoint file {f}", **kwargs)

    torch.load = safe_load  # type: ignore[assignment]
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        torch.load = original  # type: ignore[assignment]


def read_deepspeed_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict (``lit_gen``, ``state_dict`` = consolidated fp32 raw weights, ``ema_state_dict``, ...)."""
    path = Path(path)
    tag_dir = _tag_dir(path)
    try:
        with _weights_only_loads():
            client = torch.load(_model_states(tag_dir), map_location="cpu")  # load_torch_file, see above
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its progress
                fp32 = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag_dir.name)
    except LitGenError:
        raise
    except Exception as err:  # noqa: BLE001 - damaged files fail in arbitrary ways (see errors.load_torch_file)
        raise LitGenError(f"cannot read DeepSpeed checkpoint {path}: {type(err).__name__}: {first_line(err)}") from None
    if "lit_gen" not in client:
        raise LitGenError(f"{path} was not written by lit_gen (no 'lit_gen' section in its client state)")
    module = client.pop("module", None) or {}
    # Buffers (integer ones too) come from the engine's module state; parameters from the fp32 consolidation.
    state = {k: v for k, v in module.items() if k not in fp32}
    state.update({k: v.float() if v.is_floating_point() else v for k, v in fp32.items()})
    replicated = client.pop(REPLICATED_KEY, None) or {}
    state.update({k: v.float() if v.is_floating_point() else v for k, v in replicated.items()})
    skip = ("optimizer", "param_shapes", "frozen_param_shapes", "frozen_param_fragments")
    checkpoint = {k: v for k, v in client.items() if k not in skip}
    checkpoint["state_dict"] = state
    return checkpoint
