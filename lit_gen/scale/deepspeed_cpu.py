"""Lightning's DeepSpeed strategy on CPU processes (gloo), so DeepSpeed paths can be tested without GPUs.

DeepSpeed itself runs ZeRO-1/2 on CPU when its accelerator is the CPU one (``DS_ACCELERATOR=cpu`` in the
environment *before* DeepSpeed is imported). Lightning's ``DeepSpeedStrategy`` (2.6) refuses it in three places,
which this subclass bypasses and nothing else (DESIGN.md "Scale"):

1. ``setup_environment`` raises unless the accelerator is CUDA -> skip that check, keep the DDP-level setup;
2. ``setup_distributed`` checks that the devices' CUDA indices equal the local ranks (CPU devices have no index)
   -> same steps without that check;
3. ``deepspeed.initialize`` gets ``device_rank=root_device.index``, which is None on CPU and fails DeepSpeed's
   ``device_rank >= 0`` -> pass the local rank (the CPU accelerator ignores it).

ZeRO-3 needs nothing more (measured with DeepSpeed 0.19.8: fit, save, resume and ``zero_to_fp32`` consolidation on
2 CPU processes; recipes/scale/deepspeed_cpu_stage3.yaml).

Only training is covered (``trainer.fit``); validation/prediction under this strategy still take Lightning's
inference path, which needs (3) too. Use::

    DS_ACCELERATOR=cpu lit-gen fit -c RECIPE --trainer.accelerator cpu --trainer.devices 2 \\
        --trainer.strategy lit_gen.scale.deepspeed_cpu.DeepSpeedCPUStrategy --trainer.strategy.stage 2
"""

from __future__ import annotations

import argparse
from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy
from torch.nn import Module
from torch.optim import Optimizer

from lit_gen.scale.strategies import DeepSpeed


class DeepSpeedCPUStrategy(DeepSpeed):
    """lit_gen's ``DeepSpeed`` strategy (safe, checked resume) with Lightning's three CUDA-only checks bypassed (set
    ``DS_ACCELERATOR=cpu``). For tests and for checking a DeepSpeed configuration without GPUs."""

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        # (1) DeepSpeedStrategy.setup_environment = CUDA check + DDPStrategy.setup_environment.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # (2) DeepSpeedStrategy.setup_distributed without _validate_device_index_selection.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(
        self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[Any, Optimizer]:
        # (3) DeepSpeedStrategy._setup_model_and_optimizer with an integer device_rank.
        import deepspeed

        deepspeed_engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return deepspeed_engine, deepspeed_optimizer
