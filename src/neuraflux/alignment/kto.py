"""The KTO loss (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") as a pure
function of sequence log-probs: unpaired examples, each labelled desirable or undesirable, scored against a
reference point z0 estimated on mismatched (prompt, completion) pairs.

Conventions are those of `neuraflux.alignment.losses`: `(B,)` sequence log-probs, bool masks with True = counts,
per-example losses un-reduced (the caller chooses the reduction), metrics and targets detached.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from neuraflux.alignment.stats import check_same_shape


class KTOOutput(NamedTuple):
    losses: Tensor  # (B,) weighted per-example losses
    rewards: Tensor  # (B,) beta * (policy - reference) log-ratio of each example's completion, detached
    reference_point: Tensor  # scalar z0, detached


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """z0 = max(0, mean(policy - reference)) over mismatched pairs `(N,)` each -> scalar, detached.

    The paper's biased estimate of KL(pi_theta(y'|x) || pi_ref(y'|x)) in the KTO loss: each prompt x_i is paired with
    the completion of another example of the batch, so y' is a plausible but unrelated output; the mean log-ratio
    over those pairs, floored at 0 (a KL is not negative), is the point gains and losses are measured from. It is
    detached: z0 is a baseline, not something the policy is trained to move (TRL detaches it too).
    """
    check_same_shape(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        raise ValueError("kto reference point: no mismatched pairs to estimate the KL from")
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0.0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """Per-example KTO losses from sequence log-probs: `(B,)`, `(B,)`, `(B,)` bool, scalar z0 -> `KTOOutput`.

    Ethayarajh et al. 2024 (arXiv 2402.01306), the KTO loss: eq. 7 as TRL's KTOTrainer cites it. With the implied
    reward r = log pi_theta(y|x) - log pi_ref(y|x) and z0 from `kto_reference_point`:
    - desirable y:   lambda_D * (1 - sigma(beta * (r - z0)))
    - undesirable y: lambda_U * (1 - sigma(beta * (z0 - r)))
    which is lambda_y - v(x, y), the paper's loss, per example. The mean over the batch (desirable and undesirable
    together) is the training loss; the weights rebalance unequal class counts (the paper keeps
    lambda_D n_D / (lambda_U n_U) in [1, 4/3]: eq. 8 as TRL cites it). Rewards are beta * r, detached; gradients
    reach only the policy log-probs.
    """
    if beta <= 0:
        raise ValueError(f"kto beta must be > 0, got {beta}")
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not weight > 0:
            raise ValueError(f"kto {name} must be > 0, got {weight}")
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise TypeError(f"kto desirable must be a bool tensor (True = desirable), got {desirable.dtype}")
    if reference_point.dim() != 0:
        raise ValueError(f"kto reference_point must be a scalar, got shape {tuple(reference_point.shape)}")
    # The reference and z0 are fixed by definition: detaching keeps a caller's stray graph from training them.
    logratio = policy_logps - ref_logps.detach()
    z0 = reference_point.detach()
    gain = beta * torch.where(desirable, logratio - z0, z0 - logratio)  # the sigmoid's argument, either side
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(logratio.dtype)
    losses = weights * (1.0 - torch.sigmoid(gain))
    return KTOOutput(losses, beta * logratio.detach(), z0)
