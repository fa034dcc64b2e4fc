"""GRPO from a reward (`stage=grpo`): Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), with
Dr. GRPO's corrections (Liu et al. 2025) as options.

One training step is one batch of N prompts (so `trainer.max_steps` counts rollout batches):

1. sample a group of G = `group_size` responses per prompt (N * G rows, a prompt's G contiguous) with the KV-cached
   generator, and score the sequences in one no-grad forward: the policy's and the frozen reference's log-probs;
2. advantage of a response = (reward - mean of its group) / (std of its group + eps), the same on each of its
   tokens; `scale_rewards: false` leaves out the division (Dr. GRPO). No value network: the group is the baseline;
3. `grpo_epochs` passes over the rows in shuffled `mini_batch_size` chunks, each one optimizer update of the
   clipped per-token surrogate (ratio to the sampling policy, `clip_eps`) plus `beta` times the per-token k3 KL to
   the reference, aggregated as `loss_aggregation` says (`alignment.grpo.GRPO_LOSS_AGGREGATIONS`: grpo, the paper's
   per-response mean; dr_grpo, a sum over tokens divided by a constant; dapo, a token mean), gradients clipped to
   `max_grad_norm`.

The KL is a loss term, not reward shaping as in PPO and REINFORCE: the reward the groups compare is the judges'
(or the reward model's) alone. Manual optimization, so trainer.gradient_clip_val must be unset. The maths is in
`neuraflux.alignment.grpo`; sampling, scoring, the updates' loop, validation and checkpoint extras in `stages.rl`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import pytorch_lightning as pl
from torch import Tensor

from neuraflux.alignment.grpo import (
    GRPO_LOSS_AGGREGATIONS,
    check_group_size,
    group_advantages,
    group_reward_std,
    grpo_loss,
)
from neuraflux.alignment.losses import LossOutput
from neuraflux.alignment.stats import masked_mean
from neuraflux.data.prompts import PromptBatch
from neuraflux.feedback.rewards import EQUAL_JUDGES, RewardFn
from neuraflux.feedback.rollout import KLSettings, Rollout, SamplingSettings, check_rollout_fits, policy_forward
from neuraflux.model import NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.common import check_finite, configure_optimizers, log_lr
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


class NanoGRPO(pl.LightningModule):
    """The shared backbone trained with GRPO against a frozen reference."""

    algorithm = "grpo"  # kept in checkpoints: a resume cannot switch algorithm

    def __init__(
        self,
        model: NanoLM,
        tokenizer,
        optim: OptimizerFactory,
        name: str = "grpo",
        reference_path: str | None = None,
        reward_source: str = "judges",  # judges | reward_model | both
        reward_model_path: str | None = None,
        world: Mapping | None = None,
        judge_weights: Mapping[str, float] = EQUAL_JUDGES,
        reward_model_weight: float = 1.0,
        reward_fn: RewardFn | None = None,
        group_size: int = 4,  # G samples per prompt (>= 2): the group's mean (and std) is each one's baseline
        max_new_tokens: int = 32,
        temperature: float = 0.7,  # as REINFORCE: samples near the greedy response that validation judges
        top_k: int | None = None,
        top_p: float | None = None,
        beta: float = 0.04,  # weight of the per-token k3 KL to the reference in the loss (the paper's 0.04)
        clip_eps: float = 0.2,  # the ratio to the sampling policy is clipped to [1 - clip_eps, 1 + clip_eps]
        scale_rewards: bool = True,  # divide by the group's reward std (GRPO); false: Dr. GRPO
        loss_aggregation: str = "grpo",  # grpo | dr_grpo | dapo (neuraflux.alignment.grpo.aggregate_tokens)
        grpo_epochs: int = 1,  # passes over each rollout batch (the paper's mu)
        mini_batch_size: int | None = 16,  # responses per optimizer update; null: all N * G in one
        max_grad_norm: float = 1.0,
    ):
        super().__init__()
        self.automatic_optimization = False
        try:
            check_group_size(group_size)
        except ValueError as err:
            raise ValueError(f"stage.module.{err}") from None
        if loss_aggregation not in GRPO_LOSS_AGGREGATIONS:
            raise ValueError(
                f"stage.module.loss_aggregation must be one of {list(GRPO_LOSS_AGGREGATIONS)}, got {loss_aggregation!r}"
            )
        if grpo_epochs < 1 or (mini_batch_size is not None and mini_batch_size < 1):
            raise ValueError(
                f"stage.module.grpo_epochs ({grpo_epochs}) and mini_batch_size ({mini_batch_size}) must be >= 1"
            )
        if clip_eps <= 0 or beta < 0 or max_grad_norm is None or max_grad_norm <= 0:
            raise ValueError(
                f"stage.module.clip_eps and max_grad_norm must be > 0 and beta >= 0, got clip_eps={clip_eps}, "
                f"max_grad_norm={max_grad_norm}, beta={beta}"
            )
        self.model, self.tokenizer, self.optim, self.name = model, tokenizer, optim, name
        self.group_size, self.clip_eps, self.scale_rewards = group_size, clip_eps, scale_rewards
        self.loss_aggregation, self.grpo_epochs, self.mini_batch_size = loss_aggregation, grpo_epochs, mini_batch_size
        self.max_grad_norm = max_grad_norm
        disable_dropout(model, name)
        # beta is the KL coefficient of the shared set-up: k3, fixed (kept in checkpoints as the others' is)
        setup_rl(
            self, reference_path, reward_source, reward_model_path, world, judge_weights, reward_model_weight,
            reward_fn, SamplingSettings(max_new_tokens, temperature, top_k, top_p), KLSettings("k3", "fixed", beta),
        )  # fmt: skip

    # ---- rollouts ----------
    def make_rollout(self, batch: PromptBatch) -> Rollout:
        """G sampled responses per prompt (N * G rows), scored, with the reference's log-probs."""
        return sample_and_score(self, batch, self.group_size)

    def advantages(self, rollout: Rollout) -> Tensor:
        """(N * G,) group-relative advantages of the rewards (the KL is in the loss, not in the reward)."""
        return group_advantages(rollout.scores, self.group_size, self.scale_rewards)

    def grpo_loss(self, rollout: Rollout, advantages: Tensor) -> LossOutput:
        """The clipped surrogate + beta * k3 for some rows of a rollout, aggregated as configured."""
        out = policy_forward(self.model, rollout.input_ids, rollout.attention_mask, self.sampling.temperature)
        res = grpo_loss(
            out.logprobs, rollout.logprobs, rollout.ref_logprobs, advantages, rollout.response_mask, self.clip_eps,
            self.kl_ctl.value, self.loss_aggregation, self.sampling.max_new_tokens,
        )  # fmt: skip
        metrics = {"policy/loss": res.policy_loss, "policy/kl": res.kl, "policy/clipfrac": res.clipfrac}
        return LossOutput(res.loss, {"train/loss": res.loss, **metrics})

    # ---- training ----------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        rollout = self.make_rollout(batch)
        check_finite(self.global_step, "objective/reward", rollout.scores)
        adv = self.advantages(rollout)
        rollout_s = time.perf_counter() - start

        start = time.perf_counter()
        metrics = minibatch_updates(
            self, len(rollout), self.grpo_epochs, self.mini_batch_size or len(rollout), self.max_grad_norm,
            lambda idx: self.grpo_loss(rollout.select(idx), adv[idx]),
        )  # fmt: skip
        learn_s = time.perf_counter() - start

        self.log_dict(metrics, on_step=True, on_epoch=False)
        objective, kl = rollout_metrics(rollout, self.kl_ctl.value)
        std = group_reward_std(rollout.scores, self.group_size)  # (N,)
        objective.update(
            {
                "rollout/kl": masked_mean(rollout.kl, rollout.response_mask),  # per token, as the loss weighs it
                "group/reward_std": std.mean(),
                "group/zero_std": (std == 0).float().mean(),  # share of groups that teach nothing: equal rewards
                "group/advantage_abs": adv.abs().mean(),
                "time/rollout_s": rollout_s,
                "time/learn_s": learn_s,
            }
        )
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
        # Frozen models are not registered submodules: these are the policy's parameters only.
        return configure_optimizers(self, self.optim, self.named_parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_rl_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rl_state(self, checkpoint)
