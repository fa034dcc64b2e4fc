"""Group Relative Policy Optimization (GRPO) as pure tensor functions: advantages relative to a group of samples of
one prompt, the clipped per-token objective with a k3 KL penalty to the reference, and the ways to aggregate it.

Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", sec. 4.1:
eq. 3 (the objective), eq. 4 (the KL estimator) and sec. 4.1.2 (outcome supervision: a response's normalised reward
is the advantage of every one of its tokens). Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
Perspective" (Dr. GRPO), sec. 3.1 and fig. 1: dividing by the group's reward std biases the update towards questions
that are too easy or too hard, dividing each response's sum by its own length biases it towards long wrong answers
and short right ones; Dr. GRPO drops both divisions.

Per-token tensors are `(B, T)` aligned to next-token targets, masks bool with True = counts; the B = N * G rows hold
N prompts' groups of G samples, each group contiguous (`PromptBatch.repeat_interleave`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from neuraflux.alignment.stats import check_mask, check_same_shape, kl_penalty, masked_mean, masked_sum

# how the per-token loss becomes one number, by the paper that uses it:
#   grpo     mean over responses of each response's mean over its tokens (Shao et al. 2024, eq. 3: 1/G sum 1/|o_i|)
#   dr_grpo  sum over every token / (responses * max_tokens), a constant (Liu et al. 2025: no 1/|o_i|)
#   dapo     sum over every token / the number of tokens (Yu et al. 2025, "DAPO", sec. 3.3: token-level loss)
GRPO_LOSS_AGGREGATIONS: tuple[str, ...] = ("grpo", "dr_grpo", "dapo")

# Added to the group's std before dividing (as TRL does), so a group whose rewards are all equal gets advantage 0.
GROUP_STD_EPS = 1e-4


class GRPOLossOutput(NamedTuple):
    loss: Tensor  # scalar: the clipped surrogate plus beta * k3, aggregated
    policy_loss: Tensor  # scalar, detached: the clipped surrogate alone, aggregated alike
    kl: Tensor  # scalar, detached: mean per-token k3 KL(policy || reference) over the valid tokens
    clipfrac: Tensor  # scalar, detached: share of valid tokens where the clipped term is chosen


def check_group_size(group_size: int) -> None:
    """ValueError unless group_size is an integer >= 2: one sample is its own group mean."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(
            f"group_size must be an integer >= 2, got {group_size!r}: a group of one is its own mean, so its "
            "advantage is always 0 (and its reward std, which scale_rewards divides by, undefined)"
        )


def check_groups(values: Tensor, group_size: int) -> None:
    """Raise unless `values` is `(N * group_size,)` with N >= 1 and group_size an integer >= 2."""
    check_group_size(group_size)
    if values.dim() != 1 or values.numel() == 0 or values.numel() % group_size != 0:
        raise ValueError(
            f"GRPO expects (N * group_size,) values with group_size={group_size}, got shape {tuple(values.shape)}"
        )


def group_advantages(
    rewards: Tensor, group_size: int, scale_rewards: bool = True, eps: float = GROUP_STD_EPS
) -> Tensor:
    """Group-relative advantages: `(N * G,)` rewards -> `(N * G,)`, each group's G samples contiguous.

    A_i = (r_i - mean(group)) / (std(group) + eps) (Shao et al. 2024, sec. 4.1.2), the std with Bessel's correction
    as TRL and verl compute it; `scale_rewards=False` is Dr. GRPO's A_i = r_i - mean(group) (Liu et al. 2025,
    sec. 3.1). Either way each group's advantages sum to 0, and a group of equal rewards gets 0 everywhere.
    """
    check_groups(rewards, group_size)
    grouped = rewards.float().view(-1, group_size)  # (N, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """`(N * G,)` -> `(N,)`: each group's reward std (Bessel-corrected, as `group_advantages` divides by)."""
    check_groups(rewards, group_size)
    return rewards.float().view(-1, group_size).std(dim=1)


def aggregate_tokens(per_token: Tensor, mask: Tensor, how: str = "grpo", max_tokens: int | None = None) -> Tensor:
    """One scalar from a `(B, T)` per-token loss over the valid tokens, as `how` (one of `GRPO_LOSS_AGGREGATIONS`) says.

    grpo: (1/B) sum_i (1/|o_i|) sum_t x_it, each response weighs the same whatever its length (Shao et al. 2024,
    eq. 3); dr_grpo: (1/(B * max_tokens)) sum_i sum_t x_it, each token weighs the same and the divisor is a constant
    (Liu et al. 2025); dapo: sum_i sum_t x_it / sum_i |o_i|, each token weighs the same within the batch (Yu et al.
    2025, "DAPO", sec. 3.3).
    """
    check_mask(per_token, mask)
    if how == "grpo":
        return masked_mean(per_token, mask, dim=-1).mean()
    if how == "dapo":
        return masked_mean(per_token, mask)
    if how == "dr_grpo":
        if max_tokens is None or max_tokens < 1:
            raise ValueError(f"dr_grpo aggregation divides by max_tokens (the generation budget), got {max_tokens}")
        return masked_sum(per_token, mask) / (per_token.shape[0] * max_tokens)
    raise ValueError(f"loss aggregation must be one of {list(GRPO_LOSS_AGGREGATIONS)}, got {how!r}")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    aggregation: str = "grpo",
    max_tokens: int | None = None,
) -> GRPOLossOutput:
    """The negated GRPO objective (Shao et al. 2024, eq. 3) over `(B, T)` tokens -> scalar loss and metrics.

    Per token: -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta * k3, with r = exp(logp - logp_old) per token (the
    sampling policy's log-probs as old), A the response's advantage `(B,)` on each of its tokens, and
    k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 (eq. 4, Schulman's estimator, `kl_penalty(..., "k3")`), whose
    gradient pulls the policy towards the reference. Then `aggregate_tokens(..., aggregation, max_tokens)`.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    check_mask(logprobs, mask)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (B,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    if clip_eps <= 0 or beta < 0:
        raise ValueError(f"grpo_loss needs clip_eps > 0 and beta >= 0, got clip_eps={clip_eps}, beta={beta}")
    adv = advantages.detach()[:, None]  # (B, 1): every token of a response gets its advantage
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = torch.maximum(unclipped, clipped)  # (B, T)
    kl = kl_penalty(logprobs, ref_logprobs.detach(), "k3")  # (B, T)
    loss = aggregate_tokens(surrogate + beta * kl, mask, aggregation, max_tokens)
    return GRPOLossOutput(
        loss,
        aggregate_tokens(surrogate.detach(), mask, aggregation, max_tokens),
        masked_mean(kl.detach(), mask),
        masked_mean((clipped > unclipped).float(), mask).detach(),
    )
