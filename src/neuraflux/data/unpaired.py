"""Unpaired preference data for KTO: (prompt, completion) examples, each desirable or undesirable.

Sources, all ending as a list of `UnpairedExample`:

* preference pairs, unpaired (`unpair`): each pair's chosen response is a desirable example and its rejected
  response an undesirable one, under the same prompt (TRL's `unpair_preference_dataset`);
* JSON-lines files (`.jsonl`, `.jsonl.gz`) in TRL's unpaired shape, `{"prompt", "completion", "label"}`:
  - the prompt is a string (one user turn) or a list of `{"role", "content"}` turns ending with the user's
    (conversational); `"messages"` may stand for a list prompt, as in the preference files;
  - the completion is a string or a list of one `{"role": "assistant", "content"}` turn;
  - the label is JSON `true` (desirable) or `false` (undesirable), nothing else;
  - an optional `"context"` (a retrieved document).
  Text is rendered by `neuraflux.chat`, which escapes it: special tokens are never read from a file.

A file that cannot be read as records (not UTF-8, not JSON, not an object) is refused naming the file and line
(`data.common.read_json_lines`); a record that is not a valid example too, in one line, unless `on_invalid="skip"`
drops such records with one logged warning. Tokenisation and batching are in `data.unpaired_batches`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from neuraflux.chat import render_record
from neuraflux.data.common import read_json_lines
from neuraflux.data.preference import PreferenceExample, check_records_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnpairedExample:
    prompt: str  # rendered chat prompt, ending with the assistant tag
    completion: str  # bare response text (no end/eos tokens)
    desirable: bool  # the label: True = desirable (a thumbs-up), False = undesirable


def unpair(pairs: Iterable[PreferenceExample]) -> list[UnpairedExample]:
    """Each pair as two examples under its prompt, chosen -> desirable then rejected -> undesirable."""
    return [
        example
        for p in pairs
        for example in (UnpairedExample(p.prompt, p.chosen, True), UnpairedExample(p.prompt, p.rejected, False))
    ]


def _completion_text(completion: object) -> str:
    if isinstance(completion, list):
        turn = completion[0] if len(completion) == 1 else None
        if not isinstance(turn, dict) or turn.get("role") != "assistant":
            raise ValueError(
                "field 'completion' must be a string or a list of one {'role': 'assistant', 'content'} turn, got "
                f"{str(completion)[:80]}"
            )
        completion = turn.get("content")
    if not isinstance(completion, str) or not completion.strip():
        raise ValueError(f"field 'completion' must be a non-empty string, got {str(completion)[:80]!r}")
    return completion.strip()


def to_unpaired(record: dict) -> UnpairedExample:
    """One record in TRL's unpaired shape as a validated example; ValueError names the field and the problem."""
    label = record.get("label")
    if not isinstance(label, bool):
        shown = "missing" if "label" not in record else f"{json.dumps(label)[:40]}"
        raise ValueError(f"field 'label' must be true (desirable) or false (undesirable), got {shown}")
    completion = _completion_text(record.get("completion"))
    prompt = record.get("prompt")
    if isinstance(prompt, list):  # conversational: the turns are rendered as a `messages` field is
        record = {"messages": prompt, "context": record.get("context")}
    return UnpairedExample(render_record(record), completion, label)


def read_unpaired_jsonl(path: str | Path, on_invalid: str = "error") -> list[UnpairedExample]:
    """The examples of a JSON-lines file in TRL's unpaired shape. With `on_invalid="error"` the first invalid
    record is a one-line ValueError naming the file and line; with "skip" invalid records are dropped and counted
    in one warning naming the first."""
    path = check_records_file(path, "unpaired", on_invalid)
    records, lines = read_json_lines(path)
    if not records:
        raise ValueError(f"{path}: the file holds no records")
    examples, bad = [], []
    for record, n in zip(records, lines, strict=True):
        try:
            examples.append(to_unpaired(record))
        except ValueError as err:
            if on_invalid == "error":
                raise ValueError(f"{path}, line {n}: {err}") from None
            bad.append(f"{path}, line {n}: {err}")
    if bad:
        log.warning(
            "skipping %d of %d unpaired records that are invalid; the first: %s", len(bad), len(records), bad[0]
        )
    return examples
