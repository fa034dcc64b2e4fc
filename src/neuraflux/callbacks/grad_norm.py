"""train/grad_norm for every stage that Lightning optimizes, written once."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy

from neuraflux.stages.common import is_logging_step


class GradNormLogger(pl.Callback):
    """Logs `train/grad_norm`, the global L2 norm of the gradients about to be applied (accumulated, all-reduced,
    unscaled, before Lightning clips them to trainer.gradient_clip_val; under FSDP, of every rank's shards), on the
    steps Lightning writes. `train()` adds it to every run. A manually optimized stage (PPO) steps several times a
    batch and logs its own updates' norms."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not pl_module.automatic_optimization or not is_logging_step(pl_module):
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            if isinstance(trainer.strategy, FSDPStrategy):  # each rank holds a shard of every gradient
                norm = trainer.strategy.reduce(norms.square().sum(), reduce_op="sum").sqrt()
            else:
                norm = torch.linalg.vector_norm(norms)
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
