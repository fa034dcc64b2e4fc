"""Labels for one round of online RLHF: the current policy's answers to training prompts, ranked by an annotator.

    answers = sample_answers(policy, tokenizer, prompts, samples=4, temperature=1.0, max_new_tokens=32, seed=1)
    labels = judge_pairs(world, prompts, answers, label_noise=0.1, seed=1)      # the world's judges as the annotator
    labels = feedback_pairs("feedback.sqlite", seen=..., held_out_fraction=0.1, seed=1337)  # or people's votes

A labelled round is a list of preference records `{"prompt", "context"?, "chosen", "rejected"}`, the format
`data=preference` reads, so the reward stage and DPO train on them as on any pairs file. The curriculum
(`curriculum=online`) calls these between stage runs; this module holds no training.

Simulated annotator: per prompt, the answer with the highest judges' total is chosen over the one with the lowest;
a prompt whose answers all score the same gives no pair (a tie says nothing). `label_noise` flips each pair with
that probability, as annotators who disagree with the judges would.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuraflux.chat import render_record
from neuraflux.data.prompts import encode_prompts
from neuraflux.data.splits import held_out_score
from neuraflux.feedback.measure import render
from neuraflux.feedback.rollout import generate_rollouts
from neuraflux.model import NanoLM
from neuraflux.world import RLPrompt, World, judge

LABEL_SOURCES = ("judges", "feedback")


@dataclass
class LabelledRound:
    records: list[dict]  # preference records, in prompt order
    stats: dict = field(default_factory=dict)  # plain numbers for the curriculum's state and report
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def prompt_record(prompt: RLPrompt) -> dict:
    """An RL prompt as a data record's prompt fields (`render_record` renders them as `measure.render` renders the
    prompt, which is what the policy was sampled on)."""
    return {"prompt": prompt.prompt, **({"context": prompt.context} if prompt.context else {})}


@torch.no_grad()
def sample_answers(
    model: NanoLM,
    tokenizer,
    prompts: Sequence[RLPrompt],
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
) -> list[list[str]]:
    """`samples` answers per prompt from `model` (KV-cached batched sampling, a generator seeded by `seed`)."""
    if samples < 2:
        raise ValueError(f"curriculum.labels.samples must be >= 2 (a pair needs two answers), got {samples}")
    if temperature <= 0:
        raise ValueError(
            f"curriculum.labels.temperature must be > 0 (greedy answers would all agree), got {temperature}"
        )
    texts = [render(p) for p in prompts for _ in range(samples)]
    config = model.config
    max_prompt_tokens = min(config.block_size, config.max_position_embeddings - max_new_tokens)
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            batch = encode_prompts(tokenizer, texts[i : i + batch_size], max_prompt_tokens)
            rollout = generate_rollouts(model, tokenizer, batch, max_new_tokens, temperature, generator=generator)
            answers += rollout.responses
    finally:
        model.train(was_training)
    return [answers[i : i + samples] for i in range(0, len(answers), samples)]


def judge_pairs(
    world: World, prompts: Sequence[RLPrompt], answers: Sequence[Sequence[str]], label_noise: float, seed: int
) -> LabelledRound:
    """One pair per prompt whose answers the judges tell apart: the best (judges' total) chosen, the worst rejected,
    flipped with probability `label_noise`. Stats: prompts, answers, pairs, ties, flipped, and the sampled answers'
    judges mean (the policy's quality as sampled, before the round trains)."""
    if not 0.0 <= label_noise < 0.5:
        # at 0.5 a label says nothing; above, it says the opposite
        raise ValueError(f"curriculum.labels.label_noise must be in [0, 0.5), got {label_noise}")
    rng = random.Random(seed)
    out = LabelledRound([])
    flipped, totals = 0, []
    for prompt, group in zip(prompts, answers, strict=True):
        rendered = render(prompt)
        scored = [(judge(rendered, a, world).total, a.strip()) for a in group if a.strip()]
        totals += [s for s, _ in scored]
        if len(scored) < 2:
            out.skipped["fewer than two non-empty answers"] += 1
            continue
        best = max(scored, key=lambda x: x[0])
        worst = min(scored, key=lambda x: x[0])
        if best[0] == worst[0] or best[1] == worst[1]:
            out.skipped["all answers scored the same"] += 1
            continue
        chosen, rejected = best, worst
        if rng.random() < label_noise:
            chosen, rejected = worst, best
            flipped += 1
        out.records.append({**prompt_record(prompt), "chosen": chosen[1], "rejected": rejected[1],
                            "scores": [chosen[0], rejected[0]]})  # fmt: skip
    out.stats = {
        "prompts": len(prompts),
        "answers": sum(len(g) for g in answers),
        "pairs": len(out.records),
        "ties": out.skipped["all answers scored the same"],
        "flipped": flipped,
        "sampled_judges_mean": sum(totals) / (3 * len(totals)) if totals else None,
    }
    return out


def record_key(record: dict) -> str:
    """A pair's identity across rounds: its prompt fields and both answers."""
    fields = [record.get("context") or "", str(record.get("prompt") or record.get("messages"))]
    return hashlib.sha256("\0".join([*fields, record["chosen"], record["rejected"]]).encode()).hexdigest()


def feedback_pairs(db: str | Path, seen: set[str], held_out_fraction: float, seed: int) -> LabelledRound:
    """The preference pairs people's votes in `db` make (`feedback.export`) that no earlier round took (`seen`:
    their `record_key`s), without those whose prompt the run holds out: a question asked in the chat page that
    the report measures on stays unseen by training."""
    from neuraflux.feedback.export import export_records
    from neuraflux.feedback.store import FeedbackStore

    store = FeedbackStore(db, readonly=True)
    try:
        export = export_records(store.votes(), "preference")
    finally:
        store.close()
    out = LabelledRound([], skipped=export.skipped)
    held = 0
    for record in export.records:
        if held_out_score(render_record(record), seed) < held_out_fraction:
            held += 1
            continue
        if record_key(record) in seen:
            out.skipped["labelled in an earlier round"] += 1
            continue
        out.records.append(record)
    out.stats = {"pairs": len(out.records), "held_out_dropped": held, "pairs_in_db": len(export.records)}
    return out
