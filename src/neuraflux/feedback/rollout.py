"""Rollouts: sample responses with the one generation function, then score them for policy-gradient stages.

A `Rollout` holds full sequences (left-padded prompt, then response) and per-token tensors `(B, T)` with
T = L - 1, aligned to next-token targets: column t belongs to the token `input_ids[:, t + 1]`. Because
prompts are left-padded, every row's response starts at target column P - 1 (P = padded prompt length). A
response runs up to and including its first stop token (`<|end|>` or `<|eos|>`); generation pads after it.

Shared by PPO, REINFORCE and later stages: sampling settings, the frozen reference, KL-shaped rewards.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from neuraflux.alignment.losses import token_logprobs
from neuraflux.alignment.stats import AdaptiveKLController, FixedKLController, kl_penalty, masked_sum
from neuraflux.data.prompts import PromptBatch
from neuraflux.masking import last_token_index
from neuraflux.model import NanoLM, generate
from neuraflux.model.io import freeze, load_pretrained

log = logging.getLogger(__name__)

KL_CONTROLLERS: tuple[str, ...] = ("fixed", "adaptive")


@dataclass(frozen=True)
class SamplingSettings:
    """How rollouts are sampled; validated once, naming the config key."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"stage.module.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature <= 0:
            raise ValueError(f"stage.module.temperature must be > 0 for sampled rollouts, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"stage.module.top_k must be a positive integer or null, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"stage.module.top_p must be in (0, 1] or null, got {self.top_p}")


@dataclass(frozen=True)
class KLSettings:
    """The KL penalty to the frozen reference: estimator, controller and its coefficient."""

    estimator: str = "k1"
    controller: str = "fixed"
    coef: float = 0.05
    target: float = 6.0  # adaptive only: the KL (summed over a response) the coefficient steers towards
    horizon: float = 10_000.0  # adaptive only: samples over which the coefficient adapts

    def __post_init__(self) -> None:
        if self.estimator not in ("k1", "k3"):
            raise ValueError(f"stage.module.kl_estimator must be one of ['k1', 'k3'], got {self.estimator!r}")
        if self.controller not in KL_CONTROLLERS:
            raise ValueError(
                f"stage.module.kl_controller must be one of {list(KL_CONTROLLERS)}, got {self.controller!r}"
            )
        if self.coef < 0 or (self.controller == "adaptive" and self.coef == 0):
            raise ValueError(f"stage.module.kl_coef must be >= 0 (> 0 when adaptive), got {self.coef}")

    def controller_object(self) -> AdaptiveKLController | FixedKLController:
        if self.controller == "adaptive":
            return AdaptiveKLController(self.coef, self.target, self.horizon)
        return FixedKLController(self.coef)


@dataclass
class Rollout:
    """Sampled responses and everything the update needs; B rows, L = P + R columns, T = L - 1 targets."""

    prompt_ids: Tensor  # (B, P) long, left-padded
    prompt_mask: Tensor  # (B, P) bool
    response_ids: Tensor  # (B, R) long: sampled tokens, padding after the stop token
    input_ids: Tensor  # (B, L) long: prompt_ids then response_ids
    attention_mask: Tensor  # (B, L) bool: real prompt tokens and response tokens up to the stop token
    response_mask: Tensor  # (B, T) bool: target column t is a response token
    logprobs: Tensor  # (B, T) float32: the policy's log-probs of the targets when sampled (no grad)
    entropy: Tensor  # (B, T) float32: entropy of the policy's next-token distribution
    prompts: list[str]  # rendered prompts
    responses: list[str]  # decoded responses, stop token and special tokens dropped
    ref_logprobs: Tensor | None = None  # (B, T) float32: the frozen reference's log-probs
    values: Tensor | None = None  # (B, T) float32: value-head estimates (PPO)
    scores: Tensor | None = None  # (B,) float32: the scalar reward of each response
    kl: Tensor | None = None  # (B, T) float32: per-token KL estimate, 0 off the response
    rewards: Tensor | None = None  # (B, T) float32: -kl_coef * kl, plus the score at the last response token
    # a composite reward's components: name -> (B,) raw values (empty for a single reward)
    components: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def targets(self) -> Tensor:
        return self.input_ids[:, 1:]  # (B, T)

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1)  # (B,)

    def select(self, index: Tensor) -> Rollout:
        """The rows in `index` (a (n,) long tensor), every field sliced alike."""
        rows = index.tolist()
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                picked[f.name] = value[index.to(value.device)]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in rows]
            elif isinstance(value, dict):
                picked[f.name] = {k: v[index.to(v.device)] for k, v in value.items()}
            else:
                picked[f.name] = value
        return Rollout(**picked)


@dataclass
class PolicyOutput:
    logprobs: Tensor  # (B, T) float32
    values: Tensor | None  # (B, T) float32 when a value head is given
    entropy: Tensor | None  # (B, T) float32 when asked for


def policy_forward(
    policy: NanoLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    value_head: nn.Module | None = None,
    with_entropy: bool = False,
) -> PolicyOutput:
    """Log-probs of each next token (and values, entropy) for (B, L) sequences -> (B, L - 1) tensors.

    Logits are divided by the sampling temperature, so the log-probs are those of the distribution the tokens
    were drawn from (the PPO ratio compares like with like). Rollout scoring and the update both call this.
    """
    hidden = policy.transformer(input_ids[:, :-1], attention_mask[:, :-1])  # (B, T, C)
    logits = policy.lm_head(hidden)  # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = token_logprobs(logits, input_ids[:, 1:])
    values = value_head(hidden).squeeze(-1).float() if value_head is not None else None  # (B, T)
    entropy = None
    if with_entropy:
        logp = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    return PolicyOutput(logprobs, values, entropy)


