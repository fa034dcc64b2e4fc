"""Behaviour every stage shares, as plain functions: optimizer wiring, gradient-norm logging, checkpoint extras."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from neuraflux.model import NanoLM
from neuraflux.model.io import check_same_shape, freeze, load_pretrained
from neuraflux.model.reward import check_same_tokenizer
from neuraflux.optim import OptimizerFactory


def configure_optimizers(module: pl.LightningModule, optim: OptimizerFactory, named_parameters) -> dict:
    """Optimizer and per-step scheduler over the given (trainable) parameters only."""
    trainer = attached_trainer(module)
    total = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else 1000
    precision = str(trainer.precision) if trainer is not None else ""
    optimizer, scheduler = optim(
        named_parameters, total_steps=total, mixed_precision=precision if precision.endswith("-mixed") else None
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The module's trainer, or None when it runs outside one (a test calling a step directly)."""
    try:
        return module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None


def is_logging_step(module: pl.LightningModule) -> bool:
    """True on the steps Lightning writes to the logger: the optimizer step about to be taken is a multiple of
    trainer.log_every_n_steps (or the run is stopping), Lightning's own rule.

    `self.log` costs ~1-3 ms a call on CPU, a few percent of a small model's step, so per-step metrics
    are only computed and logged on the steps that are written.
    """
    trainer = attached_trainer(module)
    if trainer is None:
        return True
    return (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop


def step_denominator(module: pl.LightningModule, batch, name: str) -> torch.Tensor | None:
    """What a training micro-batch's summed loss is divided by so that accumulation is exact, or None (a plain
    mean over the batch's own count) for a batch without a window (validation, hand-built batches).

    Lightning divides each micro-batch's loss by trainer.accumulate_grad_batches and DDP averages gradients over
    ranks; dividing the sum by total / (micro-batches x ranks), the total being the step's count over every
    micro-batch and rank, makes the step's gradient that of one big batch's mean however the micro-batches'
    counts differ (as TRL and torchtune normalise by the step's token count). One all-reduce of a scalar per
    micro-batch under DDP.
    """
    window = getattr(batch, "window", None)
    if window is None:
        return None
    total = torch.tensor(float(window.totals[name]), device=module.device)
    trainer = attached_trainer(module)
    ranks = trainer.world_size if trainer is not None else 1
    if ranks > 1:
        total = module.trainer.strategy.reduce(total, reduce_op="sum")
    return total.clamp(min=1.0) / (window.micro_batches * ranks)


def reload_reference(reference_from: str | None, policy: NanoLM, tokenizer, stage: str) -> NanoLM:
    """The frozen reference of a preference stage resuming from a checkpoint: the model the run started from,
    loaded again from `reference_from` (stage.init_from), since the policy restored from the checkpoint has moved.
    ValueError when there is no source, or its tokenizer or shapes are not the policy's."""
    if reference_from is None:
        raise ValueError(
            f"resuming {stage} needs stage.module.reference_from (the model the run started from, normally "
            "stage.init_from): the policy restored from the checkpoint has moved and is no reference"
        )
    where = f"stage.module.reference_from={reference_from}"
    reference, ref_tokenizer = load_pretrained(Path(reference_from))
    check_same_tokenizer(ref_tokenizer, tokenizer, where)
    check_same_shape(policy.config, reference.config, where, "the reference", "the policy has")
    return freeze(reference)


def check_finite(step: int, name: str, value: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None) -> None:
    """Stop on a NaN/inf `value` (a loss, a batch of rewards), naming the step and, for a loss, the first
    non-finite input it came from (Lightning keeps the last good checkpoint). Only `value` is tested on the happy
    path: one device sync per call."""
    if bool(torch.isfinite(value).all()):
        return
    culprit = next((n for n, t in (inputs or {}).items() if not bool(torch.isfinite(t).all())), None)
    source = f" (first non-finite input: {culprit})" if culprit else ""
    shown = str(value.item()) if value.numel() == 1 else f"not finite ({value.detach().flatten()[:4].tolist()})"
    raise FloatingPointError(f"{name} is {shown} at step {step}{source}; stopping (last good checkpoint kept)")


def log_lr(module: pl.LightningModule) -> None:
    opt = module.optimizers()
    opt = opt.optimizer if hasattr(opt, "optimizer") else opt
    module.log("train/lr", opt.param_groups[0]["lr"], on_step=True, on_epoch=False, prog_bar=True)
