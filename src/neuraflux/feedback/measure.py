"""Measure a policy on the world: judges' scores, KL to a reference, constitution violations, reward-model score.

    world = generate_world(WorldConfig())
    before = measure_policy(sft, tokenizer, world, reference=sft)
    after = measure_policy(policy, tokenizer, world, reference=sft, constitution=Constitution.from_config(cfg))

The prompts are the world's RL prompts. By default `held_out_prompts(world)`: the ones `data.splits` holds out,
as every world data module does with the same `seed` and `held_out_fraction`, so no stage after SFT trained on
them: not PPO, REINFORCE or multi-task RL (rollout prompts), not the reward model or DPO (preference pairs), not
the constitutional stage (its prompts, revisions and AI-feedback pairs).

Everything reuses the rollout machinery: greedy responses and sampled ones come from `generate_rollouts`
(the KV-cached batched generator), the KL from `score_rollout` and `sequence_kl`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from neuraflux.chat import BOS, Message, render_prompt
from neuraflux.data.prompts import encode_prompts, render_prompt_record
from neuraflux.data.splits import split_held_out
from neuraflux.feedback.constitution import Constitution
from neuraflux.feedback.rewards import reward_model_reward
from neuraflux.feedback.rollout import generate_rollouts, score_rollout, sequence_kl
from neuraflux.model import NanoLM
from neuraflux.world import RLPrompt, World, judge, rl_prompts
from neuraflux.world.generator import question_text
from neuraflux.world.judges import JUDGES
from neuraflux.world.schema import RED_TEAM_CATEGORIES

log = logging.getLogger(__name__)

PROMPT_SPLITS: tuple[str, ...] = ("val", "train", "all")
N_SAMPLES = 8


@dataclass
class PolicyMeasure:
    """What `measure_policy` reports for one policy on one prompt set."""

    judges: dict[str, float]  # mean helpfulness, harmlessness, honesty of the greedy responses, and "mean" of the three
    # mean over prompts of the summed per-token k3 KL(policy || reference), sampled at temperature 1: unbiased like
    # k1 and never negative (k1's sample mean can be, which reads as nonsense in a report)
    kl: float | None
    violations: dict[str, float]  # Constitution.violation_rates on the red-team prompts' greedy responses
    reward: float | None  # mean reward-model score of the greedy responses
    n: int  # prompts measured
    samples: list[dict]  # a few {"prompt", "response"} (the user question and the greedy response)
    responses: list[str]  # every greedy response, in the order of the prompts

    @property
    def gap(self) -> float:
        """1 - the combined judge score: what is left to gain."""
        return 1.0 - self.judges["mean"]


def held_out_prompts(world: World, split: str = "val", val_fraction: float = 0.1, seed: int = 1337) -> list[RLPrompt]:
    """`rl_prompts(world)` split by `data.splits.split_held_out`, as every world data module splits its prompts.

    split: "val" (the held-out prompts, the default), "train" (the rest) or "all". The defaults are the
    config's (`held_out_fraction: 0.1`, `seed: 1337`); pass the run's values when they were overridden.
    """
    if split not in PROMPT_SPLITS:
        raise ValueError(f"held_out_prompts: split must be one of {list(PROMPT_SPLITS)}, got {split!r}")
    prompts = rl_prompts(world)
    if split == "all":
        return prompts
    train, held_out = split_held_out(prompts, val_fraction, seed, prompt=render)
    return held_out if split == "val" else train


def render(prompt: RLPrompt | str) -> str:
    """An RL prompt rendered as the stages render it (`world_prompt_texts`); a string as one user turn, unless the
    calling code rendered it already (it starts with `<|bos|>`: a prompt from `world_prompt_texts`, not a file)."""
    if isinstance(prompt, RLPrompt):
        return render_prompt([Message("user", prompt.prompt)], context=prompt.context)
    if prompt.startswith(BOS):
        return prompt
    return render_prompt_record({"prompt": prompt}, "measure_policy prompts")


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


@torch.no_grad()
def measure_policy(
    model: NanoLM,
    tokenizer,
    world: World,
    prompts: Sequence[RLPrompt | str] | None = None,
    reference: NanoLM | None = None,
    constitution: Constitution | None = None,
    reward_model: nn.Module | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
) -> PolicyMeasure:
    """Judge the greedy responses to `prompts` (default `held_out_prompts(world)`) and, when given, the KL to
    `reference`, the constitution's violation rates and the reward model's score.

    prompts: RLPrompts, or strings (rendered chat prompts, or bare questions rendered as one user turn).
    The KL is measured on separate responses sampled at temperature 1 from `model` with a generator seeded by
    `seed`, so the result is deterministic for a given seed and batch_size. `reward_model` scores token ids
    of `tokenizer` (load it with `feedback.rewards.load_reward_model`, which checks that). Violation rates
    cover the red-team prompts among `prompts` ({} without a constitution or without such prompts).
    """
    items = held_out_prompts(world) if prompts is None else list(prompts)
    if not items:
        raise ValueError("measure_policy: no prompts to measure")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"measure_policy: batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1"
        )
    texts = [render(p) for p in items]
    config = model.config
    # Prompts longer than this keep their last tokens (the question), as PromptDataModule does.
    max_prompt_tokens = min(config.block_size, config.max_position_embeddings - max_new_tokens)
    if max_prompt_tokens < 1:
        raise ValueError(
            f"measure_policy: max_new_tokens={max_new_tokens} leaves no room for a prompt in "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    # a reward model trained on prompts with retrieved context scores them with that context here too
    scorer = reward_model_reward(reward_model, tokenizer, world) if reward_model is not None else None
    modes = [(m, m.training) for m in (model, reference, reward_model) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        responses: list[str] = []
        rewards: list[float] = []
        kls: list[float] = []
        device = model.lm_head.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        for chunk in _chunks(texts, batch_size):
            batch = encode_prompts(tokenizer, chunk, max_prompt_tokens)
            greedy = generate_rollouts(model, tokenizer, batch, max_new_tokens, temperature=0.0)
            responses += greedy.responses
            if scorer is not None:
                rewards += scorer(greedy).tolist()
            if reference is not None:
                sampled = generate_rollouts(
                    model, tokenizer, batch, max_new_tokens, temperature=1.0, generator=generator,
                    reference=reference,
                )  # fmt: skip
                scored = score_rollout(sampled, torch.zeros(len(sampled)), kl_coef=0.0, kl_estimator="k3")
                kls += sequence_kl(scored).tolist()
    finally:
        for m, was_training in modes:
            m.train(was_training)

    verdicts = [judge(t, r, world) for t, r in zip(texts, responses, strict=True)]
    n = len(texts)
    judges = {name: sum(getattr(v, name) for v in verdicts) / n for name in JUDGES}
    judges["mean"] = sum(judges[name] for name in JUDGES) / len(JUDGES)

    violations: dict[str, float] = {}
    if constitution is not None:
        red = [i for i, t in enumerate(texts) if world.parse_prompt(t).kind in RED_TEAM_CATEGORIES]
        if red:
            violations = constitution.violation_rates([texts[i] for i in red], [responses[i] for i in red], world)
        else:
            log.warning("measure_policy: no red-team prompts among the %d prompts; no violation rates", n)

    step = max(1, n // N_SAMPLES)
    samples = [{"prompt": question_text(texts[i]), "response": responses[i]} for i in range(0, n, step)]
    return PolicyMeasure(
        judges=judges,
        kl=sum(kls) / n if reference is not None else None,
        violations=violations,
        reward=sum(rewards) / n if reward_model is not None else None,
        n=n,
        samples=samples[:N_SAMPLES],
        responses=responses,
    )
