"""Alignment losses and advantage estimators as pure functions of tensors.

Conventions (TRL's): per-token tensors are `(B, T)` aligned to next-token targets (`labels[:, t]` is the target
of `logits[:, t]`), masks are bool with True = counts, per-example losses come back un-reduced so the caller
chooses the reduction, and rewards/advantages that act as targets are detached. Results with more than one
tensor are NamedTuples: unpack them like tuples or read them by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from neuraflux.alignment.stats import check_mask, check_same_shape, masked_mean, masked_sum

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "robust")
IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """A scalar training loss and the detached metrics to log with it, named `split/name` (`policy/clipfrac`)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss.dim() != 0:
            raise ValueError(f"LossOutput.loss must be a scalar tensor, got shape {tuple(self.loss.shape)}")
        bad = [k for k in self.metrics if k.count("/") != 1 or k.startswith("/") or k.endswith("/")]
        if bad:
            raise ValueError(f"LossOutput metric names must look like 'split/name', got {bad}")
        self.metrics = {k: v.detach() for k, v in self.metrics.items()}


class DPOOutput(NamedTuple):
    losses: Tensor  # (B,)
    chosen_rewards: Tensor  # (B,) beta * (policy - ref) on the chosen response, detached
    rejected_rewards: Tensor  # (B,)


class GAEOutput(NamedTuple):
    advantages: Tensor  # (B, T), 0 on masked steps
    returns: Tensor  # (B, T), advantages + values on valid steps, 0 on masked steps


class PolicyLossOutput(NamedTuple):
    loss: Tensor  # scalar
    clipfrac: Tensor  # scalar, detached
    approx_kl: Tensor  # scalar, detached


