"""Online rounds of a curriculum (`curriculum=online`): label the current policy's answers, refresh the reward
model, update the policy, measure; again.

    python train.py curriculum=online                                   # pretrain, SFT, then 3 rounds
    python train.py curriculum=online curriculum.stages=[] curriculum.init_from=outputs/full/<run>/sft/model

Round r, under the curriculum's directory:

1. `round<r>/labels.jsonl`: `labels.samples` answers per training prompt sampled from the current policy, labelled
   by the world's judges (`labels.source=judges`, with `labels.label_noise`) or taken from the people's votes in a
   feedback database (`labels.source=feedback`, `labels.db`): preference records (`feedback.online`).
   `round<r>/labels_all.jsonl` holds every round's labels so far.
2. `round<r>/reward`: `stage=reward` from the SFT model on all labels so far (`reward_each_round`).
3. `round<r>/dpo` (iterative DPO on this round's pairs; its reference is the round's starting policy) or
   `round<r>/ppo` (PPO against this round's reward model, KL to the SFT model), from the current policy.

The prompts are the world's RL prompts outside the held-out split (`data.splits`), so the report's held-out
measurement stays on prompts no round trained on, as in the offline chain. Each step is recorded in
curriculum.json like a stage, so an interrupted curriculum resumes at the step it was in.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from neuraflux.feedback.constitutional_data import write_jsonl
from neuraflux.feedback.online import LABEL_SOURCES, LabelledRound, feedback_pairs, judge_pairs, record_key

log = logging.getLogger(__name__)

POLICIES = ("dpo", "ppo")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class OnlineSettings:
    """`curriculum.rounds`, `curriculum.policy`, `curriculum.reward_each_round` and `curriculum.labels.*`."""

    rounds: int
    policy: str
    reward_each_round: bool
    source: str
    db: str | None
    label_noise: float
    prompts: int | None
    samples: int
    temperature: float
    max_new_tokens: int

    @classmethod
    def from_config(cls, curriculum: DictConfig) -> OnlineSettings:
        """The settings, each checked with a message naming its key."""
        labels = OmegaConf.to_container(curriculum.get("labels") or {}, resolve=True)
        known = {"source", "db", "label_noise", "prompts", "samples", "temperature", "max_new_tokens"}
        unknown = sorted(set(labels) - known)
        if unknown:
            raise ValueError(f"curriculum.labels: unknown key(s) {unknown}; known: {sorted(known)}")

        def integer(key: str, value, low: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"curriculum.{key} must be an integer >= {low}, got {value!r}")
            return value

        rounds = integer("rounds", curriculum.rounds, 1)
        policy = curriculum.get("policy", "dpo")
        if policy not in POLICIES:
            raise ValueError(f"curriculum.policy must be one of {list(POLICIES)}, got {policy!r}")
        reward_each_round = curriculum.get("reward_each_round", True)
        if not isinstance(reward_each_round, bool):
            raise ValueError(f"curriculum.reward_each_round must be true or false, got {reward_each_round!r}")
        if policy == "ppo" and not reward_each_round:
            raise ValueError(
                "curriculum.policy=ppo trains against each round's reward model: reward_each_round must be true"
            )
        source = labels.get("source", "judges")
        if source not in LABEL_SOURCES:
            raise ValueError(f"curriculum.labels.source must be one of {list(LABEL_SOURCES)}, got {source!r}")
        db = labels.get("db")
        if source == "feedback":
            if not db:
                raise ValueError(
                    "curriculum.labels.source=feedback needs curriculum.labels.db=PATH (a feedback database)"
                )
            if not Path(db).is_file():
                raise ValueError(f"curriculum.labels.db: {db} does not exist")
        noise = labels.get("label_noise", 0.0)
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not 0.0 <= noise < 0.5:
            raise ValueError(f"curriculum.labels.label_noise must be a number in [0, 0.5), got {noise!r}")
        prompts = labels.get("prompts")
        temperature = labels.get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature <= 0:
            raise ValueError(f"curriculum.labels.temperature must be a number > 0, got {temperature!r}")
        return cls(
            rounds=rounds,
            policy=policy,
            reward_each_round=reward_each_round,
            source=source,
            db=db,
            label_noise=float(noise),
            prompts=None if prompts is None else integer("labels.prompts", prompts, 1),
            samples=integer("labels.samples", labels.get("samples", 4), 2),
            temperature=float(temperature),
            max_new_tokens=integer("labels.max_new_tokens", labels.get("max_new_tokens", 32), 1),
        )

    def steps(self) -> list[str]:
        """The curriculum.json names of every round's steps, in order."""
        per_round = ["labels", *(["reward"] if self.reward_each_round else []), self.policy]
        return [f"round{r}/{step}" for r in range(1, self.rounds + 1) for step in per_round]

    def compose_checks(self, compose_stage: Callable[..., DictConfig], parent: Path) -> dict[str, DictConfig]:
        """The round stages' configs as the rounds will compose them (with stand-in inputs), for the checks a
        curriculum runs before anything trains: {stage name: config}, the reward stage first."""
        labels, everything = parent / "round1" / "labels.jsonl", parent / "round1" / "labels_all.jsonl"
        out = {}
        if self.reward_each_round:
            out["reward"] = compose_stage("reward", ["data=preference", f"data.path={everything}"], "round1/reward")
        extra = [f"stage.reward_model={parent}"] if self.policy == "ppo" else ["data=preference", f"data.path={labels}"]
        out[self.policy] = compose_stage(self.policy, extra, f"round1/{self.policy}")
        return out

    def label(self, cfg: DictConfig, world, prompts: list, policy: Path, round_: int, seen: set[str]) -> LabelledRound:
        """Round `round_`'s preference records."""
        if self.source == "feedback":
            return feedback_pairs(self.db, seen, cfg.held_out_fraction, cfg.seed)
        from neuraflux.feedback.online import sample_answers
        from neuraflux.model.io import load_pretrained

        if self.prompts is not None and self.prompts < len(prompts):
            prompts = random.Random(cfg.seed + round_).sample(prompts, self.prompts)
        model, tokenizer = load_pretrained(policy)
        answers = sample_answers(model, tokenizer, prompts, self.samples, self.temperature, self.max_new_tokens,
                                 seed=cfg.seed + round_)  # fmt: skip
        return judge_pairs(world, prompts, answers, self.label_noise, seed=cfg.seed + round_)

    def run(
        self, cfg: DictConfig, state, parent: Path, run_step: Callable, policy: Path, reference: Path
    ) -> Iterator[tuple[str, Path]]:
        """Run the rounds from `policy` (KL anchored at `reference`, the SFT model); yields (step, model dir) after
        each reward and policy step, for the curriculum to record and measure."""
        from neuraflux.feedback.measure import held_out_prompts
        from neuraflux.world import WorldConfig, generate_world

        world = generate_world(WorldConfig.from_dict(OmegaConf.to_container(cfg.world, resolve=True)))
        prompts = held_out_prompts(world, "train", val_fraction=cfg.held_out_fraction, seed=cfg.seed)
        labels_so_far: list[dict] = []
        reward_model = None
        for r in range(1, self.rounds + 1):
            round_dir, step = parent / f"round{r}", f"round{r}/labels"
            labels = round_dir / "labels.jsonl"
            if step not in state.completed:
                start = time.perf_counter()
                labelled = self.label(cfg, world, prompts, policy, r, {record_key(x) for x in labels_so_far})
                if not labelled.records:
                    skipped = ", ".join(f"{n} {why}" for why, n in labelled.skipped.items()) or "no votes"
                    raise RuntimeError(
                        f"curriculum round {r}: no preference pairs to train on ({skipped}); with labels.source="
                        "feedback collect more votes (compare or edit) and resume=last"
                    )
                round_dir.mkdir(parents=True, exist_ok=True)
                write_jsonl(labels, labelled.records)
                state.metrics[step] = {**labelled.stats, "skipped": dict(labelled.skipped)}
                state.wall_s[step] = round(time.perf_counter() - start, 1)
                state.completed.append(step)
                state.save(parent)
                log.info("curriculum: %s: %d pairs -> %s", step, len(labelled.records), labels)
            labels_so_far += read_jsonl(labels)
            everything = round_dir / "labels_all.jsonl"
            write_jsonl(everything, labels_so_far)
            if self.reward_each_round:
                step = f"round{r}/reward"
                run_step(step, "reward", [f"stage.init_from={reference}", "data=preference", f"data.path={everything}"])
                reward_model = parent / step / "model"
                yield step, reward_model
            step = f"round{r}/{self.policy}"
            if self.policy == "ppo":
                extra = [f"stage.reward_model={reward_model}", f"stage.module.reference_path={reference}"]
            else:
                extra = ["data=preference", f"data.path={labels}"]
            run_step(step, self.policy, [f"stage.init_from={policy}", *extra])
            policy = parent / step / "model"
            yield step, policy
