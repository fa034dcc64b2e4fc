"""Reward sources as plain callables: `reward(rollout) -> (B,)` float32, one scalar per sampled response.

* `JudgeReward`: the world's rule-based judges on the decoded response, a weighted sum of helpfulness,
  harmlessness and honesty (each in [0, 1]); a single judge is the sum with the other weights at 0.
* `RewardModelReward`: a trained reward model's score of the whole sequence (prompt, response, stop token).
* `WeightedSum`: several sources added with weights.
* `make_reward`: what a stage's `reward_source` (judges | reward_model | both) names, checked before any work.

Any callable with the same signature works as a reward (tests use a toy one that counts a token).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from neuraflux.alignment.reward_model import NanoRewardModel, check_same_tokenizer
from neuraflux.alignment.rollout import Rollout, freeze
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import World, WorldConfig, generate_world, judge

log = logging.getLogger(__name__)

RewardFn = Callable[[Rollout], Tensor]

JUDGES: tuple[str, ...] = ("helpfulness", "harmlessness", "honesty")
REWARD_SOURCES: tuple[str, ...] = ("judges", "reward_model", "both")


def check_judge_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(JUDGES))
    if unknown:
        raise ValueError(f"stage.module.judge_weights: unknown judges {unknown}; choose from {list(JUDGES)}")
    weights = {k: float(v) for k, v in weights.items()}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"stage.module.judge_weights must be >= 0 with at least one > 0, got {weights}")
    return weights


@dataclass
class JudgeReward:
    """Weighted sum of the world's judges on (rendered prompt, decoded response); in [0, sum of weights]."""

    world: World
    weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(JUDGES, 1.0))

    def __post_init__(self) -> None:
        self.weights = check_judge_weights(self.weights)

    def __call__(self, rollout: Rollout) -> Tensor:
        values = []
        for prompt, response in zip(rollout.prompts, rollout.responses, strict=True):
            scores = judge(prompt, response, self.world)
            values.append(sum(w * getattr(scores, name) for name, w in self.weights.items()))
        return torch.tensor(values, dtype=torch.float32, device=rollout.input_ids.device)


@dataclass
class RewardModelReward:
    """A frozen reward model's score of each full sequence: `model.score(input_ids, attention_mask)`, (B,)."""

    model: nn.Module

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> Tensor:
        return self.model.score(rollout.input_ids, rollout.attention_mask).float()


@dataclass(frozen=True)
class RewardTerm:
    fn: RewardFn
    weight: float = 1.0


@dataclass
class WeightedSum:
    """sum_i weight_i * reward_i(rollout)."""

    terms: list[RewardTerm]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("WeightedSum needs at least one reward term")

    def __call__(self, rollout: Rollout) -> Tensor:
        return torch.stack([t.weight * t.fn(rollout).float() for t in self.terms]).sum(0)


def load_reward_model(path: str | Path, tokenizer) -> nn.Module:
    """A frozen `NanoRewardModel` from its directory; its tokenizer must be the policy's."""
    path = Path(path)
    model = NanoRewardModel.from_pretrained(path)
    check_same_tokenizer(NanoTokenizer.load(path), tokenizer, f"stage.reward_model ({path})")
    return freeze(model)


@dataclass
class RewardSetup:
    """The reward callable and the frozen reward model inside it (None for judges only), for device moves."""

    fn: RewardFn
    reward_model: nn.Module | None = None


def make_reward(
    source: str,
    tokenizer,
    world: Mapping | None = None,
    reward_model_path: str | None = None,
    judge_weights: Mapping[str, float] | None = None,
    reward_model_weight: float = 1.0,
) -> RewardSetup:
    """The reward for `stage.module.reward_source`; every setting is checked before a model is loaded."""
    if source not in REWARD_SOURCES:
        raise ValueError(f"stage.module.reward_source must be one of {list(REWARD_SOURCES)}, got {source!r}")
    uses_model, uses_judges = source in ("reward_model", "both"), source in ("judges", "both")
    if uses_model:
        if not reward_model_path:
            raise ValueError(
                f"stage.reward_model must name a reward model directory when reward_source={source!r}; "
                "pass stage.reward_model=PATH (or use reward_source=judges)"
            )
        if not Path(reward_model_path).exists():
            raise FileNotFoundError(f"stage.reward_model: {reward_model_path} does not exist")
    if uses_judges and world is None:
        raise ValueError(f"stage.module.world must hold the world config when reward_source={source!r}")
    weights = check_judge_weights(judge_weights if judge_weights is not None else dict.fromkeys(JUDGES, 1.0))
    terms, reward_model = [], None
    if uses_judges:
        terms.append(RewardTerm(JudgeReward(generate_world(WorldConfig(**dict(world))), weights)))
    if uses_model:
        reward_model = load_reward_model(reward_model_path, tokenizer)
        terms.append(RewardTerm(RewardModelReward(reward_model), reward_model_weight))
    fn = terms[0].fn if len(terms) == 1 and terms[0].weight == 1.0 else WeightedSum(terms)
    return RewardSetup(fn, reward_model)
