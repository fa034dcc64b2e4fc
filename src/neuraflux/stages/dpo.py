"""`stage=dpo`: direct preference optimisation of the policy against a frozen copy of itself.

The reference is the policy as it was given (the model of `stage.init_from`), deep-copied in the constructor.
Its log-probs come either from a forward per batch under no_grad, or, with `precompute_ref_logps`, from one pass
over the whole dataset at fit start, after which the reference model is dropped.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from neuraflux.alignment.losses import DPOOutput, dpo_loss, response_logprobs
from neuraflux.data.preference_batches import SPLITS, Paired, PreferenceBatch
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
from neuraflux.stages.reward import preference_metrics

log = logging.getLogger(__name__)


@dataclass
class PrecomputedLogps:
    """Reference sequence log-probs of every pair of one split, indexed by `PreferenceBatch.index`."""

    chosen: torch.Tensor  # (N,)
    rejected: torch.Tensor  # (N,)


@dataclass
class DPOStep:
    out: DPOOutput
    loss: torch.Tensor  # scalar: the DPO loss, plus rpo_alpha * nll when set
    policy: Paired  # sequence log-probs, with gradient
    reference: Paired
    nll: torch.Tensor | None = None  # the chosen responses' per-token NLL (with rpo_alpha)


class NanoDPO(pl.LightningModule):
    """DPO (Rafailov et al. 2023) and its variants (`loss_type`: sigmoid, hinge, ipo, robust) on `self.model`.

    `reference_from` names where the initial policy came from (stage.init_from). It is read only on resume: the
    policy train() restores from a checkpoint has already moved, so the reference is loaded from there instead.
    """

    def __init__(
        self,
        model: NanoLM,
        tokenizer,
        optim: OptimizerFactory,
        name: str = "dpo",
        beta: float = 0.1,
        loss_type: str = "sigmoid",  # sigmoid | hinge | ipo | robust
        label_smoothing: float = 0.0,
        # reference log-probs computed once for the whole dataset at fit start, then the reference is freed (the
        # same numbers, tested; steps run 1.35x faster: docs/BENCHMARKS.md)
        precompute_ref_logps: bool = True,
        reference_from: str | None = None,
        # RPO: plus rpo_alpha x the chosen responses' per-token NLL; None = plain DPO, which lowered helpfulness at
        # every lr tried, where with the NLL term DPO raises the judges (docs/BENCHMARKS.md)
        rpo_alpha: float | None = 1.0,
    ):
        super().__init__()
        if rpo_alpha is not None and not rpo_alpha >= 0:
            raise ValueError(f"stage.module.rpo_alpha must be >= 0 or null, got {rpo_alpha!r}")
        # A dry call validates the settings where the rules live, before any work starts.
        zero = torch.zeros(1)
        try:
            dpo_loss(zero, zero, zero, zero, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        except ValueError as err:
            raise ValueError(f"stage.module: {err}") from None
        self.model, self.tokenizer, self.optim, self.name = model, tokenizer, optim, name
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.precompute_ref_logps = precompute_ref_logps
        self.reference_from = reference_from
        self.rpo_alpha = rpo_alpha
        # IPO is defined on length-averaged log-probs (Azar et al. 2023, sec. 5); the others on sums.
        self.average_logps = loss_type == "ipo"
        self.frozen = FrozenModels(freeze(copy.deepcopy(model)))
        self.precomputed: dict[str, PrecomputedLogps] = {}

    @property
    def reference(self) -> NanoLM | None:
        return self.frozen.reference

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    # ---- log-probs --------------------------------------------------------------------------------------
    def _logps(self, model: NanoLM, batch: PreferenceBatch) -> Paired:
        """Sequence log-probs of the chosen and rejected responses under `model`, `(B,)` each."""
        # Both halves in one (2B, T) forward. The batch is right padded, and under the causal mask a real token
        # never sees the pads to its right, so no padding mask is needed: the backbone takes its fused causal
        # path, and the head runs at response positions only.
        logps = response_logprobs(
            model, batch.input_ids, batch.targets, batch.response_mask, average=self.average_logps
        )
        return batch.pair(logps)

    def _reference_model(self) -> NanoLM:
        ref = self.frozen.reference
        if ref is None:
            raise RuntimeError("the reference model was dropped after precomputing; no per-batch reference log-probs")
        if ref.lm_head.weight.device != self.device:
            ref.to(self.device)  # not registered, so Lightning does not move it
        return ref

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch, split: str) -> Paired:
        """Reference sequence log-probs `(B,)` each: from the split's precomputed table, else a reference forward."""
        if split in self.precomputed:
            table = self.precomputed[split]
            return Paired(table.chosen[batch.index], table.rejected[batch.index])
        return self._logps(self._reference_model(), batch)

    @torch.no_grad()
    def precompute(self, datamodule) -> None:
        """Reference log-probs of every pair of every split, then drop the reference model."""
        if not hasattr(datamodule, "sequential_loader"):
            raise TypeError(
                f"stage.module.precompute_ref_logps needs a PreferenceDataModule; the data module is "
                f"{type(datamodule).__name__}"
            )
        ref = self._reference_model()
        # the training step's autocast, so precomputed and per-batch values agree under mixed precision
        trainer = attached_trainer(self)
        autocast = trainer.precision_plugin.forward_context if trainer is not None else nullcontext
        for split in SPLITS:
            loader = datamodule.sequential_loader(split)
            n = len(loader.dataset)
            chosen = torch.full((n,), float("nan"), device=self.device)
            rejected = torch.full((n,), float("nan"), device=self.device)
            for batch in loader:
                batch = datamodule.transfer_batch_to_device(batch, self.device, 0)
                with autocast():
                    logps = self._logps(ref, batch)
                chosen[batch.index], rejected[batch.index] = logps.chosen.float(), logps.rejected.float()
            self.precomputed[split] = PrecomputedLogps(chosen, rejected)
            log.info("precomputed reference log-probs of %d %s pairs", n, split)
        self.frozen.reference = None

    def on_fit_start(self) -> None:
        if self.precompute_ref_logps and not self.precomputed:
            self.precompute(self.trainer.datamodule)

    # ---- steps ------------------------------------------------------------------------------------------
    def dpo_step(self, batch: PreferenceBatch, split: str) -> DPOStep:
        """Policy and reference log-probs of a batch and the DPO loss; `split` picks the precomputed table."""
        policy = self._logps(self.model, batch)
        reference = self.reference_logps(batch, split)
        out = dpo_loss(
            policy.chosen,
            policy.rejected,
            reference.chosen,
            reference.rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )
        # means over the batch, or over the optimizer step's micro-batches when accumulating (step_denominator)
        pairs = step_denominator(self, batch, "pairs")
        loss = out.losses.sum() / (batch.num_pairs if pairs is None else pairs)
        nll = None
        if self.rpo_alpha is not None:
            # RPO (Pang et al. 2024; TRL's rpo_alpha): plus the chosen responses' per-token negative log-likelihood,
            # which keeps DPO from lowering the likelihood of both responses together
            lengths = batch.chosen_response_mask.sum(-1)
            sums = policy.chosen * lengths if self.average_logps else policy.chosen
            tokens = step_denominator(self, batch, "chosen_tokens")
            nll = -sums.sum() / (lengths.sum().clamp(min=1) if tokens is None else tokens)
            loss = loss + self.rpo_alpha * nll
        return DPOStep(out, loss, policy, reference, nll)

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        step = self.dpo_step(batch, "train")
        check_finite(
            self.global_step,
            "train/loss",
            step.loss,
            {
                "logps/chosen": step.policy.chosen,
                "logps/rejected": step.policy.rejected,
                "ref_logps/chosen": step.reference.chosen,
                "ref_logps/rejected": step.reference.rejected,
            },
        )
        if is_logging_step(self):
            self.log("train/loss", step.loss, on_step=True, on_epoch=False, prog_bar=True)
            metrics = preference_metrics(Paired(step.out.chosen_rewards, step.out.rejected_rewards))
            metrics["logps/chosen"] = step.policy.chosen.detach().mean()
            metrics["logps/rejected"] = step.policy.rejected.detach().mean()
            if step.nll is not None:
                metrics["train/nll_chosen"] = step.nll.detach()
            self.log_dict(metrics, on_step=True, on_epoch=False)
            log_lr(self)
        return step.loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        step = self.dpo_step(batch, "val")
        metrics = preference_metrics(Paired(step.out.chosen_rewards, step.out.rejected_rewards))
        values = {
            "val/loss": step.loss,
            "val/accuracies": metrics["rewards/accuracies"],
            "val/margins": metrics["rewards/margins"],
        }
        self.log_dict(values, on_epoch=True, batch_size=batch.num_pairs, sync_dist=True)

    def configure_optimizers(self):
        return configure_optimizers(self, self.optim, self.model.named_parameters())

    # ---- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["neuraflux"]["reference_from"] = self.reference_from

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.frozen = FrozenModels(reload_reference(self.reference_from, self.model, self.tokenizer, "DPO"))
        self.precomputed = {}
