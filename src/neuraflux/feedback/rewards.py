"""Reward sources as plain callables: `reward(rollout) -> (B,)` float32, one scalar per sampled response.

* `JudgeReward`: the world's rule-based judges on the decoded response, a weighted sum of helpfulness,
  harmlessness and honesty (each in [0, 1]); a single judge is the sum with the other weights at 0.
* `RewardModelReward`: a trained reward model's score of the whole sequence (prompt, response, stop token).
* `make_reward`: what a stage's `reward_source` (judges | reward_model | both) names, checked before any work;
  `both` is a `CompositeReward` of the two.

Multi-task components (`stage=multitask`), each in [0, 1] except the reward model's score:

* helpfulness, harmlessness, honesty: one world judge each (`JudgeReward` with a single weight);
* reward_model: `RewardModelReward`;
* length (`LengthReward`): 1 up to `target` content tokens, falling linearly to 0 at `max_new_tokens`, and 0 for
  a response cut off without a stop token. Every good answer in the default world is at most 39 tokens (BPE), so
  with the default target of 40 the term penalises rambling, looping and truncation (unsafe compliance runs
  ~60 tokens), not a complete answer;
* format (`FormatReward`): half for ending with the stop token, half for repeating no word n-gram (n = 5 by
  default; no good answer in the world repeats one, degenerate loops do).

`CompositeReward` computes every component on each rollout, keeps them for logging, standardises each by its
running mean and standard deviation (so a weight is a share of the signal, whatever the component's scale) and
combines them by `combine`: `weighted_sum` (sum_i w_i z_i / sum_i w_i), or `lagrangian`: maximise that subject
to E[r_j] >= c_j for the thresholded components (raw values), with multipliers lambda_j >= 0 updated by projected
dual ascent after every training step. The math is in the pure functions `combine_weighted`, `lagrangian` and
`dual_ascent_step`.

Any callable with the same signature works as a reward (tests use a toy one that counts a token).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from neuraflux.alignment.combine import combine_weighted, dual_ascent_step, lagrangian, length_score
from neuraflux.alignment.stats import RunningMoments
from neuraflux.feedback.rollout import Rollout
from neuraflux.model.io import freeze
from neuraflux.model.reward import NanoRewardModel, check_same_tokenizer
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import World, WorldConfig, generate_world, judge
from neuraflux.world.judges import JUDGES
from neuraflux.world.lexicon import normalize_text

log = logging.getLogger(__name__)

RewardFn = Callable[[Rollout], Tensor]

REWARD_SOURCES: tuple[str, ...] = ("judges", "reward_model", "both")


# every judge weighted 1: a stage's default `judge_weights` (read-only, so a shared default cannot be changed)
EQUAL_JUDGES: Mapping[str, float] = MappingProxyType(dict.fromkeys(JUDGES, 1.0))


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
    """A frozen reward model's score of each full sequence, (B,): `model.score` of the rollout's token ids, or, for a
    model trained on prompts with retrieved context (`model.retrieve_context`), of the prompt texts given the
    retriever's top document where they have no context, re-encoded with the response texts as in training."""

    model: nn.Module
    tokenizer: Any = None
    retriever: Any = None

    def __post_init__(self) -> None:
        if getattr(self.model, "retrieve_context", False) and (self.tokenizer is None or self.retriever is None):
            raise ValueError(
                "this reward model was trained on prompts with retrieved context (data.retrieve_context=true): "
                "scoring with it needs the world's retriever and the tokenizer (stage.module.world must be set)"
            )

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> Tensor:
        return self.score(rollout.prompts, rollout.responses, rollout.input_ids, rollout.attention_mask)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if not getattr(self.model, "retrieve_context", False):
            return self.model.score(input_ids, attention_mask).float()
        from neuraflux.data.preference_batches import encode_scored
        from neuraflux.rag import add_retrieved_context

        ids, mask = encode_scored(
            self.tokenizer, add_retrieved_context(prompts, self.retriever), responses, self.model.config.block_size
        )
        return self.model.score(ids.to(input_ids.device), mask.to(input_ids.device)).float()


