"""Masked statistics over padded `(B, T)` tensors, per-token KL estimators and KL-coefficient controllers.

Masks are bool with `True` marking a position that counts. Every mean over a padded tensor goes through
`neuraflux.masking.masked_mean` (re-exported here), so padding is handled (and tested) in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from neuraflux.masking import check_mask, masked_mean, masked_sum  # noqa: F401  (alignment's API too)

KL_KINDS: tuple[str, ...] = ("k1", "k3", "abs", "mse")

# Added to the variance before the square root when whitening, as in TRL, so a constant input stays finite.
WHITEN_EPS = 1e-8


def check_same_shape(**tensors: Tensor) -> None:
    """Raise naming the arguments whose shapes differ from the first one's."""
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first} has shape {tuple(ref.shape)}")


class RunningMoments(torch.nn.Module):
    """Mean and variance of K quantities over every batch seen so far, as float64 buffers (saved in checkpoints).

    `update` merges a (K, B) batch in with Chan, Golub and LeVeque's pairwise formula (1979), so the result equals
    the moments of all values seen at once, in any batching. `standardize` divides by the population standard
    deviation floored at `min_std`, so a near-constant quantity does not turn rounding into signal.
    """

    def __init__(self, k: int, min_std: float):
        super().__init__()
        self.min_std = min_std
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(k, dtype=torch.float64))  # sum of squared deviations from the mean

    def update(self, values: Tensor) -> None:
        """values (K, B)."""
        v = values.detach().to(self.mean)
        n = v.shape[1]
        batch_mean = v.mean(1)
        batch_m2 = (v - batch_mean[:, None]).square().sum(1)
        total = self.count + n
        delta = batch_mean - self.mean
        self.m2 += batch_m2 + delta.square() * self.count * n / total
        self.mean += delta * n / total
        self.count.fill_(total)

    @property
    def std(self) -> Tensor:
        return (self.m2 / self.count.clamp_min(1)).sqrt()

    def standardize(self, values: Tensor) -> Tensor:
        """(values - mean) / max(std, min_std), (K, B) in values' dtype; before any update, by the batch's own."""
        if self.count == 0:
            mean, std = values.double().mean(1), values.double().std(1, correction=0)
        else:
            mean, std = self.mean, self.std
        return ((values.double() - mean[:, None]) / std.clamp_min(self.min_std)[:, None]).to(values.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over all positions where `mask` is True (scalar).

    `unbiased` applies Bessel's correction n / (n - 1), as TRL's `masked_var` does; it needs at least two valid
    positions, and at least one is needed either way.
    """
    check_mask(x, mask)
    n = int(mask.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(
            f"masked_var needs at least {2 if unbiased else 1} valid positions"
            f"{' for the unbiased estimate' if unbiased else ''}, the mask has {n}"
        )
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise `x` to zero mean and unit variance using only the valid positions; masked positions become 0.

    PPO whitens advantages over all valid tokens of a batch (as TRL does). With `shift_mean=False` only the
    scale changes and the original mean is kept (used for whitening rewards). Shape is preserved.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    Schulman, "Approximating KL divergence" (2020): with p the policy, q the reference and r = q / p,
    k1 = log p - log q (unbiased, can be negative), k3 = (r - 1) - log r (unbiased, always >= 0, low variance).
    "abs" = |log p - log q| and "mse" = 0.5 (log p - log q)^2 are TRL's biased alternatives.
    logprobs, ref_logprobs: `(B, T)` (any equal shapes) -> same shape. Masking is the caller's job.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl_penalty kind must be one of {list(KL_KINDS)}, got {kind!r}")
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = logprobs - ref_logprobs  # log p - log q
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        # log r = log q - log p = -log_ratio
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    return 0.5 * log_ratio.square()


@dataclass
class AdaptiveKLController:
    """KL coefficient that tracks a target KL (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", eq. 2): e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + e * n_steps / horizon).
    """

    init_kl_coef: float
    target: float
    horizon: float
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if self.init_kl_coef <= 0:
            raise ValueError(f"AdaptiveKLController init_kl_coef must be > 0, got {self.init_kl_coef}")
        if self.target <= 0:
            raise ValueError(f"AdaptiveKLController target must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {self.horizon}")
        self.value = float(self.init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient towards keeping `current_kl` at the target; returns the new value."""
        # The clip keeps one noisy KL reading from moving beta by more than 20% per horizon.
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclass
class FixedKLController:
    """A constant KL coefficient with the same interface as `AdaptiveKLController`."""

    kl_coef: float
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if self.kl_coef < 0:
            raise ValueError(f"FixedKLController kl_coef must be >= 0, got {self.kl_coef}")
        self.value = float(self.kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """The coefficient never changes; returns it so callers treat both controllers alike."""
        return self.value
