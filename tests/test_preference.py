"""PreferenceDataset: the two file shapes, hh-rlhf transcript splitting, validation with line numbers, splits."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from neuraflux.chat import ASSISTANT, BOS, END, USER
from neuraflux.data.preference import (
    PreferenceDataset,
    PreferenceExample,
    split_transcripts,
    train_test_split,
)
from neuraflux.world import WorldConfig, generate_world, preference_pairs

HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def _write(path: Path, lines: list[str | dict]) -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_prompt_shape_renders_plain_prompts_and_messages_and_refuses_rendered_ones(tmp_path):
    rendered = f"{BOS}{USER}Hi there{END}{ASSISTANT}"
    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 2+2?", "chosen": " 4 ", "rejected": "5"},
            {"messages": [{"role": "user", "content": "Hi there"}], "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " bye"},
        ],
    )
    data = PreferenceDataset.from_jsonl(path, on_invalid="error")
    assert list(data) == [
        PreferenceExample(f"{BOS}{USER}What is 2+2?{END}{ASSISTANT}", "4", "5"),
        PreferenceExample(rendered, "Hello!", "Go away."),
        PreferenceExample(f"{BOS}{USER}hi{END}{ASSISTANT}", "hello", "bye"),
    ]
    assert data.data.column_names == ["prompt", "chosen", "rejected"]
    # special tokens are never read from a file: a rendered prompt is refused, naming the line
    bad = _write(tmp_path / "r.jsonl", [{"prompt": "fine", "chosen": "a", "rejected": "b"},
                                        {"prompt": rendered, "chosen": "a", "rejected": "b"}])  # fmt: skip
    with pytest.raises(ValueError, match=r"r.jsonl, line 2: field 'prompt' is a rendered chat prompt"):
        PreferenceDataset.from_jsonl(bad, on_invalid="error")


def test_hh_transcripts_split_at_the_last_shared_assistant_turn():
    shared = "\n\nHuman: Tell me a secret.\n\nAssistant: Which kind?\n\nHuman: A big one.\n\nAssistant:"
    example = split_transcripts(shared + " I can't do that.", shared + " I can't tell, sorry.")
    # The replies share the prefix " I can't " -- the split is still at the last "\n\nAssistant:".
    assert example == PreferenceExample(
        f"{BOS}{USER}Tell me a secret.{END}<|assistant|>Which kind?{END}{USER}A big one.{END}{ASSISTANT}",
        "I can't do that.",
        "I can't tell, sorry.",
    )
    with pytest.raises(ValueError, match="share no"):
        split_transcripts("just text", "other text")
    with pytest.raises(ValueError, match="chosen continues past its final Assistant turn"):
        split_transcripts("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "\n\nHuman: a\n\nAssistant: x")


def test_transcript_shape_file_gz(tmp_path):
    path = _write(
        tmp_path / "hh.jsonl.gz",
        [
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: what"},
        ],
    )
    data = PreferenceDataset.from_jsonl(path)
    assert list(data) == [PreferenceExample(f"{BOS}{USER}hi{END}{ASSISTANT}", "hello", "what")]


def _mixed_file(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "q1", "chosen": "a", "rejected": "b"},  # line 1: fine
            {"prompt": "q2", "chosen": "a"},  # line 2: no rejected
            "",  # line 3: blank, skipped by the reader, still counted
            {"prompt": "q4", "chosen": "  ", "rejected": "b"},  # line 4: empty chosen
            {"prompt": "q5", "chosen": "same", "rejected": "same"},  # line 5: identical
            {"prompt": "q6", "chosen": 7, "rejected": "b"},  # line 6: not a string
            {"chosen": "a", "rejected": "b"},  # line 7: no prompt in a prompt-shaped file
            {"prompt": "q8", "chosen": "c", "rejected": "d"},  # line 8: fine
        ],
    )


def test_invalid_records_raise_with_path_and_line(tmp_path):
    path = _mixed_file(tmp_path)
    with pytest.raises(ValueError) as err:
        PreferenceDataset.from_jsonl(path, on_invalid="error")
    message = str(err.value)
    assert f"{path}: 5 of 7 preference records are invalid" in message
    for line, reason in [
        (2, "missing field 'rejected'"),
        (4, "empty 'chosen'"),
        (5, "chosen and rejected are identical"),
        (6, "field 'chosen' is not a string (got int)"),
        (7, "missing field 'prompt'"),
    ]:
        assert f"{path}, line {line}: {reason}" in message
    assert "line 1:" not in message and "line 8:" not in message


def test_invalid_records_skipped_with_one_warning(tmp_path, caplog):
    path = _mixed_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neuraflux.data.preference"):
        data = PreferenceDataset.from_jsonl(path, on_invalid="skip")
    assert [ex.prompt for ex in data] == [f"{BOS}{USER}q1{END}{ASSISTANT}", f"{BOS}{USER}q8{END}{ASSISTANT}"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{path}, line 6: field 'chosen' is not a string" in warnings[0].getMessage()


def test_file_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        PreferenceDataset.from_jsonl(tmp_path / "missing.jsonl")
    bad_json = _write(tmp_path / "broken.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, '{"prompt": q'])
    with pytest.raises(ValueError, match=r"broken.jsonl, line 2: not valid JSON"):
        PreferenceDataset.from_jsonl(bad_json)
    wrong_fields = _write(tmp_path / "fields.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        ValueError, match=r"fields.jsonl: records need 'chosen' and 'rejected'.*\['question', 'answer'\]"
    ):
        PreferenceDataset.from_jsonl(wrong_fields)
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="empty.jsonl: the file holds no records"):
        PreferenceDataset.from_jsonl(empty)
    csv = _write(tmp_path / "pairs.csv", ["a,b"])
    with pytest.raises(ValueError, match=r"pairs.csv: preference files must end with one of"):
        PreferenceDataset.from_jsonl(csv)
    with pytest.raises(ValueError, match="on_invalid must be one of"):
        PreferenceDataset.from_jsonl(csv, on_invalid="ignore")


def test_from_records_reports_record_numbers():
    records = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "", "rejected": "b"}]
    with pytest.raises(ValueError, match=r"<mine>, record 2: empty 'chosen'"):
        PreferenceDataset.from_records(records, source="<mine>")
    assert len(PreferenceDataset.from_records(records, on_invalid="skip")) == 1
    assert len(PreferenceDataset.from_records(records[1:], on_invalid="skip")) == 0


def test_from_world_holds_the_world_pairs():
    world = generate_world(WorldConfig(n_entities=40))
    data = PreferenceDataset.from_world(world, rng_seed=2)
    pairs = preference_pairs(world, rng_seed=2)
    assert len(data) == len(pairs) > 0
    assert data[0] == PreferenceExample(**pairs[0])


def test_train_test_split_is_seeded_and_disjoint():
    records = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    data = PreferenceDataset.from_records(records)
    split = train_test_split(data, test_fraction=0.3, seed=0)
    train, test = [ex.prompt for ex in split.train], [ex.prompt for ex in split.test]
    assert (len(train), len(test)) == (7, 3)
    assert sorted(train + test) == sorted(ex.prompt for ex in data)
    assert [ex.prompt for ex in train_test_split(data, 0.3, seed=0).test] == test
    assert any([ex.prompt for ex in train_test_split(data, 0.3, seed=s).test] != test for s in range(1, 5))
    assert len(train_test_split(data, 0.01, seed=0).test) == 1  # at least one test example
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.0"):
        train_test_split(data, 1.0)
    with pytest.raises(ValueError, match="cannot split 1 preference example"):
        train_test_split(PreferenceDataset.from_records(records[:1]), 0.5)


@pytest.mark.skipif(not HH_FILE.is_file(), reason=f"{HH_FILE} is not on this machine")
def test_real_hh_rlhf_file(caplog):
    with caplog.at_level(logging.WARNING, logger="neuraflux.data.preference"):
        data = PreferenceDataset.from_jsonl(HH_FILE, on_invalid="skip")
    # 2312 lines; 4 have an empty final reply, 5 diverge before the last turn.
    assert len(data) == 2303
    message = caplog.records[-1].getMessage()
    assert "9 of 2312 preference records are invalid" in message
    assert f"{HH_FILE}, line 87: empty 'chosen' reply" in message
    first = data[0]
    assert first.prompt.startswith(
        f"{BOS}{USER}what are some pranks with a pen i can do?{END}"
        f"<|assistant|>Are you looking for practical joke ideas?{END}{USER}yep{END}"
    )
    assert first.prompt.endswith(f"{USER}okay some of these do not have anything to do with pens{END}{ASSISTANT}")
    assert first.chosen.startswith("No, sorry!")
    assert all(ex.prompt.startswith(BOS) and ex.prompt.endswith(ASSISTANT) and ex.chosen != ex.rejected for ex in data)