def response_validity(response_ids: Tensor, stop_ids: Tensor) -> Tensor:
    """(B, R) bool: a position is part of the response up to and including the row's first stop token."""
    stop = torch.isin(response_ids, stop_ids).long()
    return (stop.cumsum(-1) - stop) == 0  # no stop strictly before this position


@torch.no_grad()
def generate_rollouts(
    policy: NanoLM,
    tokenizer,
    prompts: PromptBatch,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    reference: NanoLM | None = None,
    value_head: nn.Module | None = None,
) -> Rollout:
    """Sample one response per prompt (KV-cached, batched, stopping at `<|end|>`/`<|eos|>`), then score the
    sequences with one no-grad forward of the policy (log-probs, entropy, values) and one of the reference.

    Temperature 0 samples greedily; the log-probs are then those of the untempered policy. top-k / top-p
    shape the sampling only: log-probs come from the full tempered distribution (as TRL computes them).
    """
    device = policy.lm_head.weight.device
    prompt_ids, prompt_mask = prompts.input_ids.to(device), prompts.attention_mask.to(device).bool()
    stop_ids = torch.tensor([tokenizer.end_id, tokenizer.eos_id], device=device)
    seq = generate(
        policy,
        prompt_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        eos_token_id=stop_ids.tolist(),
        attention_mask=prompt_mask,
        generator=generator,
        pad_token_id=tokenizer.pad_id,
    )
    P = prompt_ids.shape[1]
    response_ids = seq[:, P:]  # (B, R), R <= max_new_tokens
    valid = response_validity(response_ids, stop_ids)  # (B, R)
    attention_mask = torch.cat([prompt_mask, valid], dim=1)  # (B, L)
    # target column t predicts token t + 1, so the response's first token is the target of column P - 1
    response_mask = torch.cat([torch.zeros_like(prompt_mask[:, 1:]), valid], dim=1)  # (B, L - 1)

    logit_temperature = temperature if temperature > 0 else 1.0
    was_training = policy.training
    policy.eval()  # the distribution the tokens were sampled from: no dropout, as generation had it
    try:
        out = policy_forward(policy, seq, attention_mask, logit_temperature, value_head, with_entropy=True)
    finally:
        policy.train(was_training)
    ref_logprobs = None
    if reference is not None:
        ref_logprobs = policy_forward(reference, seq, attention_mask, logit_temperature).logprobs

    keep = valid & ~torch.isin(response_ids, stop_ids)
    responses = [tokenizer.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(response_ids, keep)]
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        input_ids=seq,
        attention_mask=attention_mask,
        response_mask=response_mask,
        logprobs=out.logprobs,
        entropy=out.entropy,
        prompts=list(prompts.texts),
        responses=responses,
        ref_logprobs=ref_logprobs,
        values=out.values,
    )


def score_rollout(rollout: Rollout, scores: Tensor, kl_coef: float, kl_estimator: str = "k1") -> Rollout:
    """Attach scalar scores (B,), the per-token KL to the reference and the shaped per-token rewards.

    rewards[:, t] = -kl_coef * kl[:, t] on response tokens, plus the score at the last response token
    (Ziegler et al. 2019, eq. 2, as a per-token penalty the way TRL's PPO applies it).
    """
    if rollout.ref_logprobs is None:
        raise ValueError("score_rollout needs reference log-probs: pass `reference=` to generate_rollouts")
    B = len(rollout)
    scores = scores.detach().to(rollout.logprobs.device, torch.float32)
    if scores.shape != (B,):
        raise ValueError(f"the reward function returned shape {tuple(scores.shape)}; expected ({B},), one per row")
    mask = rollout.response_mask
    zero = torch.zeros((), device=mask.device)
    kl = torch.where(mask, kl_penalty(rollout.logprobs, rollout.ref_logprobs, kl_estimator), zero)  # (B, T)
    rewards = -kl_coef * kl
    rows = torch.arange(B, device=mask.device)
    rewards[rows, last_token_index(mask)] += scores
    return replace(rollout, scores=scores, kl=kl, rewards=rewards)


def sequence_kl(rollout: Rollout) -> Tensor:
    """(B,) KL estimate of each response: the per-token estimates summed over its tokens."""
    if rollout.kl is None:
        raise ValueError("sequence_kl needs a scored rollout (score_rollout)")
    return masked_sum(rollout.kl, rollout.response_mask, dim=-1)


def load_reference(reference_path: str | Path | None, policy: NanoLM, tokenizer) -> NanoLM:
    """The frozen reference policy: reloaded from `stage.init_from` when given (so a resumed run gets the
    initial policy, not the resumed one), else a copy of the policy as it is now."""
    if reference_path is None:
        return freeze(copy.deepcopy(policy))
    path = Path(reference_path)
    if not path.exists():
        raise FileNotFoundError(f"stage.init_from: {path} does not exist (the reference policy is loaded from it)")
    reference, ref_tokenizer = load_pretrained(path)
    if ref_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"stage.init_from: {path} has a different tokenizer than the policy being trained")
    return freeze(reference)


def check_rollout_fits(datamodule, max_new_tokens: int, policy: NanoLM) -> None:
    """Prompt plus response must fit the position table; checked when the trainer sets the stage up."""
    longest = getattr(datamodule, "max_prompt_tokens", 0) + max_new_tokens
    limit = policy.config.max_position_embeddings
    if longest > limit:
        raise ValueError(
            f"data.max_prompt_tokens + stage.module.max_new_tokens = {longest} exceeds "
            f"model.max_position_embeddings ({limit})"
        )
