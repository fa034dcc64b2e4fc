"""The data of constitutional AI (Bai et al. 2022) as plain functions of texts: no model, no trainer.

* Supervised phase (critique -> revision, sec. 3): each sampled response is checked against the constitution.
  A response that breaks no principle is kept as it is; one that breaks some gets a written critique and a
  revision: the model's own (from a prompt showing the request, the response and the critique) when that is
  non-empty and breaks nothing, else the broken principle's template (`Constitution.revise`).
* AI feedback (sec. 4): two responses to one prompt that break a different number of principles form a
  preference pair, the one breaking fewer chosen; so does a revision against the violating original it
  replaced.

Prompts are rendered chat prompts (what the policy was sampled on and the judges read); responses bare texts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from neuraflux.chat import parse_prompt
from neuraflux.feedback.constitution import Constitution

SOURCES: tuple[str, ...] = ("model", "template", "unchanged")

# (prompts, responses, critiques) -> the model's revisions, one per row ("" for none); batched so that a stage
# generates them at once
ReviseFn = Callable[[list[str], list[str], list[str]], list[str]]


@dataclass(frozen=True)
class RevisionExample:
    """One sampled response and what the supervised phase trains on in its place."""

    prompt: str
    response: str
    critique: str  # empty when the response breaks no principle
    revision: str  # the SFT target
    source: str  # one of SOURCES
    violations: tuple[str, ...] = ()  # ids of the principles the response breaks
    revision_violations: tuple[str, ...] = ()  # what the revision still breaks (a template cannot always fix it)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"RevisionExample.source must be one of {list(SOURCES)}, got {self.source!r}")

    @classmethod
    def from_dict(cls, d: dict) -> RevisionExample:
        return cls(
            **{
                **d,
                "violations": tuple(d["violations"]),
                "revision_violations": tuple(d["revision_violations"]),
            }
        )


@dataclass(frozen=True)
class FeedbackPair:
    """A constitution-ranked preference: `chosen` breaks fewer principles than `rejected`."""

    prompt: str
    chosen: str
    rejected: str
    chosen_violations: int
    rejected_violations: int
    source: str  # "revision" (a revision against its original) or "samples" (two samples)

    def preference_record(self) -> dict:
        """The record `data=preference` reads: the prompt as its turns (`messages`, and `context` when it has one),
        since special tokens are never read from a data file, then `chosen` and `rejected`."""
        messages, context = parse_prompt(self.prompt)
        record: dict = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
        if context is not None:
            record["context"] = context
        return {**record, "chosen": self.chosen, "rejected": self.rejected}


def build_revisions(
    prompts: list[str],
    responses: list[str],
    revise_fn: ReviseFn | None,
    constitution: Constitution,
    world=None,
) -> list[RevisionExample]:
    """Critique and revise each (prompt, response); `revise_fn` (None: templates only) is called once, on the
    violating rows. The world is needed by judge-checked principles."""
    if len(prompts) != len(responses):
        raise ValueError(f"build_revisions: {len(prompts)} prompts but {len(responses)} responses")
    found = [constitution.violations(p, r, world) for p, r in zip(prompts, responses)]
    bad = [i for i, v in enumerate(found) if v]
    critiques = {i: constitution.describe(found[i]) for i in bad}
    own: dict[int, str] = {}
    if revise_fn is not None and bad:
        revised = revise_fn([prompts[i] for i in bad], [responses[i] for i in bad], [critiques[i] for i in bad])
        if len(revised) != len(bad):
            raise ValueError(f"build_revisions: revise_fn returned {len(revised)} revisions for {len(bad)} requests")
        own = {i: text.strip() for i, text in zip(bad, revised)}
    examples = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = tuple(v.principle for v in found[i])
        if not ids:
            examples.append(RevisionExample(prompt, response, "", response, "unchanged"))
            continue
        # An empty revision breaks no principle, but it is no answer either: the template is used instead.
        candidate = own.get(i, "")
        if candidate and not constitution.violations(prompt, candidate, world):
            examples.append(RevisionExample(prompt, response, critiques[i], candidate, "model", ids))
            continue
        fixed = constitution.revise(prompt, response, world).response
        left = tuple(v.principle for v in constitution.violations(prompt, fixed, world))
        examples.append(RevisionExample(prompt, response, critiques[i], fixed, "template", ids, left))
    return examples


def feedback_pairs(examples: list[RevisionExample], max_pairs_per_prompt: int | None = None) -> list[FeedbackPair]:
    """Preference pairs per prompt (in first-seen order): every two samples that break a different number of
    principles, then each revision against its violating original. Duplicate and empty texts are skipped;
    `max_pairs_per_prompt` keeps the first pairs of each prompt, so the policy's own samples come first."""
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be a positive integer or None, got {max_pairs_per_prompt}")
    by_prompt: dict[str, list[RevisionExample]] = {}
    for ex in examples:
        by_prompt.setdefault(ex.prompt, []).append(ex)
    pairs: list[FeedbackPair] = []
    for prompt, group in by_prompt.items():
        candidates: list[FeedbackPair] = []
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                na, nb = len(a.violations), len(b.violations)
                if na != nb:
                    good, bad = (a, b) if na < nb else (b, a)
                    candidates.append(
                        FeedbackPair(prompt, good.response, bad.response, min(na, nb), max(na, nb), "samples")
                    )
        for ex in group:
            if ex.source != "unchanged" and len(ex.revision_violations) < len(ex.violations):
                candidates.append(
                    FeedbackPair(
                        prompt,
                        ex.revision,
                        ex.response,
                        len(ex.revision_violations),
                        len(ex.violations),
                        "revision",
                    )
                )
        seen: set[tuple[str, str]] = set()
        kept = []
        for pair in candidates:
            key = (pair.chosen.strip(), pair.rejected.strip())
            if not key[0] or not key[1] or key[0] == key[1] or key in seen:
                continue
            seen.add(key)
            kept.append(pair)
        pairs += kept[:max_pairs_per_prompt]
    return pairs


