"""DeepSpeed ZeRO stage 3 for modules that own copies of their networks (EMAs, targets, self-teachers, teachers).

Under ZeRO-3 (Rajbhandari et al. 2020, "ZeRO", Sec. 5.3) every parameter of the engine's module is partitioned after
``deepspeed.initialize``: ``p.data`` is an empty placeholder and rank r keeps its slice in ``p.ds_tensor``. DeepSpeed's
module hooks gather a submodule's parameters for its forward and free them after, so *calling* a frozen teacher or a
target network works unchanged; what breaks is code that reads or writes parameters outside a forward (an EMA update,
``load_state_dict`` from another network, ``functional_call`` with detached weights): it would silently read nothing.

The helpers here make those places correct and are no-ops without ZeRO-3 (plain tensors), so a method calls them
unconditionally:

- ``gathered_copy(dst, src)``: inside the block both networks hold their full weights on every rank (DeepSpeed's
  ``zero.GatheredParameters``; ``src`` read-only, ``dst`` with ``modifier_rank=0``, so what rank 0 computed is
  broadcast and re-partitioned on exit). Every rank computes the same update from the same full values, so the
  broadcast changes nothing; it is what makes the new values land in the partitions. Cost: for the length of one
  update both networks are whole on every rank (transient; the same as DeepSpeed-Chat's EMA update) and one
  all-gather of each plus one broadcast of ``dst``.
- ``skip_param_groups(optimizer, names)``: the ZeRO-3 optimizer steps its flat fp32 partitions sub-group by
  sub-group and sets each torch ``param_groups[i]["params"]`` itself, so emptying a group's list (how f-distill skips
  its generator on critic steps under DDP and ZeRO-1/2) has no effect there; this skips the named groups' sub-groups
  for one step instead (their weights and Adam state stay untouched).
- ``partitioned(module)``: whether ZeRO-3 has partitioned a module's parameters.

References: DeepSpeed docs, "ZeRO-3 Offload / Gathering Parameters" (``deepspeed.zero.GatheredParameters``), and
``deepspeed/runtime/zero/stage3.py`` (``DeepSpeedZeroOptimizer_Stage3.step`` / ``_optimizer_step``), DeepSpeed 0.19.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn


def is_partitioned(tensor: Tensor) -> bool:
    """A ZeRO-3 parameter (DeepSpeed tags them with ``ds_id``)."""
    return hasattr(tensor, "ds_id")


def partitioned(module: nn.Module | None) -> bool:
    """Whether ZeRO-3 has partitioned ``module``'s parameters."""
    return module is not None and any(is_partitioned(p) for p in module.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """The full values of the ZeRO-3 parameters among ``params`` inside the block (a no-op for plain tensors).
    ``modifier_rank``: None = read-only; r = rank r's values are broadcast and re-partitioned on exit."""
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def gathered_copy(dst: nn.Module, src: nn.Module) -> Iterator[None]:
    """Both networks whole inside the block: ``src`` read-only, ``dst`` written (rank 0's result re-partitioned)."""
    with gathered(src.parameters()), gathered(dst.parameters(), modifier_rank=0):
        yield


@contextlib.contextmanager
def skip_param_groups(optimizer: Any, names: Iterable[str]) -> Iterator[None]:
    """Leave the parameter groups called ``names`` out of the next ZeRO-3 optimizer step (a no-op otherwise).

    ``optimizer`` is what Lightning hands to ``optimizer_step`` (a ``LightningOptimizer`` around DeepSpeed's
    ``DeepSpeedZeroOptimizer_Stage3``). Its ``step`` calls ``_optimizer_step(sub_group_id)`` once per sub-group
    (``sub_group_to_group_id`` maps it to the torch param group); the wrapper below skips the named groups' calls,
    so their fp32 partitions, optimizer state (Adam moments, step count) and — copied back from the unchanged fp32
    partition — their compute weights stay exactly as they were.
    """
    zero = getattr(optimizer, "_optimizer", optimizer)
    if not hasattr(zero, "sub_group_to_group_id") or not hasattr(zero, "_optimizer_step"):
        yield
        return
    names = set(names)
    skip = {i for i, group in enumerate(zero.optimizer.param_groups) if group.get("name") in names}
    step_sub_group = zero._optimizer_step
    own = vars(zero).get("_optimizer_step")

    def step_active(sub_group_id: int) -> None:
        if zero.sub_group_to_group_id[sub_group_id] not in skip:
            step_sub_group(sub_group_id)

    zero._optimizer_step = step_active
    try:
        yield
    finally:
        if own is None:
            del zero._optimizer_step  # the class's method again
        else:
            zero._optimizer_step = own
