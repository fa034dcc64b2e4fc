"""Multi-objective rewards as pure tensor functions: a shaping term, a weighted combination, and constrained
optimisation by a Lagrangian with projected dual ascent on its multipliers.

`neuraflux.feedback.rewards.CompositeReward` computes the components and calls these.
"""

from __future__ import annotations

import torch
from torch import Tensor


def length_score(lengths: Tensor, stopped: Tensor, target: int, limit: int) -> Tensor:
    """(B,) in [0, 1]: 1 for at most `target` tokens, linearly down to 0 at `limit`; 0 when not `stopped`.

    lengths: (B,) content tokens; stopped: (B,) bool. target 4, limit 8: lengths 2, 6, 8 (stopped) give 1, 0.5, 0.
    """
    over = (lengths.float() - target).clamp_min(0.0) / (limit - target)
    return torch.where(stopped, (1.0 - over).clamp_min(0.0), torch.zeros_like(over))


def combine_weighted(values: Tensor, weights: Tensor) -> Tensor:
    """sum_k w_k v_k: (K, B) component values and (K,) weights -> (B,) rewards."""
    return (weights.to(values)[:, None] * values).sum(0)


def lagrangian(objective: Tensor, constrained: Tensor, multipliers: Tensor, thresholds: Tensor) -> Tensor:
    """The Lagrangian's per-sample value: objective + sum_j lambda_j (v_j - c_j).

    objective: (B,) weighted sum; constrained: (J, B) values of the constrained components; multipliers,
    thresholds: (J,). Maximising its expectation over the policy is the primal step of
    max E[objective] s.t. E[v_j] >= c_j (Altman 1999, "Constrained Markov Decision Processes", ch. 3).
    """
    lam, c = multipliers.to(constrained), thresholds.to(constrained)
    return objective + (lam[:, None] * (constrained - c[:, None])).sum(0)


def dual_ascent_step(multipliers: Tensor, means: Tensor, thresholds: Tensor, lr: float, max_value: float) -> Tensor:
    """Projected gradient step on the dual: lambda_j <- clip(lambda_j + lr (c_j - E[v_j]), 0, max_value), (J,).

    A violated constraint (mean below its threshold) raises its multiplier, a slack one lowers it towards 0;
    the cap keeps one long violation from scaling the reward without bound.
    """
    return (multipliers + lr * (thresholds - means)).clamp(0.0, max_value)