def load_reward_model(path: str | Path, tokenizer) -> nn.Module:
    """A frozen `NanoRewardModel` from its directory; its tokenizer must be the policy's."""
    path = Path(path)
    model = NanoRewardModel.from_pretrained(path)
    check_same_tokenizer(NanoTokenizer.load(path), tokenizer, f"stage.reward_model ({path})")
    return freeze(model)


def reward_model_reward(reward_model: nn.Module, tokenizer, world) -> RewardModelReward:
    """`RewardModelReward` for a loaded reward model; one trained with retrieved context gets a retriever over
    `world` (a World or its config), the store its training prompts were given context from."""
    if not getattr(reward_model, "retrieve_context", False):
        return RewardModelReward(reward_model)
    if world is None:
        raise ValueError(
            "the reward model was trained on prompts with retrieved context (data.retrieve_context=true): "
            "stage.module.world must hold the world config to retrieve from"
        )
    from neuraflux.rag import world_retriever
    from neuraflux.retrieval.documents import retrieval_settings

    built = world if isinstance(world, World) else generate_world(WorldConfig.from_dict(world))
    # the store it was trained with (a model saved before the settings were recorded: the defaults, as then)
    settings = retrieval_settings(getattr(reward_model, "retrieval", None))
    return RewardModelReward(reward_model, tokenizer, world_retriever(built, settings))


def make_reward(
    source: str,
    tokenizer,
    world: Mapping | None = None,
    reward_model_path: str | None = None,
    judge_weights: Mapping[str, float] | None = None,
    reward_model_weight: float = 1.0,
) -> RewardFn:
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
    if source == "both":
        reward_model_weight = _positive(reward_model_weight, "stage.module.reward_model_weight", allow_zero=True)
    components: dict[str, RewardFn] = {}
    if uses_judges:
        components["judges"] = JudgeReward(generate_world(WorldConfig.from_dict(world)), weights)
    if uses_model:
        reward_model = load_reward_model(reward_model_path, tokenizer)
        components["reward_model"] = reward_model_reward(reward_model, tokenizer, world)
    if len(components) == 1:
        return next(iter(components.values()))
    # judges in [0, 3] beside a reward-model score of about -40: standardised, so the weights are the shares
    return CompositeReward(components, {"judges": 1.0, "reward_model": reward_model_weight})


def reward_model_of(reward: RewardFn) -> nn.Module | None:
    """The frozen reward model a reward scores with, if any (a stage moves it to its device with the reference)."""
    if isinstance(reward, RewardModelReward):
        return reward.model
    if isinstance(reward, CompositeReward):
        return next((m for c in reward.components.values() if (m := reward_model_of(c)) is not None), None)
    return None


