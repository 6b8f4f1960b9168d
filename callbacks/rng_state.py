"""Random-number-generator state in the checkpoint, per rank, so a resumed run draws the same noise.

Lightning 2.6 does not save RNG state in checkpoints (``seed_everything`` only seeds the start). Diffusion training
draws noise levels, noise, label dropout and dropout masks from the global generators every step, so without this a
resumed run diverges from the uninterrupted one at its first step. Saved (``checkpoint["rng_states"]``, one entry per
global rank, gathered to the rank that writes the file): torch CPU, the current CUDA device's generator, numpy and
Python ``random``. Restored right before the first training batch after the resume — the latest possible moment, so
nothing Lightning does while starting up (building loaders, sanity checks) shifts the streams.
If the world size changed, ranks beyond the saved ones keep their seeded state and a warning says so.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

KEY = "rng_states"


def capture() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_plain(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors and plain containers only, so the checkpoint still loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss = state["python"]
    plain = {
        "torch": state["torch"],
        "numpy": [
            str(kind),
            torch.as_tensor(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss],
    }
    if "cuda" in state:
        plain["cuda"] = state["cuda"]
    return plain


def _from_plain(plain: dict[str, Any]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    version, internal, gauss = plain["python"]
    state = {
        "torch": plain["torch"],
        "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
        "python": (version, tuple(int(v) for v in internal.tolist()), gauss),
    }
    if "cuda" in plain:
        state["cuda"] = plain["cuda"]
    return state


class RNGState(Callback):
    """Save every rank's RNG state in the checkpoint and restore it before the first batch after a resume."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        mine = _to_plain(capture())
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, mine)
            checkpoint[KEY] = gathered
        else:
            checkpoint[KEY] = [mine]

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(KEY)
        if not states:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds RNG states of {len(states)} ranks but this run has {trainer.world_size}: "
                "random streams will not continue exactly"
            )
        if trainer.global_rank < len(states):
            self._pending = _from_plain(states[trainer.global_rank])

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._pending is not None:
            restore(self._pending)
            self._pending = None
