"""Causal language modelling: `stage=pretrain` (every token) and `stage=sft` (response tokens only)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from neuraflux.alignment.losses import response_logprobs
from neuraflux.data.common import LMBatch
from neuraflux.model import NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.common import (
    configure_optimizers,
    is_logging_step,
    log_lr,
    step_denominator,
)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions where loss_mask is True. logits (B, T, V), targets (B, T)."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    mask = loss_mask.flatten()
    if bool(mask.all()):
        return losses.mean()
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def masked_lm_loss(
    model: NanoLM,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """`lm_loss(model(input_ids, attention_mask), targets, loss_mask)`, with the LM head applied only where
    loss_mask is True (`response_logprobs`): SFT's loss covers the response tokens only (~15-20 % of a chat
    example), and the (tokens x vocab) projection and softmax elsewhere would be thrown away.

    The summed NLL is divided by `denominator` when given (`stages.common.step_denominator`: exact gradient
    accumulation), else by the batch's own count of loss tokens."""
    if bool(loss_mask.all()):
        logits = model(input_ids, attention_mask)
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    else:
        total = -response_logprobs(model, input_ids, targets, loss_mask, attention_mask=attention_mask).sum()
    return total / (loss_mask.sum().clamp(min=1) if denominator is None else denominator)


class CausalLMStage(pl.LightningModule):
    """Next-token training of the shared backbone; the batch's loss mask decides which tokens count."""

    def __init__(self, model: NanoLM, tokenizer, optim: OptimizerFactory, name: str = "pretrain"):
        super().__init__()
        self.model, self.tokenizer, self.optim, self.name = model, tokenizer, optim, name

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def _loss(self, batch: LMBatch) -> torch.Tensor:
        return masked_lm_loss(
            self.model,
            batch.input_ids,
            batch.targets,
            batch.loss_mask,
            batch.attention_mask,
            denominator=step_denominator(self, batch, "tokens"),
        )

    def training_step(self, batch: LMBatch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"train/loss is {loss.item()} at step {self.global_step}; stopping (last good checkpoint kept)"
            )
        if is_logging_step(self):
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
            log_lr(self)
        return loss

    def validation_step(self, batch: LMBatch, batch_idx: int) -> None:
        n = int(batch.loss_mask.sum())
        self.log("val/loss", self._loss(batch), on_epoch=True, batch_size=n, sync_dist=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        val = self.trainer.callback_metrics.get("val/loss")
        if val is not None:
            self.log("val/ppl", math.exp(min(float(val), 50.0)), sync_dist=False)

    def configure_optimizers(self):
        return configure_optimizers(self, self.optim, self.model.named_parameters())
