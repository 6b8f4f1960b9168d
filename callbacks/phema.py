"""Post-hoc EMA tracking (Karras et al. 2024, EDM2 Sec. 3): power-function EMAs of the trained network for a few
widths σ_rel (EDM2: 0.05 and 0.10), saved together every K optimizer steps to ``<default_root_dir>/phema/``.

``lit-gen phema RUN_DIR --sigma-rel ... --out DIR`` then reconstructs the EMA of any width from those snapshots
(``lit_gen.phema``). The maths is in ``lit_gen.phema``; this callback only updates and saves.

Update after optimizer step t (t = ``trainer.global_step`` ≥ 1): θ̂ ← β_t θ̂ + (1 − β_t) θ with β_t = (1 − 1/t)^(γ+1)
(EDM2 App. C.1), in float32 whatever the training precision; t = 1 copies. Non-floating buffers are copied. The
averages are callback state, saved in every checkpoint (``state_dict``), so ``--ckpt_path last`` continues them
exactly and the snapshots written after a resume are bit-identical to an uninterrupted run's. A snapshot whose step
is already on disk is rewritten with the same bytes (a run killed after its snapshot but before its checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_gen.errors import LitGenError
from lit_gen.phema import SNAPSHOT_DIR, gamma_from_sigma_rel, power_beta, write_snapshot


@torch.no_grad()
def update_profiles(profiles: dict[str, dict[str, torch.Tensor]], current: dict[str, torch.Tensor], step: int) -> None:
    """One power-function EMA update of every profile (keys: σ_rel as a string) at optimizer step ``step``."""
    for key, average in profiles.items():
        beta = power_beta(step, gamma_from_sigma_rel(float(key)))
        floats = [n for n, v in average.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_(
                [average[n] for n in floats],
                [current[n].detach().to(average[n].device, torch.float32) for n in floats],
                1.0 - beta,
            )
        for name, value in average.items():
            if not value.is_floating_point():
                value.copy_(current[name])


class PostHocEMA(Callback):
    """Power-function EMA profiles of ``pl_module.<target>`` with snapshots for post-hoc reconstruction (EDM2).

    Args:
        sigma_rels: relative widths tracked (EDM2: 0.05 and 0.10; each in (0, 0.289)).
        snapshot_every_n_steps: write a snapshot of all profiles every K optimizer steps (EDM2: every 8 Mimg).
        folder: where the snapshots go; None = ``<trainer.default_root_dir>/phema``.
        target: the LightningModule attribute holding the trained network.
    """

    def __init__(
        self,
        sigma_rels: list[float] | tuple[float, ...] = (0.05, 0.10),
        snapshot_every_n_steps: int = 100,
        folder: str | None = None,
        target: str = "net",
    ) -> None:
        if not sigma_rels:
            raise LitGenError("PostHocEMA needs at least one sigma_rel")
        for s in sigma_rels:
            gamma_from_sigma_rel(float(s))  # one line for a width out of range
        if snapshot_every_n_steps < 1:
            raise LitGenError(f"snapshot_every_n_steps must be at least 1, got {snapshot_every_n_steps}")
        self.sigma_rels = sorted(float(s) for s in sigma_rels)
        self.snapshot_every_n_steps = int(snapshot_every_n_steps)
        self.folder = folder
        self.target = target
        self.profiles: dict[str, dict[str, torch.Tensor]] | None = None
        self.last_step = 0

    def _current(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        return dict(getattr(pl_module, self.target).state_dict())

    def snapshot_dir(self, trainer: Trainer) -> Path:
        return Path(self.folder) if self.folder else Path(trainer.default_root_dir) / SNAPSHOT_DIR

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        step = int(trainer.global_step)
        if step == self.last_step or step < 1:
            return  # no optimizer step in this batch (gradient accumulation)
        current = self._current(pl_module)
        if self.profiles is None:
            self.profiles = {
                repr(s): {n: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                          for n, v in current.items()}
                for s in self.sigma_rels
            }  # fmt: skip
        update_profiles(self.profiles, current, step)
        self.last_step = step
        if step % self.snapshot_every_n_steps == 0 and trainer.is_global_zero:
            profiles = {float(k): v for k, v in self.profiles.items()}
            write_snapshot(self.snapshot_dir(trainer), step, profiles, {"target": self.target})

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.profiles is None:
            return {"last_step": self.last_step}
        profiles = {k: {n: v.detach().cpu().clone() for n, v in p.items()} for k, p in self.profiles.items()}
        return {"last_step": self.last_step, "profiles": profiles, "sigma_rels": list(self.sigma_rels)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", 0))
        profiles = state_dict.get("profiles")
        if profiles is None:
            return
        if [float(k) for k in sorted(profiles, key=float)] != self.sigma_rels:
            raise LitGenError(
                f"the checkpoint tracked post-hoc EMA widths {sorted(map(float, profiles))}, the recipe asks for "
                f"{self.sigma_rels}; resume with the same sigma_rels"
            )
        self.profiles = {k: {n: v.clone() for n, v in p.items()} for k, p in profiles.items()}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.profiles is not None:  # restored on CPU: follow the network's device
            device = next(iter(self._current(pl_module).values())).device
            self.profiles = {k: {n: v.to(device) for n, v in p.items()} for k, p in self.profiles.items()}
