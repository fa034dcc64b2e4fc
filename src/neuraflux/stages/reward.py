"""`stage=reward`: a Bradley-Terry reward model on preference pairs, exported to run_dir/model at the end.

Also the two helpers the preference stages share: per-pair metrics and the non-finite-loss check.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from neuraflux.alignment.losses import reward_loss
from neuraflux.chat import ASSISTANT
from neuraflux.data.preference_batches import Paired, PreferenceBatch
from neuraflux.model import NanoLM
from neuraflux.model.reward import NanoRewardModel
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.common import (
    check_finite,
    configure_optimizers,
    is_logging_step,
    log_lr,
    step_denominator,
)

log = logging.getLogger(__name__)


def preference_metrics(rewards: Paired) -> dict[str, torch.Tensor]:
    """TRL's reward metrics from per-pair rewards (each `(B,)`), as `rewards/name` scalars, detached."""
    chosen, rejected = rewards.chosen.detach().float(), rewards.rejected.detach().float()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
    }


class RewardModelStage(pl.LightningModule):
    """Trains `NanoRewardModel` (`self.model`) with the pairwise loss -log sigma(r_chosen - r_rejected).

    Given a NanoLM (what train() passes: the model of `stage.init_from`), the reward model is built on that LM's
    backbone, so the LM train() exports afterwards has the same backbone weights as the reward model.
    `likelihood_weight` (None: off) adds that many times the response's mean log-likelihood under the backbone to the
    score, a weight trained with the rest (`NanoRewardModel`; responses start after the assistant token).
    """

    def __init__(
        self,
        model: NanoLM | NanoRewardModel,
        tokenizer,
        optim: OptimizerFactory,
        name: str = "reward",
        export_dir: str | None = None,
        # initial weight of the response's mean per-token log-likelihood in the score (then learned); None = off.
        # docs/BENCHMARKS.md, "Reward models": 0.701 -> 0.838 held-out pair accuracy
        likelihood_weight: float | None = 10.0,
    ):
        super().__init__()
        if isinstance(model, NanoRewardModel):
            self.model = model
        elif likelihood_weight is None:
            self.model = NanoRewardModel.from_lm(model)
        else:
            self.model = NanoRewardModel.from_lm(model, tokenizer.token_to_id(ASSISTANT), float(likelihood_weight))
        self.tokenizer, self.optim, self.name = tokenizer, optim, name
        self.export_dir = Path(export_dir) if export_dir else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.score(input_ids, attention_mask)

    def _rewards(self, batch: PreferenceBatch) -> Paired:
        # one (2B, T) forward for both halves
        return batch.pair(self.model.score(batch.input_ids, batch.attention_mask))

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        rewards = self._rewards(batch)
        pairs = step_denominator(self, batch, "pairs")  # a step's pairs when accumulating
        loss = reward_loss(rewards.chosen, rewards.rejected).sum() / (batch.num_pairs if pairs is None else pairs)
        check_finite(
            self.global_step,
            "train/loss",
            loss,
            {"rewards/chosen": rewards.chosen, "rewards/rejected": rewards.rejected},
        )
        if is_logging_step(self):
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
            self.log_dict(preference_metrics(rewards), on_step=True, on_epoch=False)
            log_lr(self)
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        rewards = self._rewards(batch)
        metrics = preference_metrics(rewards)
        values = {
            "val/loss": reward_loss(rewards.chosen, rewards.rejected).mean(),
            "val/accuracies": metrics["rewards/accuracies"],
            "val/margins": metrics["rewards/margins"],
        }
        self.log_dict(values, on_epoch=True, batch_size=batch.num_pairs, sync_dist=True, prog_bar=False)

    def configure_optimizers(self):
        return configure_optimizers(self, self.optim, self.model.named_parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["neuraflux"]["reward_model"] = True

    def on_fit_start(self) -> None:
        # the exported model records how its prompts looked, so that scoring with it gives them the same context
        datamodule = getattr(self.trainer, "datamodule", None)
        self.model.retrieve_context = bool(getattr(datamodule, "retrieve_context", False))
        settings = getattr(datamodule, "retrieval", None)  # the world store's (the `retrieval` group)
        self.model.retrieval = settings.to_dict() if settings is not None else None

    def on_fit_end(self) -> None:
        if self.export_dir is None or not self.trainer.is_global_zero:
            return
        self.model.save_pretrained(self.export_dir, self.tokenizer)  # with tokenizer.json and its fingerprint
        log.info("reward model written to %s", self.export_dir)