def violation_rates(examples: list[RevisionExample], principle_ids: list[str]) -> dict[str, float]:
    """Share of the examples' responses breaking each principle, and `any` (the checks already ran)."""
    n = max(1, len(examples))
    rates = {pid: sum(pid in ex.violations for ex in examples) / n for pid in principle_ids}
    rates["any"] = sum(bool(ex.violations) for ex in examples) / n
    return rates


def revision_from_model(examples: list[RevisionExample]) -> float | None:
    """Share of the violating responses whose revision the model wrote itself (and it passed every check);
    None when nothing was revised."""
    revised = [ex for ex in examples if ex.source != "unchanged"]
    return sum(ex.source == "model" for ex in revised) / len(revised) if revised else None


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """Replace `path` with one JSON object a line; written beside and renamed, so a reader never sees half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
    return path


def append_preferences(path: str | Path, pairs: list[FeedbackPair]) -> int:
    """Add the pairs not yet in the preference file at `path` (the same prompt, chosen and rejected); returns how
    many."""
    path = Path(path)
    old = []
    if path.is_file():
        old = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = {json.dumps(r, sort_keys=True) for r in old}
    new = []
    for pair in pairs:
        record = pair.preference_record()
        key = json.dumps(record, sort_keys=True)
        if key not in keys:
            keys.add(key)
            new.append(record)
    if new:
        write_jsonl(path, old + new)
    return len(new)


def revision_records(examples: list[RevisionExample], step: int) -> list[dict]:
    """revisions.jsonl rows: prompt, response, critique, revision, source, the principles broken, the step."""
    return [
        {
            **asdict(ex),
            "violations": list(ex.violations),
            "revision_violations": list(ex.revision_violations),
            "step": step,
        }
        for ex in examples
    ]


def feedback_records(pairs: list[FeedbackPair], step: int) -> list[dict]:
    """ai_feedback.jsonl rows: a preference record, how many principles each side breaks, and the source."""
    return [{**asdict(p), "step": step} for p in pairs]
