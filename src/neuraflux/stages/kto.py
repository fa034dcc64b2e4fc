"""`stage=kto`: Kahneman-Tversky optimisation of the policy on unpaired desirable / undesirable examples, against
a frozen copy of itself.

The reference is the policy as it was given (the model of `stage.init_from`), deep-copied in the constructor and
reloaded from `reference_from` on resume, as in `stage=dpo`. Its log-probs come from a forward per batch: the
mismatched pairs KTO's reference point is estimated on change with every batch, so there is no table to precompute.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from neuraflux.alignment.kto import KTOOutput, kto_loss, kto_reference_point
from neuraflux.alignment.losses import response_logprobs
from neuraflux.data.unpaired_batches import UnpairedBatch
from neuraflux.model import NanoLM
from neuraflux.model.io import FrozenModels, freeze
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.common import (
    attached_trainer,
    check_finite,
    configure_optimizers,
    is_logging_step,
    log_lr,
    reload_reference,
    step_denominator,
)


@dataclass
class KTOStep:
    out: KTOOutput
    loss: torch.Tensor  # scalar: the mean weighted KTO loss over the batch's examples
    policy: torch.Tensor  # (B,) the examples' sequence log-probs, with gradient
    reference: torch.Tensor  # (B,)
    desirable: torch.Tensor  # (B,) bool


class NanoKTO(pl.LightningModule):
    """KTO (Ethayarajh et al. 2024) on `self.model`, from `UnpairedBatch`es (`data=kto_world` or `data=kto`).

    `reference_from` names where the initial policy came from (stage.init_from). It is read only on resume: the
    policy train() restores from a checkpoint has already moved, so the reference is loaded from there instead.
    """

    def __init__(
        self,
        model: NanoLM,
        tokenizer,
        optim: OptimizerFactory,
        name: str = "kto",
        beta: float = 0.1,
        # lambda_D and lambda_U: the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3] (eq. 8 as TRL cites it);
        # the world's pairs unpair into as many desirable as undesirable examples, so 1 and 1
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference_from: str | None = None,
    ):
        super().__init__()
        # A dry call validates the settings where the rules live, before any work starts.
        zero = torch.zeros(1)
        try:
            kto_loss(zero, zero, zero.bool(), zero[0], beta, desirable_weight, undesirable_weight)
        except ValueError as err:
            raise ValueError(f"stage.module: {err}") from None
        self.model, self.tokenizer, self.optim, self.name = model, tokenizer, optim, name
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.reference_from = reference_from
        self.frozen = FrozenModels(freeze(copy.deepcopy(model)))

    @property
    def reference(self) -> NanoLM:
        return self.frozen.reference

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def on_fit_start(self) -> None:
        self.frozen.to(self.device)  # not registered, so Lightning does not move it

    # ---- steps ------------------------------------------------------------------------------------------
    def kto_step(self, batch: UnpairedBatch) -> KTOStep:
        """Policy and reference log-probs of a batch, the reference point and the KTO loss."""
        # Right padded, so no padding mask (as stage=dpo): under the causal mask a real token never sees the pads.
        policy = response_logprobs(self.model, *batch.rows(mismatched=False))  # (B,), with gradient
        with torch.no_grad():
            # z0 is detached, so the policy's mismatched forward needs no graph (TRL runs it under no_grad too)
            policy_kl = response_logprobs(self.model, *batch.rows(mismatched=True))
            reference = response_logprobs(self.reference, batch.input_ids, batch.targets, batch.response_mask)
        ref_matched, ref_kl = reference[: batch.num_examples], reference[batch.num_examples :]
        trainer = attached_trainer(self)
        if trainer is not None and trainer.world_size > 1:
            # z0 over every rank's mismatched pairs, as TRL gathers it before the mean
            policy_kl, ref_kl = self.all_gather(policy_kl).flatten(), self.all_gather(ref_kl).flatten()
        z0 = kto_reference_point(policy_kl, ref_kl)
        out = kto_loss(
            policy, ref_matched, batch.desirable, z0, self.beta, self.desirable_weight, self.undesirable_weight
        )
        # the mean over the batch's examples, or over the optimizer step's micro-batches when accumulating
        examples = step_denominator(self, batch, "examples")
        loss = out.losses.sum() / (batch.num_examples if examples is None else examples)
        return KTOStep(out, loss, policy, ref_matched, batch.desirable)

    def training_step(self, batch: UnpairedBatch, batch_idx: int) -> torch.Tensor:
        step = self.kto_step(batch)
        check_finite(
            self.global_step,
            "train/loss",
            step.loss,
            {"logps/policy": step.policy, "logps/reference": step.reference, "train/kl_ref": step.out.reference_point},
        )
        if is_logging_step(self):
            self.log("train/loss", step.loss, on_step=True, on_epoch=False, prog_bar=True)
            self.log_dict(kto_metrics(step, "train"), on_step=True, on_epoch=False)
            log_lr(self)
        return step.loss

    def validation_step(self, batch: UnpairedBatch, batch_idx: int) -> None:
        step = self.kto_step(batch)
        metrics = kto_metrics(step, "val")
        values = {"val/loss": step.loss, "val/kl_ref": metrics["val/kl_ref"]}
        if "rewards/margins" in metrics:
            values["val/margins"] = metrics["rewards/margins"]
        self.log_dict(values, on_epoch=True, batch_size=batch.num_examples, sync_dist=True)

    def configure_optimizers(self):
        return configure_optimizers(self, self.optim, self.model.named_parameters())

    # ---- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["neuraflux"]["reference_from"] = self.reference_from

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.frozen = FrozenModels(reload_reference(self.reference_from, self.model, self.tokenizer, "KTO"))


def kto_metrics(step: KTOStep, split: str) -> dict[str, torch.Tensor]:
    """TRL's KTO metrics, detached: the reference point, and each class's mean reward and log-prob when the batch
    has examples of it (a mean over none is no number), their margin when it has both."""
    desirable, rewards, logps = step.desirable, step.out.rewards.float(), step.policy.detach().float()
    metrics = {f"{split}/kl_ref": step.out.reference_point}
    for name, rows in (("desirable", desirable), ("undesirable", ~desirable)):
        if rows.any():
            metrics[f"rewards/{name}"] = rewards[rows].mean()
            metrics[f"logps/{name}"] = logps[rows].mean()
    if "rewards/desirable" in metrics and "rewards/undesirable" in metrics:
        metrics["rewards/margins"] = metrics["rewards/desirable"] - metrics["rewards/undesirable"]
    return metrics