class ValueLossOutput(NamedTuple):
    loss: Tensor  # scalar
    clipfrac: Tensor  # scalar, detached


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels] per position: `(B, T, V)`, `(B, T)` -> `(B, T)`, at least float32.

    Computed as logit[label] - logsumexp(logits), one row of the batch at a time, so the largest temporary is
    `(T, V)` (the float32 copy of half-precision logits) rather than a full `(B, T, V)` log-softmax.
    Labels < 0 (IGNORE_INDEX, -100) give 0; other ids are clamped into the vocabulary, so masked positions may
    hold any id without an indexing error.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but logits are {tuple(logits.shape)}; "
            "labels must be (B, T) aligned to the logits"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    ignored = labels < 0
    safe = labels.clamp(0, logits.size(-1) - 1)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits are summed in float32
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).to(dtype)  # (B, T)
    lse = torch.stack([torch.logsumexp(row.to(dtype), dim=-1) for row in logits])  # (B, T)
    return (picked - lse).masked_fill(ignored, 0.0)


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Log-probability of each sequence's masked tokens: `(B, T, V)`, `(B, T)`, `(B, T)` bool -> `(B,)`.

    The sum is log pi(y|x) as DPO uses it (Rafailov et al. 2023, eq. 7). `average=True` divides by the number of
    valid tokens, the length-normalised form IPO is run with (Azar et al. 2023, sec. 5).
    """
    check_mask(labels, mask)
    per_token = token_logprobs(logits, labels)
    return masked_mean(per_token, mask, dim=-1) if average else masked_sum(per_token, mask, dim=-1)


def response_logprobs(
    model,
    input_ids: Tensor,
    labels: Tensor,
    mask: Tensor,
    average: bool = False,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """`sequence_logprobs(model(input_ids, attention_mask), labels, mask, average)` for a `NanoLM`, with the LM
    head applied at the masked positions only: a response is a fraction of its sequence, and the
    (tokens x vocab) projection and log-softmax elsewhere would be thrown away. `(B, T)` each -> `(B,)`."""
    check_mask(labels, mask)
    hidden = model.transformer(input_ids, attention_mask)
    rows, cols = mask.nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])  # (N, V)
    # the fused kernel, in float32 as token_logprobs; ignored labels (< 0) give 0 there too
    picked = labels[rows, cols]
    picked = torch.where(picked < 0, IGNORE_INDEX, picked)
    per_token = -F.cross_entropy(logits.float(), picked, ignore_index=IGNORE_INDEX, reduction="none")
    if rows.numel() == 0:  # no response token at all: zeros that still backpropagate (to nothing)
        return (hidden.sum() * 0.0).to(per_token.dtype).expand(labels.shape[0])
    sums = per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)
    return sums / mask.sum(-1).clamp(min=1) if average else sums


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Per-example direct preference losses from sequence log-probs, all `(B,)` -> `DPOOutput` of `(B,)`.

    With h = (pi_c - pi_r) - (ref_c - ref_r) and eps = label_smoothing:
    - "sigmoid": -(1-eps) log sigma(beta h) - eps log sigma(-beta h). Rafailov et al. 2023, eq. 7; eps > 0 is
      conservative DPO (cDPO, Mitchell 2023), which assumes labels are flipped with probability eps.
    - "hinge": relu(1 - beta h), the SLiC-HF rank calibration loss with margin 1 (Zhao et al. 2023).
    - "ipo": (h - 1 / (2 beta))^2, Azar et al. 2023, eq. 17; usually fed length-averaged log-probs.
    - "robust": (-(1-eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps), the unbiased loss under
      label noise of rDPO (Chowdhury et al. 2024), in TRL's form.
    Rewards are beta * (policy - reference) log-ratios, detached (they are metrics, not loss terms); gradients
    reach only the policy log-probs.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type must be one of {list(DPO_LOSS_TYPES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"dpo label_smoothing only applies to 'sigmoid' and 'robust', not {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    # The reference is frozen by definition: detaching here keeps a caller's stray graph from training it.
    chosen_logratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratio = policy_rejected_logps - ref_rejected_logps.detach()
    h = chosen_logratio - rejected_logratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    return DPOOutput(losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


def reward_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry pairwise loss -log sigma(r_c - r_r - m) per pair: `(B,)` -> `(B,)`.

    Ouyang et al. 2022 (InstructGPT), eq. 1; the optional margin m (`(B,)`) is Llama 2's (Touvron et al. 2023,
    eq. 2), asking for a larger score gap where annotators were more certain.
    """
    check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    diff = chosen_scores - rejected_scores
    if margin is not None:
        check_same_shape(chosen_scores=chosen_scores, margin=margin)
        diff = diff - margin
    return -F.logsigmoid(diff)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> GAEOutput:
    """Generalised advantage estimation over `(B, T)` rewards and values (Schulman et al. 2016, eq. 11-16).

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, where t+1 is the next *valid*
    step of the row: masked steps are skipped, so left padding, right padding and holes all work, and the value
    after a row's last valid step is 0 (the episode ends with the response). Masked steps get advantage and
    return 0. Inputs are detached: advantages and returns are targets, not part of the graph.
    """
    check_same_shape(rewards=rewards, values=values)
    check_mask(rewards, mask)
    if rewards.dim() != 2:
        raise ValueError(f"gae expects (B, T) rewards, got shape {tuple(rewards.shape)}")
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gae gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    rewards, values = rewards.detach(), values.detach()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V of the next valid step, 0 past the end
    next_adv = torch.zeros_like(rewards[:, 0])  # (B,) A of the next valid step
    for t in reversed(range(rewards.size(1))):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv, zero)
        # A masked step leaves the carry untouched, so the recursion jumps straight over it.
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    returns = torch.where(mask, advantages + values, zero)
    return GAEOutput(advantages, returns)


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) over `(B, T)` tokens -> scalar loss and metrics.

    loss = masked mean of max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r = exp(logp - logp_old), the negated
    objective; clipfrac = share of valid tokens where the clipped term is strictly larger (and so chosen);
    approx_kl = masked mean of 0.5 (logp - logp_old)^2, as TRL reports it.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    check_mask(logprobs, mask)
    if clip_range <= 0:
        raise ValueError(f"ppo clip_range must be > 0, got {clip_range}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = 0.5 * masked_mean(log_ratio.detach().square(), mask)
    return PolicyLossOutput(loss, clipfrac, approx_kl)


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> ValueLossOutput:
    """Clipped value loss over `(B, T)` tokens -> scalar loss and clipfrac (TRL; Schulman et al. 2017's code).

    loss = 0.5 masked mean of max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, -c, c), so
    the value head cannot move more than c from the rollout's estimate in one update.
    """
    check_same_shape(values=values, old_values=old_values, returns=returns)
    check_mask(values, mask)
    if clip_range_value <= 0:
        raise ValueError(f"ppo clip_range_value must be > 0, got {clip_range_value}")
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_err = (values - returns).square()
    clipped_err = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask).detach()
    return ValueLossOutput(loss, clipfrac)


def leave_one_out_baseline(rewards: Tensor, k: int) -> Tensor:
    """RLOO advantages (Ahmadian et al. 2024, "Back to Basics", the RLOO estimator): `(N * k,)` -> `(N * k,)`.

    The k samples of each prompt are contiguous; each sample's advantage is its reward minus the mean reward of
    the prompt's other k - 1 samples, an unbiased baseline that needs no value network.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ValueError(f"leave_one_out_baseline needs k >= 2 samples per prompt, got k={k!r}")
    if rewards.dim() != 1:
        raise ValueError(f"leave_one_out_baseline expects (N * k,) rewards, got shape {tuple(rewards.shape)}")
    if rewards.numel() == 0 or rewards.numel() % k != 0:
        raise ValueError(f"leave_one_out_baseline: {rewards.numel()} rewards is not a positive multiple of k={k}")
    grouped = rewards.view(-1, k)  # (N, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)