def evaluate_reward(reward: RewardFn, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
    """A reward's (B,) scores of a rollout, and each component's (B,) raw values when it is a composite (else {})."""
    if isinstance(reward, CompositeReward):
        out = reward.evaluate(rollout)
        return out.reward, out.values
    return reward(rollout), {}


# ---- multi-task components and their composition ----------
COMPONENTS: tuple[str, ...] = (*JUDGES, "reward_model", "length", "format")
COMBINE_FORMS: tuple[str, ...] = ("weighted_sum", "lagrangian")
# Components bounded in [0, 1]: a threshold outside that range could never be met (or always is).
BOUNDED: tuple[str, ...] = tuple(c for c in COMPONENTS if c != "reward_model")


def response_stats(rollout: Rollout, stop_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) long content lengths (response tokens before the stop token) and (B,) bool "ended with a stop token"."""
    R = rollout.response_ids.shape[1]
    valid = rollout.response_mask[:, -R:]  # (B, R): the response's target columns are the last R
    stop = torch.isin(rollout.response_ids, stop_ids.to(rollout.response_ids.device)) & valid
    return (valid & ~stop).sum(-1), stop.any(-1)


def repeats_ngram(text: str, n: int) -> bool:
    """Whether any word n-gram (normalised words) occurs twice in `text`."""
    words = normalize_text(text).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def format_score(stopped: Tensor, responses: list[str], n: int) -> Tensor:
    """(B,) in {0, 0.5, 1}: 0.5 for ending with the stop token plus 0.5 for repeating no word n-gram."""
    fresh = torch.tensor([not repeats_ngram(r, n) for r in responses], device=stopped.device)
    return 0.5 * stopped.float() + 0.5 * fresh.float()


@dataclass
class LengthReward:
    """`length_score` of each response: concise and finished, rather than rambling or cut off."""

    stop_ids: tuple[int, ...]
    target: int
    limit: int  # the rollouts' max_new_tokens

    def __call__(self, rollout: Rollout) -> Tensor:
        lengths, stopped = response_stats(rollout, torch.tensor(self.stop_ids))
        return length_score(lengths, stopped, self.target, self.limit)


@dataclass
class FormatReward:
    """`format_score` of each response: ends with its stop token, repeats no word `ngram`-gram."""

    stop_ids: tuple[int, ...]
    ngram: int = 5

    def __call__(self, rollout: Rollout) -> Tensor:
        _, stopped = response_stats(rollout, torch.tensor(self.stop_ids))
        return format_score(stopped, rollout.responses, self.ngram)


@dataclass
class CompositeOutput:
    """What one call of a `CompositeReward` computed: every component's (B,) values and the (B,) reward."""

    values: dict[str, Tensor]
    reward: Tensor

    def means(self) -> dict[str, float]:
        return {name: float(v.mean()) for name, v in self.values.items()}


class CompositeReward(nn.Module):
    """Several reward components, all computed on each rollout, combined into one (B,) reward.

    Components live on different scales (judges in [0, 1], a reward model's score around -40 with a spread of a
    few points), so each is standardised before the weighted sum: its values minus the running mean, divided by
    the running standard deviation (floored at `MIN_STD`), both over every value of that component on this
    stage's training rollouts so far, the current rollout included (`RunningMoments`; validation reads the
    moments without updating them). The weights are then divided by their sum: the reward is a weighted mean of
    unit-variance signals, and a weight is the share of the reward's signal its component claims, whatever the
    component's raw scale.

    `weights` may omit components (weight 0: computed and logged, not rewarded). With `combine="lagrangian"`,
    `thresholds` names the constrained components, whose raw values enter the Lagrangian (the thresholds are in
    their units); `update_multipliers` takes one dual-ascent step and is the stage's to call once per training
    step (never from validation). `evaluate` returns the raw values with the reward (a stage logs them). An
    nn.Module so that it follows the stage's train/eval mode and its moments are saved in checkpoints.
    """

    MIN_STD = 0.05

    def __init__(
        self,
        components: dict[str, RewardFn],
        weights: Mapping[str, float],
        combine: str = "weighted_sum",
        thresholds: Mapping[str, float] | None = None,
        lagrange_lr: float = 1.0,
        lagrange_max: float = 10.0,
        lagrange_init: float = 0.0,
    ):
        super().__init__()
        thresholds = dict(thresholds or {})
        unknown = sorted((set(weights) | set(thresholds)) - set(components))
        if unknown:
            raise ValueError(
                f"CompositeReward: weights/thresholds name {unknown}, not among the components {sorted(components)}"
            )
        if combine not in COMBINE_FORMS:
            raise ValueError(f"stage.module.combine must be one of {list(COMBINE_FORMS)}, got {combine!r}")
        total = sum(float(w) for w in weights.values())
        if total <= 0:
            raise ValueError(f"CompositeReward: the weights must sum to > 0, got {dict(weights)}")
        self.components, self.combine, self.thresholds = dict(components), combine, thresholds
        self.weights = {k: float(w) for k, w in weights.items()}
        self.lagrange_lr, self.lagrange_max = lagrange_lr, lagrange_max
        self.names = list(self.components)
        self.shares = torch.tensor([self.weights.get(n, 0.0) / total for n in self.names])
        self.constrained = list(thresholds) if combine == "lagrangian" else []
        self.multipliers = dict.fromkeys(self.constrained, float(lagrange_init))
        self.moments = RunningMoments(len(self.names), self.MIN_STD)

    def forward(self, rollout: Rollout) -> Tensor:
        return self.evaluate(rollout).reward

    def evaluate(self, rollout: Rollout) -> CompositeOutput:
        """Every component's raw (B,) values and the combined (B,) reward; updates the moments in training mode."""
        values = {name: fn(rollout).detach().float() for name, fn in self.components.items()}
        B = len(rollout)
        for name, v in values.items():
            if v.shape != (B,):
                raise ValueError(f"reward component {name!r} returned shape {tuple(v.shape)}; expected ({B},)")
        stacked = torch.stack([values[n] for n in self.names])  # (K, B)
        if self.training:
            self.moments.update(stacked)
        reward = combine_weighted(self.moments.standardize(stacked), self.shares)
        if self.constrained:
            reward = lagrangian(
                reward,
                torch.stack([values[n] for n in self.constrained]),
                torch.tensor([self.multipliers[n] for n in self.constrained]),
                torch.tensor([float(self.thresholds[n]) for n in self.constrained]),
            )
        return CompositeOutput(values, reward)

    def state_metrics(self) -> dict[str, float]:
        """What the reward is standardised and constrained by now: `reward_mean/<c>`, `reward_std/<c>` (the running
        moments, the latest training rollout included) and `lagrange/<c>` (the multipliers)."""
        return {
            **{f"reward_mean/{n}": float(m) for n, m in zip(self.names, self.moments.mean, strict=True)},
            **{f"reward_std/{n}": float(s) for n, s in zip(self.names, self.moments.std, strict=True)},
            **{f"lagrange/{n}": value for n, value in self.multipliers.items()},
        }

    def update_multipliers(self, means: Mapping[str, float]) -> dict[str, float]:
        """One dual-ascent step from a training rollout's component means; returns the new multipliers."""
        if not self.constrained:
            return {}
        new = dual_ascent_step(
            torch.tensor([self.multipliers[n] for n in self.constrained], dtype=torch.float64),
            torch.tensor([float(means[n]) for n in self.constrained], dtype=torch.float64),
            torch.tensor([float(self.thresholds[n]) for n in self.constrained], dtype=torch.float64),
            self.lagrange_lr,
            self.lagrange_max,
        )
        self.multipliers = dict(zip(self.constrained, new.tolist(), strict=True))
        return dict(self.multipliers)


def _positive(value: object, key: str, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def check_composite_settings(
    weights: Mapping[str, float],
    combine: str,
    thresholds: Mapping[str, float] | None,
    has_reward_model: bool,
) -> tuple[dict[str, float], dict[str, float]]:
    """Validated (weights, thresholds) for `stage=multitask`; each error names the stage.module key."""
    unknown = sorted(set(weights) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"stage.module.weights: unknown components {unknown}; choose from {list(COMPONENTS)}")
    weights = {k: _positive(v, f"stage.module.weights.{k}", allow_zero=True) for k, v in weights.items()}
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"stage.module.weights: at least one weight must be > 0, got {weights}")
    if combine not in COMBINE_FORMS:
        raise ValueError(f"stage.module.combine must be one of {list(COMBINE_FORMS)}, got {combine!r}")
    # null = unconstrained, so the config can list every component and a sweep can switch one on or off
    thresholds = {k: v for k, v in (thresholds or {}).items() if v is not None}
    unknown = sorted(set(thresholds) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"stage.module.thresholds: unknown components {unknown}; choose from {list(COMPONENTS)}")
    for name, value in thresholds.items():
        try:
            thresholds[name] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"stage.module.thresholds.{name} must be a number, got {value!r}") from None
        if name in BOUNDED and not 0.0 <= thresholds[name] <= 1.0:
            raise ValueError(f"stage.module.thresholds.{name} must be in [0, 1] (the component's range), got {value}")
    if combine == "lagrangian" and not thresholds:
        raise ValueError("stage.module.thresholds must name at least one component when combine=lagrangian")
    uses_model = weights.get("reward_model", 0.0) > 0 or (combine == "lagrangian" and "reward_model" in thresholds)
    if uses_model and not has_reward_model:
        raise ValueError(
            "stage.reward_model must name a reward model directory when stage.module.weights.reward_model > 0 "
            "(or the reward model is constrained); pass stage.reward_model=PATH or set the weight to 0"
        )
    return weights, thresholds


