"""What the policy-gradient stages (PPO, REINFORCE and multi-task RL on either) share, as plain functions: the
reward, reference and KL set-up, a scored rollout's metrics, greedy validation, and the KL coefficient in
checkpoints. Each stage keeps its own algorithm: its advantages, its loss and its optimizer steps."""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
from torch import Tensor

from neuraflux.alignment.stats import masked_mean
from neuraflux.data.prompts import PromptBatch
from neuraflux.feedback.rewards import RewardFn, RewardSetup, make_reward
from neuraflux.feedback.rollout import (
    KLSettings,
    Rollout,
    SamplingSettings,
    greedy_rollout,
    load_reference,
    sequence_kl,
)
from neuraflux.model.io import FrozenModels


def setup_rl(
    module: pl.LightningModule,
    reference_path: str | None,
    reward_source: str,
    reward_model_path: str | None,
    world: Mapping | None,
    judge_weights: Mapping[str, float],
    reward_model_weight: float,
    reward_fn: RewardFn | None,
    sampling: SamplingSettings,
    kl: KLSettings,
) -> None:
    """Give a policy-gradient stage (with `.model` and `.tokenizer` set) its `sampling`, `kl`, `kl_ctl` (the KL
    controller), `reward_fn` and `frozen` models. The reward is a custom callable (then nothing is loaded for it)
    or the configured source; the frozen reference is reloaded from `reference_path`, so a resumed run gets the
    initial policy, not the resumed one."""
    if reward_fn is not None:
        reward = RewardSetup(reward_fn)
    else:
        reward = make_reward(
            reward_source, module.tokenizer, world, reward_model_path, judge_weights, reward_model_weight
        )
    module.sampling, module.kl, module.kl_ctl = sampling, kl, kl.controller_object()
    module.reward_fn = reward.fn
    module.reference_path = reference_path
    module.frozen = FrozenModels(load_reference(reference_path, module.model, module.tokenizer), reward.reward_model)


def rollout_metrics(rollout: Rollout, kl_coef: float) -> tuple[dict[str, Tensor | float], Tensor]:
    """A scored rollout's `objective/*` and `rollout/*` metrics, and its mean summed KL (for the controller)."""
    seq_kl = sequence_kl(rollout)  # (B,)
    kl = seq_kl.mean()
    metrics = {
        "objective/reward": rollout.scores.mean(),
        "objective/kl": kl,
        "objective/rlhf_reward": (rollout.scores - kl_coef * seq_kl).mean(),
        "objective/entropy": masked_mean(rollout.entropy, rollout.response_mask),
        "objective/kl_coef": kl_coef,
        "rollout/response_length": rollout.response_lengths.float().mean(),
    }
    return metrics, kl


def log_greedy_validation(module: pl.LightningModule, batch: PromptBatch) -> Rollout:
    """Greedy responses to held-out prompts scored by the training reward (no KL): val/reward and length."""
    rollout = greedy_rollout(module.model, module.tokenizer, batch, module.sampling.max_new_tokens, module.reward_fn)
    B = len(rollout)
    module.log("val/reward", rollout.scores.mean(), on_epoch=True, batch_size=B, prog_bar=True)
    module.log("val/response_length", rollout.response_lengths.float().mean(), on_epoch=True, batch_size=B)
    return rollout


def save_kl_coef(module: pl.LightningModule, checkpoint: dict) -> None:
    checkpoint["neuraflux"]["kl_coef"] = module.kl_ctl.value


def restore_kl_coef(module: pl.LightningModule, checkpoint: dict) -> None:
    """The adaptive KL coefficient as it was; refuses a resume that could not rebuild the frozen reference."""
    if module.reference_path is None:
        raise ValueError(
            f"resuming stage {module.name} needs stage.init_from: the frozen reference is rebuilt from it, "
            "never stored in checkpoints"
        )
    module.kl_ctl.value = float(checkpoint["neuraflux"].get("kl_coef", module.kl_ctl.value))
