"""What the policy-gradient stages (PPO, REINFORCE and GRPO, with any reward: a single source or a composite of
several) share, as plain functions: the reward, reference and KL set-up, sampling k responses per prompt and scoring
them, a rollout's metrics, the clipped stages' mini-batch updates, the end of a training step (the KL controller, a
composite's Lagrange multipliers), greedy validation, and what a checkpoint carries besides the weights. Each stage
keeps its own algorithm: its advantages and its loss."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch import Tensor

from neuraflux.alignment.losses import LossOutput
from neuraflux.alignment.stats import masked_mean
from neuraflux.data.prompts import PromptBatch
from neuraflux.feedback.rewards import CompositeReward, RewardFn, evaluate_reward, make_reward, reward_model_of
from neuraflux.feedback.rollout import (
    KLSettings,
    Rollout,
    SamplingSettings,
    generate_rollouts,
    load_reference,
    score_rollout,
    sequence_kl,
)
from neuraflux.model import NanoLM
from neuraflux.model.io import FrozenModels
from neuraflux.stages.common import check_finite

log = logging.getLogger(__name__)


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
    if reward_fn is None:
        reward_fn = make_reward(
            reward_source, module.tokenizer, world, reward_model_path, judge_weights, reward_model_weight
        )
    module.sampling, module.kl, module.kl_ctl = sampling, kl, kl.controller_object()
    module.reward_fn = reward_fn  # a CompositeReward is an nn.Module: its moments go into the checkpoint
    module.reference_path = reference_path
    reference = load_reference(reference_path, module.model, module.tokenizer)
    module.frozen = FrozenModels(reference, reward_model_of(reward_fn))


def sample_and_score(
    module: pl.LightningModule, batch: PromptBatch, k: int = 1, value_head: nn.Module | None = None
) -> Rollout:
    """k sampled responses per prompt (N * k rows, a prompt's k contiguous), with the policy's and the frozen
    reference's per-token log-probs (and the value head's estimates, PPO), scored by `score`."""
    s = module.sampling
    prompts = batch.repeat_interleave(k) if k > 1 else batch
    rollout = generate_rollouts(
        module.model, module.tokenizer, prompts, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
        reference=module.frozen.reference, value_head=value_head,
    )  # fmt: skip
    return score(module, rollout)


def score(module: pl.LightningModule, rollout: Rollout) -> Rollout:
    """The rollout scored by the stage's reward (a composite's components kept), KL-shaped with the current
    coefficient."""
    scores, components = evaluate_reward(module.reward_fn, rollout)
    rollout = replace(rollout, components=components)
    return score_rollout(rollout, scores, module.kl_ctl.value, module.kl.estimator)


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
        **{f"reward/{name}": values.mean() for name, values in rollout.components.items()},
    }
    return metrics, kl


def disable_dropout(model: NanoLM, stage: str) -> None:
    """A clipped ratio compares the update's log-probs with the rollout's: dropout would make them differ."""
    if model.config.dropout > 0:
        log.info("stage %s: dropout %.2f -> 0 (the clipped ratio needs the rollout's log-probs reproducible)",
                 stage, model.config.dropout)  # fmt: skip
        model.set_dropout(0.0)


def check_manual_precision(module: pl.LightningModule) -> None:
    """Refuse fp16 for a stage that steps its own optimizer: it would scale the loss in manual_backward, and
    `minibatch_updates` clips and steps on gradients it assumes unscaled. (Lightning itself refuses
    trainer.gradient_clip_val under manual optimization.)"""
    if str(module.trainer.precision).startswith("16"):
        raise ValueError(
            f"stage {module.name} does not support trainer.precision={module.trainer.precision}; "
            "use bf16-mixed or 32-true"
        )


def minibatch_updates(
    module: pl.LightningModule,
    rows: int,
    epochs: int,
    mini_batch_size: int,
    max_grad_norm: float,
    loss_of: Callable[[Tensor], LossOutput],
) -> dict[str, Tensor]:
    """`epochs` passes over a rollout's `rows` in shuffled chunks of `mini_batch_size`, each one optimizer update of
    `loss_of(index)` with gradients clipped to `max_grad_norm` (manual optimization); returns each metric's mean
    over the updates, and `train/grad_norm`'s. Only the last update goes through Lightning's optimizer, so
    global_step counts rollout batches, and the scheduler steps once."""
    opt = module.optimizers()
    chunks = [
        perm[i : i + mini_batch_size]
        for perm in (torch.randperm(rows, device=module.device) for _ in range(epochs))
        for i in range(0, rows, mini_batch_size)
    ]
    metrics: dict[str, list[Tensor]] = {}
    for n, idx in enumerate(chunks):
        out = loss_of(idx)
        for name, value in out.metrics.items():
            if name.endswith("loss"):
                check_finite(module.global_step, name, value)
        opt.zero_grad()
        module.manual_backward(out.loss)
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
        (opt if n == len(chunks) - 1 else opt.optimizer).step()
        for k, v in {**out.metrics, "train/grad_norm": norm}.items():
            metrics.setdefault(k, []).append(v.detach())
    module.lr_schedulers().step()
    return {k: torch.stack(v).mean() for k, v in metrics.items()}


def finish_step(module: pl.LightningModule, rollout: Rollout, kl: Tensor) -> None:
    """After a training step's update: log a composite reward's moments and the multipliers that scored the step,
    take the multipliers' dual-ascent step from this rollout's component means, and update the KL controller."""
    if isinstance(module.reward_fn, CompositeReward):
        module.log_dict(module.reward_fn.state_metrics(), on_step=True, on_epoch=False)
        module.reward_fn.update_multipliers({n: float(v.mean()) for n, v in rollout.components.items()})
    module.kl_ctl.update(float(kl), len(rollout))


def log_greedy_validation(module: pl.LightningModule, batch: PromptBatch) -> Rollout:
    """Greedy responses to held-out prompts scored by the training reward (no KL): val/reward and length, and a
    composite's components as val/<component>."""
    rollout = generate_rollouts(module.model, module.tokenizer, batch, module.sampling.max_new_tokens, temperature=0.0)
    scores, components = evaluate_reward(module.reward_fn, rollout)
    B = len(rollout)
    module.log("val/reward", scores.mean(), on_epoch=True, batch_size=B, prog_bar=True)
    module.log("val/response_length", rollout.response_lengths.float().mean(), on_epoch=True, batch_size=B)
    for name, values in components.items():
        module.log(f"val/{name}", values.mean(), on_epoch=True, batch_size=B)
    return replace(rollout, scores=scores.detach().float(), components=components)


