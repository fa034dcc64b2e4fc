"""PPO from a reward (`stage=ppo`): sample, score, shape with a KL penalty, then clipped updates.

One training step is one batch of prompts (so `trainer.max_steps` counts rollout batches):

1. sample a response per prompt with the KV-cached generator, and score the sequences in one no-grad forward:
   policy log-probs, value-head estimates and the frozen reference's log-probs;
2. reward = the configured source (world judges, a reward model, or both) at the last response token, minus
   kl_coef * KL(policy || reference) on every response token (Ziegler et al. 2019);
3. GAE advantages (Schulman et al. 2016), whitened over the batch's response tokens;
4. `ppo_epochs` passes over the batch in shuffled `mini_batch_size` chunks, each one optimizer update of
   the clipped policy loss + vf_coef * clipped value loss (Schulman et al. 2017), gradients clipped to
   max_grad_norm.

The value head is a Linear(C, 1) on the policy's final hidden states: trained with the stage and saved in
its checkpoint, but not part of the exported LM. Manual optimization, so trainer.gradient_clip_val must be
unset.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import pytorch_lightning as pl
import torch.nn as nn
from torch import Tensor

from neuraflux.alignment.losses import LossOutput, gae, ppo_policy_loss, ppo_value_loss
from neuraflux.alignment.stats import masked_mean, masked_whiten
from neuraflux.data.prompts import PromptBatch
from neuraflux.feedback.rewards import EQUAL_JUDGES, RewardFn
from neuraflux.feedback.rollout import KLSettings, Rollout, SamplingSettings, check_rollout_fits, policy_forward
from neuraflux.model import NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.common import (
    check_finite,
    configure_optimizers,
    log_lr,
)
from neuraflux.stages.rl import (
    check_manual_precision,
    disable_dropout,
    finish_step,
    log_greedy_validation,
    minibatch_updates,
    restore_rl_state,
    rollout_metrics,
    sample_and_score,
    save_rl_state,
    setup_rl,
)


class NanoPPO(pl.LightningModule):
    """Policy (the shared backbone) + value head, trained with PPO against a frozen reference."""

    algorithm = "ppo"  # kept in checkpoints: a resume cannot switch algorithm

    def __init__(
        self,
        model: NanoLM,
        tokenizer,
        optim: OptimizerFactory,
        name: str = "ppo",
        reference_path: str | None = None,
        reward_source: str = "judges",  # judges | reward_model | both
        reward_model_path: str | None = None,
        world: Mapping | None = None,
        judge_weights: Mapping[str, float] = EQUAL_JUDGES,
        reward_model_weight: float = 1.0,
        reward_fn: RewardFn | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        kl_estimator: str = "k1",
        kl_controller: str = "fixed",
        kl_coef: float = 0.3,  # bench/alignment.py: 0.05-0.1 let the policy learn to stop before an uncertain answer
        kl_target: float = 6.0,
        kl_horizon: float = 10_000.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        ppo_epochs: int = 2,
        mini_batch_size: int = 8,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        max_grad_norm: float = 1.0,
        whiten_advantages: bool = True,
    ):
        super().__init__()
        self.automatic_optimization = False
        if ppo_epochs < 1 or mini_batch_size < 1:
            raise ValueError(
                f"stage.module.ppo_epochs ({ppo_epochs}) and mini_batch_size ({mini_batch_size}) must be >= 1"
            )
        if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
            raise ValueError(f"stage.module.gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
        if clip_range <= 0 or clip_range_value <= 0 or vf_coef < 0 or max_grad_norm <= 0:
            raise ValueError("stage.module.clip_range, clip_range_value and max_grad_norm must be > 0, vf_coef >= 0")
        self.model, self.tokenizer, self.optim, self.name = model, tokenizer, optim, name
        self.gamma, self.lam, self.ppo_epochs, self.mini_batch_size = gamma, lam, ppo_epochs, mini_batch_size
        self.clip_range, self.clip_range_value, self.vf_coef = clip_range, clip_range_value, vf_coef
        self.max_grad_norm, self.whiten_advantages = max_grad_norm, whiten_advantages
        disable_dropout(model, name)
        setup_rl(
            self, reference_path, reward_source, reward_model_path, world, judge_weights, reward_model_weight,
            reward_fn, SamplingSettings(max_new_tokens, temperature, top_k, top_p),
            KLSettings(kl_estimator, kl_controller, kl_coef, kl_target, kl_horizon),
        )  # fmt: skip
        self.value_head = nn.Linear(model.config.n_embd, 1)
        # Zero init: values start at 0, so the first advantages are the discounted rewards themselves.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    # ---- rollouts ----------
    def make_rollout(self, batch: PromptBatch) -> Rollout:
        """Sample and score one response per prompt; rewards shaped with the current KL coefficient."""
        return sample_and_score(self, batch, value_head=self.value_head)

    def advantages(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """GAE advantages (whitened over the batch's response tokens if configured) and returns, (B, T)."""
        adv, returns = gae(rollout.rewards, rollout.values, rollout.response_mask, self.gamma, self.lam)
        if self.whiten_advantages and int(rollout.response_mask.sum()) > 1:
            adv = masked_whiten(adv, rollout.response_mask)
        return adv, returns

    def ppo_loss(self, rollout: Rollout, advantages: Tensor, returns: Tensor) -> LossOutput:
        """Clipped policy loss + vf_coef * clipped value loss for one mini-batch of a rollout."""
        out = policy_forward(
            self.model, rollout.input_ids, rollout.attention_mask, self.sampling.temperature, self.value_head
        )
        mask = rollout.response_mask
        pg = ppo_policy_loss(out.logprobs, rollout.logprobs, advantages, mask, self.clip_range)
        vf = ppo_value_loss(out.values, rollout.values, returns, mask, self.clip_range_value)
        return LossOutput(
            pg.loss + self.vf_coef * vf.loss,
            {
                "policy/loss": pg.loss,
                "policy/clipfrac": pg.clipfrac,
                "policy/approx_kl": pg.approx_kl,
                "value/loss": vf.loss,
                "value/clipfrac": vf.clipfrac,
            },
        )

    # ---- training ----------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        rollout = self.make_rollout(batch)
        check_finite(self.global_step, "objective/reward", rollout.scores)
        adv, returns = self.advantages(rollout)
        rollout_s = time.perf_counter() - start

        start = time.perf_counter()
        metrics = minibatch_updates(
            self, len(rollout), self.ppo_epochs, self.mini_batch_size, self.max_grad_norm,
            lambda idx: self.ppo_loss(rollout.select(idx), adv[idx], returns[idx]),
        )  # fmt: skip
        learn_s = time.perf_counter() - start

        self.log_dict(metrics, on_step=True, on_epoch=False)
        objective, kl = rollout_metrics(rollout, self.kl_ctl.value)
        objective["value/mean"] = masked_mean(rollout.values, rollout.response_mask)
        objective.update({"time/rollout_s": rollout_s, "time/learn_s": learn_s})
        self.log_dict(objective, on_step=True, on_epoch=False)
        log_lr(self)
        finish_step(self, rollout, kl)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        log_greedy_validation(self, batch)

    # ---- wiring ----------
    def setup(self, stage: str) -> None:
        check_manual_precision(self)
        check_rollout_fits(getattr(self.trainer, "datamodule", None), self.sampling.max_new_tokens, self.model)

    def on_fit_start(self) -> None:
        self.frozen.to(self.device)

    def configure_optimizers(self):
        # Frozen models are not registered submodules, so these are the policy's and the value head's only.
        return configure_optimizers(self, self.optim, self.named_parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_rl_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rl_state(self, checkpoint)