def make_composite(
    tokenizer,
    world: Mapping | None,
    weights: Mapping[str, float],
    combine: str = "weighted_sum",
    thresholds: Mapping[str, float] | None = None,
    reward_model_path: str | None = None,
    max_new_tokens: int = 48,
    length_target: int = 40,
    format_ngram: int = 5,
    lagrange_lr: float = 1.0,
    lagrange_max: float = 10.0,
    lagrange_init: float = 0.0,
) -> CompositeReward:
    """The composite reward of `stage=multitask`: every setting is checked before the world or a model is loaded.

    Judges, length and format are always computed (and logged); the reward model when `reward_model_path` is set.
    """
    weights, thresholds = check_composite_settings(weights, combine, thresholds, bool(reward_model_path))
    if world is None:
        raise ValueError("stage.module.world must hold the world config (the judges score every rollout)")
    if not isinstance(length_target, int) or not 0 <= length_target < max_new_tokens:
        raise ValueError(
            f"stage.module.length_target must be an integer in [0, max_new_tokens={max_new_tokens}), "
            f"got {length_target!r}"
        )
    if not isinstance(format_ngram, int) or format_ngram < 2:
        raise ValueError(f"stage.module.format_ngram must be an integer >= 2, got {format_ngram!r}")
    lagrange_lr = _positive(lagrange_lr, "stage.module.lagrange_lr")
    lagrange_max = _positive(lagrange_max, "stage.module.lagrange_max")
    lagrange_init = _positive(lagrange_init, "stage.module.lagrange_init", allow_zero=True)
    if lagrange_init > lagrange_max:
        raise ValueError(f"stage.module.lagrange_init ({lagrange_init}) must be <= lagrange_max ({lagrange_max})")
    if reward_model_path and not Path(reward_model_path).exists():
        raise FileNotFoundError(f"stage.reward_model: {reward_model_path} does not exist")
    if combine != "lagrangian" and thresholds:
        log.info("stage.module.thresholds %s unused: combine=%s has no constraints", thresholds, combine)
        thresholds = {}

    built = generate_world(WorldConfig.from_dict(world))
    stop_ids = (tokenizer.end_id, tokenizer.eos_id)
    components: dict[str, RewardFn] = {name: JudgeReward(built, {name: 1.0}) for name in JUDGES}
    if reward_model_path:
        reward_model = load_reward_model(reward_model_path, tokenizer)
        components["reward_model"] = reward_model_reward(reward_model, tokenizer, built)
    components["length"] = LengthReward(stop_ids, length_target, max_new_tokens)
    components["format"] = FormatReward(stop_ids, format_ngram)
    # Without a reward model its weight is 0 (checked above): nothing of it to score or combine.
    weights = {k: w for k, w in weights.items() if k in components}
    return CompositeReward(components, weights, combine, thresholds, lagrange_lr, lagrange_max, lagrange_init)
