"""REINFORCE with a leave-one-out baseline (RLOO, Ahmadian et al. 2024) from a reward (`stage=reinforce`).

One training step is one batch of N prompts:

1. sample k responses per prompt (N * k rows, a prompt's k samples contiguous) with the KV-cached generator;
2. shaped reward of a response = its score - kl_coef * KL(policy || reference) summed over its tokens. The KL
   penalty is reward shaping (as in the RLOO paper), not a separate loss term, so the baseline sees it too;
3. advantage = shaped reward - mean shaped reward of the prompt's other k - 1 samples (zero-sum per prompt);
4. loss = -mean(advantage * log pi(response | prompt)), one optimizer step (automatic optimization, so the
   trainer's gradient_clip_val and accumulation apply as in every other stage; or the stage clips to its own
   `max_grad_norm`, as PPO does).

No value network and no ratio clipping: every sample is used once, on-policy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import pytorch_lightning as pl
from torch import Tensor

from neuraflux.alignment.losses import LossOutput, leave_one_out_baseline
from neuraflux.alignment.stats import masked_sum
from neuraflux.data.prompts import PromptBatch
from neuraflux.feedback.rewards import EQUAL_JUDGES, RewardFn
from neuraflux.feedback.rollout import (
    KLSettings,
    Rollout,
    SamplingSettings,
    check_rollout_fits,
    policy_forward,
    sequence_kl,
)
from neuraflux.model import NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.common import (
    check_finite,
    configure_optimizers,
    log_lr,
)
from neuraflux.stages.rl import (
    finish_step,
    log_greedy_validation,
    restore_rl_state,
    rollout_metrics,
    sample_and_score,
    save_rl_state,
    setup_rl,
)


class NanoREINFORCE(pl.LightningModule):
    """The shared backbone trained with RLOO against a frozen reference."""

    algorithm = "reinforce"  # kept in checkpoints: a resume cannot switch algorithm

    def __init__(
        self,
        model: NanoLM,
        tokenizer,
        optim: OptimizerFactory,
        name: str = "reinforce",
        reference_path: str | None = None,
        reward_source: str = "judges",  # judges | reward_model | both
        reward_model_path: str | None = None,
        world: Mapping | None = None,
        judge_weights: Mapping[str, float] = EQUAL_JUDGES,
        reward_model_weight: float = 1.0,
        reward_fn: RewardFn | None = None,
        k: int = 4,  # samples per prompt (>= 2): each one's baseline is the mean reward of the other k - 1
        max_new_tokens: int = 32,
        # 0.7: samples near the greedy response that is judged (bench/alignment.py: 0.5 and 1.0 did worse)
        temperature: float = 0.7,
        top_k: int | None = None,
        top_p: float | None = None,
        kl_estimator: str = "k1",
        kl_controller: str = "fixed",
        kl_coef: float = 0.05,
        kl_target: float = 6.0,
        kl_horizon: float = 10_000.0,
        # None: the trainer clips (trainer.gradient_clip_val); a number: this stage clips to it, as PPO does, and
        # trainer.gradient_clip_val must be unset (so one multitask config serves both algorithms)
        max_grad_norm: float | None = None,
    ):
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise ValueError(f"stage.module.k must be an integer >= 2 (samples per prompt for the baseline), got {k!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"stage.module.max_grad_norm must be > 0 or null, got {max_grad_norm}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.model, self.tokenizer, self.optim, self.name, self.k = model, tokenizer, optim, name, k
        setup_rl(
            self, reference_path, reward_source, reward_model_path, world, judge_weights, reward_model_weight,
            reward_fn, SamplingSettings(max_new_tokens, temperature, top_k, top_p),
            KLSettings(kl_estimator, kl_controller, kl_coef, kl_target, kl_horizon),
        )  # fmt: skip

    def make_rollout(self, batch: PromptBatch) -> Rollout:
        """k sampled responses per prompt (N * k rows), scored, with the per-token KL to the reference."""
        return sample_and_score(self, batch, self.k)

    def advantages(self, rollout: Rollout) -> Tensor:
        """(N * k,) leave-one-out advantages of the KL-shaped rewards; each prompt's k sum to zero."""
        shaped = rollout.scores - self.kl_ctl.value * sequence_kl(rollout)
        return leave_one_out_baseline(shaped, self.k)

    def reinforce_loss(self, rollout: Rollout, advantages: Tensor) -> LossOutput:
        """-mean(A * log pi(y | x)) with log pi summed over each response's tokens."""
        out = policy_forward(self.model, rollout.input_ids, rollout.attention_mask, self.sampling.temperature)
        seq_logprobs = masked_sum(out.logprobs, rollout.response_mask, dim=-1)  # (N * k,)
        loss = -(advantages.detach() * seq_logprobs).mean()
        return LossOutput(loss, {"train/loss": loss})

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        start = time.perf_counter()
        rollout = self.make_rollout(batch)
        check_finite(self.global_step, "objective/reward", rollout.scores)
        advantages = self.advantages(rollout)
        self._learn_start = time.perf_counter()
        out = self.reinforce_loss(rollout, advantages)
        check_finite(self.global_step, "train/loss", out.loss)
        metrics, kl = rollout_metrics(rollout, self.kl_ctl.value)
        metrics = {**out.metrics, **metrics, "time/rollout_s": self._learn_start - start}
        self.log_dict(metrics, on_step=True, on_epoch=False)
        log_lr(self)
        finish_step(self, rollout, kl)
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Automatic optimization: backward and the optimizer step have run by now.
        self.log("time/learn_s", time.perf_counter() - self._learn_start, on_step=True, on_epoch=False)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        log_greedy_validation(self, batch)

    def setup(self, stage: str) -> None:
        if self.max_grad_norm is not None and self.trainer.gradient_clip_val:
            raise ValueError(
                f"stage {self.name} clips with stage.module.max_grad_norm={self.max_grad_norm}; leave "
                f"trainer.gradient_clip_val unset (got {self.trainer.gradient_clip_val})"
            )
        check_rollout_fits(getattr(self.trainer, "datamodule", None), self.sampling.max_new_tokens, self.model)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.max_grad_norm is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def on_fit_start(self) -> None:
        self.frozen.to(self.device)

    def configure_optimizers(self):
        # Frozen models are not registered submodules: these are the policy's parameters only.
        return configure_optimizers(self, self.optim, self.named_parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_rl_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rl_state(self, checkpoint)
