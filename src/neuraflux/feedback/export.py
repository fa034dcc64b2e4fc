"""The feedback database as training data, in exactly the JSON-lines shapes the data modules read.

    neuraflux feedback export feedback.sqlite --format preference --out pairs.jsonl   # data=preference (DPO, RM)
    neuraflux feedback export feedback.sqlite --format kto --out unpaired.jsonl       # data=kto
    neuraflux feedback export feedback.sqlite --format sft --out edits.jsonl          # data=sft

What each vote becomes (an annotator's last vote only: earlier ones were replaced when they were cast):

| vote | preference | kto | sft |
|---|---|---|---|
| thumbs up / down | - | the answer, desirable / undesirable | - |
| compare a or b | chosen: the picked answer, rejected: the other | both: picked desirable, other undesirable | - |
| compare both_bad | - | both answers, undesirable | - |
| compare tie | - | - | - |
| edit | chosen: the edit, rejected: the model's answer | edit desirable, answer undesirable | the edit |

A prompt is the conversation the model answered (`messages`, user and assistant turns) with the retrieved documents
and any system message as its `context`. Skipped, and counted in `Export.skipped`: raw-text completions (not chat
turns), votes on an empty answer, pairs whose two texts are equal, and for sft conversations of more than one turn
(an SFT record holds one prompt).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from neuraflux.feedback.store import Completion, FeedbackStore

FORMATS = ("preference", "kto", "sft")
CONTEXT_SEPARATOR = "\n"  # as NanoRAG joins retrieved documents into the context turn


@dataclass
class Export:
    records: list[dict]
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def _prompt(c: Completion) -> tuple[list[dict], str | None] | None:
    """The conversation (user/assistant turns) and the context, or None for a raw completion."""
    if c.messages is None:
        return None
    turns = [{"role": m["role"], "content": m["content"]} for m in c.messages if m["role"] in ("user", "assistant")]
    context = [m["content"] for m in c.messages if m["role"] == "context"] + [s["text"] for s in c.sources]
    if not turns or turns[-1]["role"] != "user":
        return None
    return turns, CONTEXT_SEPARATOR.join(context) or None


def _with_context(record: dict, context: str | None) -> dict:
    return {**record, "context": context} if context else record


def export_records(votes: list[dict], fmt: str) -> Export:
    """Records in `fmt` (preference, kto or sft) from `FeedbackStore.votes()`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Export([])
    for vote in votes:
        kind, a, b = vote["kind"], vote["a"], vote["b"]
        prompt = _prompt(a)
        if prompt is None:
            out.skipped["raw-text completion (not a chat turn)"] += 1
            continue
        turns, context = prompt
        # (desirable, undesirable) answers, as this vote ranks them
        good: list[str] = []
        bad: list[str] = []
        if kind == "thumbs":
            (good if vote["rating"] == "up" else bad).append(a.text)
        elif kind == "edit":
            good, bad = [vote["text"]], [a.text]
        elif vote["choice"] in ("a", "b"):
            picked, other = (a, b) if vote["choice"] == "a" else (b, a)
            good, bad = [picked.text], [other.text]
        elif vote["choice"] == "both_bad":
            bad = [a.text, b.text]
        else:
            out.skipped["compare tie"] += 1
            continue
        if not all(text.strip() for text in good + bad):  # a model may stop at once: no data module takes ""
            out.skipped["an empty answer"] += 1
            continue
        if fmt == "kto":
            for text, label in [(t, True) for t in good] + [(t, False) for t in bad]:
                out.records.append(_with_context({"prompt": turns, "completion": text, "label": label}, context))
        elif fmt == "preference":
            if len(good) != 1 or len(bad) != 1:
                out.skipped[f"{kind} without a chosen and a rejected answer"] += 1
            elif good[0].strip() == bad[0].strip():
                out.skipped["chosen and rejected are the same text"] += 1
            else:
                record = {"messages": turns, "chosen": good[0], "rejected": bad[0]}
                out.records.append(_with_context(record, context))
        elif kind != "edit":
            out.skipped[f"{kind} (sft takes edits)"] += 1
        elif len(turns) != 1:
            out.skipped["edit of a multi-turn conversation (an SFT record holds one prompt)"] += 1
        else:
            out.records.append(_with_context({"prompt": turns[0]["content"], "response": vote["text"]}, context))
    return out


def export_feedback(db: str | Path, fmt: str, out: str | Path) -> Export:
    """Write `db`'s votes to `out` as JSON lines in `fmt`; the database is opened read-only (a running server
    keeps writing). FeedbackUnavailable or ValueError say what is wrong."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    store = FeedbackStore(db, readonly=True)
    try:
        result = export_records(store.votes(), fmt)
    finally:
        store.close()
    with Path(out).open("w", encoding="utf-8") as f:
        for record in result.records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return result
