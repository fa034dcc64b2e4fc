"""Preference data for DPO-style training and reward models: (prompt, chosen, rejected) texts.

Sources, all ending as one `datasets.Dataset` with string columns prompt / chosen / rejected:

* the built-in world's judge-labelled pairs (`PreferenceDataset.from_world`);
* JSON-lines files (`.jsonl`, `.jsonl.gz`) in either common shape:
  - `{"prompt", "chosen", "rejected"}`: the prompt is converted if it is an hh-rlhf transcript, otherwise
    rendered as one user turn; or `{"messages": [{"role", "content"}, ...], "chosen", "rejected"}`, a
    conversation; either with an optional `"context"` (a retrieved document). Special tokens are never read from a
    file: a prompt that is already rendered (starts with `<|bos|>`) is refused;
  - `{"chosen", "rejected"}` full transcripts in the Anthropic hh-rlhf style
    ("\\n\\nHuman: ...\\n\\nAssistant: ..."): the prompt is their shared prefix up to the last shared
    "\\n\\nAssistant:", its turns rendered in our chat format; chosen/rejected are the two final replies.
* in-memory lists of such records (`PreferenceDataset.from_records`).

Every record is validated before use (missing field, non-string, empty text, chosen identical to rejected,
transcripts that cannot be split); problems name the file and the 1-based line. With `on_invalid="error"` they
raise one ValueError listing them; with `on_invalid="skip"` the records are dropped with one logged warning. A file
that cannot be read as records (a line that is not UTF-8, not JSON or not an object; a .gz that is not valid gzip)
is refused whatever `on_invalid` says, naming the file and the line. Tokenisation and batching happen elsewhere.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from neuraflux.chat import BOS, Message, render_prompt, render_record
from neuraflux.data.common import read_json_lines
from neuraflux.data.conversation import is_conversational, preference_conversation
from neuraflux.world import World, practice_preference_pairs, preference_pairs

log = logging.getLogger(__name__)

ON_INVALID = ("skip", "error")
SUFFIXES = (".jsonl", ".jsonl.gz")
HUMAN_TAG = "\n\nHuman:"
ASSISTANT_TAG = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_MAX_REPORTED = 20


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str  # rendered chat prompt, ending with the assistant tag
    chosen: str  # bare response text (no end/eos tokens)
    rejected: str


@dataclass(frozen=True)
class InvalidRecord:
    where: str  # "path, line 3" or "source, record 3"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def transcript_messages(transcript: str) -> list[Message]:
    """hh-rlhf turns ("\\n\\nHuman: hi\\n\\nAssistant: hello") as chat messages; text before the first tag is a
    user turn."""
    if transcript.startswith(("Human:", "Assistant:")):
        transcript = "\n\n" + transcript
    parts = _TURN.split(transcript)  # [lead, role, text, role, text, ...]
    messages = [Message("user", parts[0].strip())] if parts[0].strip() else []
    messages += [Message(_ROLES[role], text.strip()) for role, text in zip(parts[1::2], parts[2::2], strict=True)]
    return messages


def _render_transcript_prompt(transcript: str) -> str:
    """A transcript prefix (optionally ending with the "Assistant:" tag) as our chat prompt."""
    transcript = transcript.rstrip()
    if transcript.endswith(ASSISTANT_TAG.strip()):
        transcript = transcript[: -len(ASSISTANT_TAG.strip())]
    messages = transcript_messages(transcript)
    if not any(m.role == "user" for m in messages):
        raise ValueError("the prompt transcript has no Human turn")
    return render_prompt(messages)


def split_transcripts(chosen: str, rejected: str) -> PreferenceExample:
    """Split two full hh-rlhf transcripts at their last shared "\\n\\nAssistant:"; ValueError says why not."""
    shared = _common_prefix(chosen, rejected)
    cut = shared.rfind(ASSISTANT_TAG)
    if cut < 0:
        raise ValueError("chosen and rejected share no '\\n\\nAssistant:' turn (not an hh-rlhf transcript pair)")
    replies = [text[cut + len(ASSISTANT_TAG) :].strip() for text in (chosen, rejected)]
    for field, reply in zip(("chosen", "rejected"), replies, strict=True):
        if HUMAN_TAG in reply or ASSISTANT_TAG in reply:
            raise ValueError(f"{field} continues past its final Assistant turn (the transcripts diverge earlier)")
    return PreferenceExample(_render_transcript_prompt(chosen[:cut]), replies[0], replies[1])


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def _render_prompt_field(record: dict, rendered_ok: bool) -> str:
    prompt = record.get("prompt")
    if rendered_ok and isinstance(prompt, str) and prompt.startswith(BOS):
        return prompt  # the built-in world's pairs: rendered by our own code
    if record.get("messages") is None and isinstance(prompt, str) and HUMAN_TAG.strip() in prompt:
        return _render_transcript_prompt(prompt)
    return render_record(record)


def to_example(record: dict, with_prompt: bool, rendered_ok: bool = False) -> PreferenceExample:
    """One raw record as a validated PreferenceExample; ValueError names the problem. `with_prompt` says which
    shape the source has: prompt (or messages)/chosen/rejected, or chosen/rejected full transcripts.
    `rendered_ok`: the source is our own code, whose prompts may come rendered. Conversational records (lists of
    turns, data/conversation.py) are read as they are."""
    if is_conversational(record):
        example = PreferenceExample(*preference_conversation(record))
        if example.chosen == example.rejected:
            raise ValueError("chosen and rejected are identical")
        return example
    prompt_field = "messages" if record.get("messages") is not None else "prompt"
    fields = (prompt_field, "chosen", "rejected") if with_prompt else ("chosen", "rejected")
    for name in fields:
        value = record.get(name)
        if name == "messages":
            continue  # checked turn by turn when rendered
        if value is None:
            raise ValueError(f"missing field {name!r}")
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} is not a string (got {type(value).__name__})")
        if not value.strip():
            raise ValueError(f"empty {name!r}")
    if with_prompt:
        example = PreferenceExample(
            _render_prompt_field(record, rendered_ok), record["chosen"].strip(), record["rejected"].strip()
        )
    else:
        example = split_transcripts(record["chosen"], record["rejected"])
    for name in ("chosen", "rejected"):
        if not getattr(example, name):
            raise ValueError(f"empty {name!r} reply")
    if example.chosen == example.rejected:
        raise ValueError("chosen and rejected are identical")
    return example


def check_records_file(path: str | Path, kind: str, on_invalid: str) -> Path:
    """A JSON-lines records file (`kind`: preference, unpaired) that exists and ends as one; `on_invalid` one of
    ON_INVALID. Errors name the file or the setting."""
    path = Path(path)
    if on_invalid not in ON_INVALID:
        raise ValueError(f"data.on_invalid must be one of {list(ON_INVALID)}, got {on_invalid!r}")
    if not path.is_file():
        raise FileNotFoundError(f"data.path: {kind} file {path} does not exist")
    if not path.name.endswith(SUFFIXES):
        raise ValueError(f"{path}: {kind} files must end with one of {SUFFIXES}")
    return path


def _empty() -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"prompt": [], "chosen": [], "rejected": []},
        features=datasets.Features({k: datasets.Value("string") for k in ("prompt", "chosen", "rejected")}),
    )


def _validate(
    records: list[dict],
    wheres: list[str],
    with_prompt: list[bool],
    source: str,
    on_invalid: str,
    rendered_ok: bool = False,
) -> datasets.Dataset:
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    good: list[dict] = []
    bad: list[InvalidRecord] = []
    for record, where, shape in zip(records, wheres, with_prompt, strict=True):
        try:
            example = to_example(record, shape, rendered_ok)
        except ValueError as e:
            bad.append(InvalidRecord(where, str(e)))
            continue
        good.append({"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected})
    if bad:
        listing = "\n  ".join(str(b) for b in bad[:_MAX_REPORTED])
        more = f"\n  ... and {len(bad) - _MAX_REPORTED} more" if len(bad) > _MAX_REPORTED else ""
        summary = f"{source}: {len(bad)} of {len(records)} preference records are invalid:\n  {listing}{more}"
        if on_invalid == "error":
            raise ValueError(summary)
        log.warning("skipping them. %s", summary)
    return datasets.Dataset.from_list(good) if good else _empty()


def _load_jsonl(path: Path) -> tuple[list[dict], list[str], bool]:
    """Rows of a JSON-lines file, where each came from ("path, line n"), and whether the file has prompts.

    Read line by line, not through Arrow: its errors name neither file nor line, and this way the records validated
    are exactly what the file holds.
    """
    records, lines = read_json_lines(path)
    if not records:
        raise ValueError(f"{path}: the file holds no records")
    columns = list(dict.fromkeys(k for r in records for k in r))
    if "chosen" not in columns or "rejected" not in columns:
        raise ValueError(
            f"{path}: records need 'chosen' and 'rejected' fields (and optionally 'prompt' or 'messages'); "
            f"found fields {columns}"
        )
    return records, [f"{path}, line {n}" for n in lines], "prompt" in columns or "messages" in columns


class PreferenceDataset:
    """Validated preference examples; `len`, indexing (-> PreferenceExample) and iteration, plus `.data` (the
    underlying `datasets.Dataset` with string columns prompt / chosen / rejected)."""

    def __init__(self, data: datasets.Dataset) -> None:
        missing = {"prompt", "chosen", "rejected"} - set(data.column_names)
        if missing:
            raise ValueError(
                f"PreferenceDataset needs columns prompt/chosen/rejected; missing {sorted(missing)} "
                "(build it with from_jsonl / from_records / from_world, which validate)"
            )
        self.data = data

    @classmethod
    def from_records(
        cls, records: list[dict], source: str = "<records>", on_invalid: str = "error"
    ) -> PreferenceDataset:
        """In-memory records; a record with a "prompt" key is in the prompt/chosen/rejected shape."""
        wheres = [f"{source}, record {i}" for i in range(1, len(records) + 1)]
        shapes = [r.get("prompt") is not None or r.get("messages") is not None for r in records]
        return cls(_validate(records, wheres, shapes, source, on_invalid))

    @classmethod
    def from_jsonl(cls, path: str | Path, on_invalid: str = "skip") -> PreferenceDataset:
        path = check_records_file(path, "preference", on_invalid)
        records, wheres, with_prompt = _load_jsonl(path)
        return cls(_validate(records, wheres, [with_prompt] * len(records), str(path), on_invalid))

    @classmethod
    def from_world(cls, world: World, rng_seed: int = 0) -> PreferenceDataset:
        """The world's judge-labelled pairs (see `neuraflux.world.preference_pairs`)."""
        records = preference_pairs(world, rng_seed)  # rendered by the world's own code
        wheres = [f"<world seed={world.config.seed}>, record {i}" for i in range(1, len(records) + 1)]
        return cls(_validate(records, wheres, [True] * len(records), wheres[0] if wheres else "<world>", "error", True))

    @classmethod
    def from_practice(cls, world: World, rng_seed: int = 0) -> PreferenceDataset | None:
        """The practice entities' pairs (`neuraflux.world.practice_preference_pairs`), or None when the world's
        `practice_preference_entities` is 0."""
        pairs = practice_preference_pairs(world, rng_seed)
        if not pairs:
            return None
        wheres = [f"<world seed={world.config.seed} practice>, record {i}" for i in range(1, len(pairs) + 1)]
        return cls(_validate(pairs, wheres, [True] * len(pairs), "<world practice>", "error", rendered_ok=True))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> PreferenceExample:
        row = self.data[index]
        return PreferenceExample(row["prompt"], row["chosen"], row["rejected"])

    def __iter__(self) -> Iterator[PreferenceExample]:
        for row in self.data:
            yield PreferenceExample(row["prompt"], row["chosen"], row["rejected"])


@dataclass(frozen=True)
class PreferenceSplit:
    train: PreferenceDataset
    test: PreferenceDataset


def train_test_split(dataset: PreferenceDataset, test_fraction: float, seed: int = 0) -> PreferenceSplit:
    """A seeded random split; the test part holds round(test_fraction * n) examples, at least one and at most
    n - 1, and the two parts never share an index."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(dataset)
    if n < 2:
        raise ValueError(f"cannot split {n} preference example(s) into train and test; need at least 2")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = min(n - 1, max(1, int(test_fraction * n + 0.5)))
    return PreferenceSplit(
        train=PreferenceDataset(dataset.data.select(sorted(order[n_test:]))),
        test=PreferenceDataset(dataset.data.select(sorted(order[:n_test]))),
    )
