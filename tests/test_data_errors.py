"""A damaged data file is refused when its data module is built, before any training work, by a ValueError naming
the file and the 1-based line (or the field): not a `datasets` generation error, a gzip EOFError or a TypeError from
deep inside tokenizer training, and never a silent conversion. Through `python train.py` it is one line."""

from __future__ import annotations

import gzip
import json

import pytest

from neuraflux.data import LMDataModule, PreferenceDataModule, PreferenceDataset, PromptDataModule, SFTDataModule
from tests.test_config_errors import one_line_error
from tests.test_train import run_cli

PAIR = {"prompt": "What is the river?", "response": "Green."}
PREF = {"prompt": "What is the river?", "chosen": "Green.", "rejected": "Blue."}


def write_lines(path, lines: list[str | dict]):
    """Each item a line: a dict as JSON, a string as written."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- text that is not UTF-8 -------------------------------------------------------------------------------------


def test_pretraining_text_that_is_not_utf8_names_the_file_line_and_byte(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"the river is green\ncaf\xe9 au lait\nmore\n")  # latin-1, not UTF-8: 0xe9 at offset 19 + 3
    with pytest.raises(ValueError) as err:
        LMDataModule(path=str(f))
    assert str(err.value) == f"{f}, line 2: not UTF-8 text (byte 0xe9 at offset 22); save the file as UTF-8"


@pytest.mark.parametrize("name", ["corpus.txt.gz", "corpus.jsonl", "corpus.jsonl.gz"])
def test_pretraining_files_of_every_kind_name_the_line_that_is_not_utf8(tmp_path, name):
    raw = b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n' if ".jsonl" in name else b"fine\n\ncaf\xe9\n"
    f = tmp_path / name
    f.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(ValueError, match=rf"^{f}, line 3: not UTF-8 text \(byte 0xe9"):
        LMDataModule(path=str(f))


JSONL_READERS = {
    "sft": lambda f: SFTDataModule(path=str(f)),
    "preference": PreferenceDataset.from_jsonl,
    "prompts": lambda f: PromptDataModule(path=str(f)),
}


@pytest.mark.parametrize("reader", JSONL_READERS)
def test_jsonl_files_that_are_not_utf8_name_the_line(tmp_path, reader):
    # before: DatasetGenerationError, or for prompts a bare "'utf-8' codec can't decode byte 0xe9 ..." naming no file
    f = tmp_path / "records.jsonl"
    f.write_bytes(json.dumps(PAIR | PREF).encode() + b'\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(ValueError, match=rf"^{f}, line 2: not UTF-8 text \(byte 0xe9"):
        JSONL_READERS[reader](f)


# --- JSON-lines records that are not JSON objects -----------------------------------------------------------------


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "a", "response": ', "not valid JSON (Expecting value, column 29)"),
        ("prompt=a response=b", "not valid JSON (Expecting value, column 1)"),
        ('["a", "b"]', "not a JSON object (got array)"),
        ('"a"', "not a JSON object (got string)"),
        ("null", "not a JSON object (got null)"),
    ],
)
def test_a_bad_sft_line_names_the_file_and_its_line(tmp_path, line, reason):
    f = write_lines(tmp_path / "pairs.jsonl", [PAIR, "", line, PAIR])  # the blank line 2 still counts
    with pytest.raises(ValueError) as err:
        SFTDataModule(path=str(f))
    assert str(err.value) == f"{f}, line 3: {reason}"


# --- SFT fields of the wrong type ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": 5, "response": "a"}, "field 'prompt' must be a string, got a JSON number"),
        ({"prompt": "q", "response": ["a"]}, "field 'response' must be a string, got a JSON array"),
        ({"prompt": "q", "response": "a", "context": {"x": 1}},
         "field 'context' must be a string or null, got a JSON object"),
        ({"prompt": None, "response": "a"}, "field 'prompt' must be a string, got a JSON null"),
        ({"prompt": "q", "response": True}, "field 'response' must be a string, got a JSON boolean"),
        ({"prompt": "q", "response": ""}, "field 'response' is empty"),
        ({"prompt": "q", "response": "a", "repeats": "2"}, "field 'repeats' is '2'; it must be an integer >= 1"),
        ({"question": "q", "response": "a"}, "SFT records need fields ['prompt']; found ['question', 'response']"),
    ],
)  # fmt: skip
def test_an_sft_field_of_the_wrong_type_is_refused_naming_file_line_and_field(tmp_path, record, reason):
    # before, Arrow read these without a word: a number or a list reached the chat renderer as it was
    f = write_lines(tmp_path / "pairs.jsonl", [PAIR, PAIR, record])
    with pytest.raises(ValueError) as err:
        SFTDataModule(path=str(f))
    assert str(err.value) == f"{f}, line 3: {reason}"


def test_sft_records_read_line_by_line_keep_their_defaults(tmp_path):
    """What the reader accepts: context null or absent (""), repeats absent (1) beside records that have it, a
    .jsonl.gz file, extra fields ignored."""
    f = write_lines(
        tmp_path / "pairs.jsonl.gz",
        [PAIR | {"context": None, "id": 7}, "", {"prompt": "q", "response": "a", "repeats": 3, "context": "doc"}],
    )
    dm = SFTDataModule(path=str(f))
    assert dm._raw.to_list() == [
        {"prompt": PAIR["prompt"], "response": PAIR["response"], "context": "", "repeats": 1, "history": ""},
        {"prompt": "q", "response": "a", "context": "doc", "repeats": 3, "history": ""},
    ]


# --- pretraining records whose text field is not text ------------------------------------------------------------


@pytest.mark.parametrize(
    "record, got",
    [({"title": "no text"}, "missing or null"), ({"text": 5}, "a JSON number"), ({"text": ["a"]}, "a JSON array")],
)
def test_a_pretraining_record_without_text_names_the_line(tmp_path, record, got):
    # before: a TypeError from inside tokenizer training ("'NoneType' object is not iterable")
    f = write_lines(tmp_path / "docs.jsonl", [{"text": "the river is green"}, "", record])
    with pytest.raises(ValueError) as err:
        LMDataModule(path=str(f))
    assert str(err.value) == f"{f}, line 3: field 'text' is {got}, not a string"


def test_a_saved_dataset_whose_text_is_not_text_names_the_record(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["the river is green", None]}).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError) as err:
        LMDataModule(path=str(tmp_path / "saved"))
    assert str(err.value) == f"{tmp_path / 'saved'}, record 2: field 'text' is missing or null, not a string"


# --- .gz files that are not valid gzip ----------------------------------------------------------------------------


def damaged_gzip(path, how: str):
    whole = gzip.compress(("\n".join(json.dumps(PREF | PAIR | {"text": "t"}) for _ in range(50)) + "\n").encode())
    path.write_bytes(whole[: len(whole) // 2] if how == "truncated" else whole.replace(b"\x1f\x8b", b"{}", 1))
    return path


LOADERS = {
    "preference file": lambda f: PreferenceDataset.from_jsonl(f, on_invalid="error"),
    "preference module": lambda f: PreferenceDataModule(path=str(f)),
    "sft": lambda f: SFTDataModule(path=str(f)),
    "pretraining": lambda f: LMDataModule(path=str(f)),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    "how, reason",
    [
        ("truncated", r"not valid gzip: the file is truncated \(its compressed data stops before the end"),
        ("not gzip", "not valid gzip: it is not gzip-compressed$"),
    ],
)
def test_a_jsonl_gz_that_is_not_valid_gzip_is_named(tmp_path, loader, how, reason):
    # before: EOFError("Compressed file ended before the end-of-stream marker was reached") or
    # BadGzipFile("Not a gzipped file (b'{}')"), naming no file
    f = damaged_gzip(tmp_path / "data.jsonl.gz", how)
    with pytest.raises(ValueError, match=rf"^{f}: {reason}"):
        LOADERS[loader](f)


# --- through `python train.py` ---------------------------------------------------------------------------------


def test_a_bad_sft_line_is_one_error_line_from_train_py_before_any_work(tmp_path):
    f = write_lines(tmp_path / "pairs.jsonl", [PAIR, PAIR, {"prompt": "q", "response": ["a", "b"]}])
    out = run_cli("debug=tiny", "curriculum=none", "stage=sft", "data=sft", f"data.path={f}",
                  f"paths.output_dir={tmp_path / 'out'}")  # fmt: skip
    assert one_line_error(out) == f"error: {f}, line 3: field 'response' must be a string, got a JSON array"
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("tokenizer.json"))
