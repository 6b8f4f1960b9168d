"""Evaluating a network again with the same randomness, or with none: what the methods that run one network several
times in a step share (consistency, sCM, MeanFlow and f-distill).

``rng_state`` / ``set_rng_state`` save and restore the CPU (and the device's CUDA) generator around an evaluation,
so each evaluation — a target pass, a JVP's finite differences, the online pass after them — draws the same
dropout masks. ``eval_mode`` runs a network without dropout inside a block and restores its mode after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU generator's state and, on a CUDA ``device``, that device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    """Restore what ``rng_state(device)`` saved."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` deterministically (eval mode: no dropout) inside the block, then restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