def save_rl_state(module: pl.LightningModule, checkpoint: dict) -> None:
    """What the weights do not hold: the algorithm, the KL coefficient and a composite's Lagrange multipliers (its
    running moments are buffers, in the state dict)."""
    checkpoint["neuraflux"]["algorithm"] = module.algorithm
    checkpoint["neuraflux"]["kl_coef"] = module.kl_ctl.value
    if isinstance(module.reward_fn, CompositeReward):
        checkpoint["neuraflux"]["multipliers"] = dict(module.reward_fn.multipliers)


def restore_rl_state(module: pl.LightningModule, checkpoint: dict) -> None:
    """The KL coefficient and multipliers as they were; refuses a resume that could not rebuild the frozen
    reference, or one into another algorithm or another set of constraints (before any weight is loaded)."""
    if module.reference_path is None:
        raise ValueError(
            f"resuming stage {module.name} needs stage.init_from: the frozen reference is rebuilt from it, "
            "never stored in checkpoints"
        )
    saved = checkpoint["neuraflux"]
    if saved.get("algorithm", module.algorithm) != module.algorithm:
        raise ValueError(
            f"resume: the checkpoint was trained with {saved['algorithm']}, not {module.algorithm} "
            "(stage.module.algorithm, or the stage)"
        )
    module.kl_ctl.value = float(saved.get("kl_coef", module.kl_ctl.value))
    if isinstance(module.reward_fn, CompositeReward):
        multipliers = saved.get("multipliers", {})
        if set(multipliers) != set(module.reward_fn.multipliers):
            raise ValueError(
                f"resume: the checkpoint has Lagrange multipliers for {sorted(multipliers)} but "
                f"stage.module.thresholds constrains {sorted(module.reward_fn.multipliers)}"
            )
        module.reward_fn.multipliers = {k: float(v) for k, v in multipliers.items()}
