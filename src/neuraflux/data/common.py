"""What every data module shares: named batches, a resumable seeded sampler, loading local or hub datasets, and
reading data files so that a damaged one is refused naming the file and line."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler


@dataclass
class Window:
    """The optimizer step a training micro-batch belongs to: each count its loss is normalised by (`counts()` of
    the batch: loss tokens, pairs), summed over the step's micro-batches on this rank, and how many there are.

    Not frozen: the precision plugins that cast a batch's tensors (FSDP's, `bf16-true`) rebuild every dataclass in
    it field by field with setattr, and refuse a frozen one."""

    totals: dict[str, int]
    micro_batches: int


@dataclass
class LMBatch:
    """Next-token batch: targets[:, t] is the token after input_ids[:, t]; loss counts where loss_mask is True."""

    input_ids: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) bool
    attention_mask: torch.Tensor | None = None  # (B, T) bool, None when nothing is padded
    window: Window | None = None  # set on training batches by WindowedLoader

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def counts(self) -> dict[str, int]:
        return {"tokens": int(self.loss_mask.sum())}


class StreamSampler(Sampler[int]):
    """An endless, seeded stream of dataset indices: epoch e is a permutation seeded by (seed, e).

    Rank r of w takes every w-th index, so DDP ranks see disjoint data without Lightning's sampler.
    `start` skips that many of this rank's indices, which is how a resumed run continues where it stopped.
    It has no length: training length comes from trainer.max_steps.
    """

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.start, self.rank, self.world_size = size, seed, start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        per_epoch = len(range(self.rank, self.size, self.world_size))
        epoch, skip = divmod(self.start, per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.size, generator=g)[self.rank :: self.world_size]
            yield from perm[skip:].tolist()
            epoch, skip = epoch + 1, 0


class WindowedLoader(DataLoader):
    """A DataLoader whose batches know their optimizer step (`batch.window`), for token-exact accumulation.

    It reads the `accumulate` micro-batches of each step ahead and sums their `counts()`, so each micro-batch's
    loss can be divided by the whole step's count instead of its own: k accumulated micro-batches then give the
    gradient of one k-times batch (`stages.common.step_denominator`), however their token counts differ. Batches
    without `counts()` (rollout prompts) pass unchanged.
    """

    def __init__(self, *args, accumulate: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if accumulate < 1:
            raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate}")
        self.accumulate = accumulate

    def __iter__(self):
        batches = super().__iter__()
        while window := list(itertools.islice(batches, self.accumulate)):
            if hasattr(window[0], "counts"):
                totals: Counter[str] = Counter()
                for batch in window:
                    totals.update(batch.counts())
                for batch in window:
                    batch.window = Window(dict(totals), len(window))
            yield from window


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def check_data_file(path: str | Path, key: str = "data.path") -> Path:
    """The path must exist and be non-empty; checked before any work starts."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{key}: file {p} does not exist")
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"{key}: file {p} is empty")
    return p


def read_text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each line of a UTF-8 file, decompressed when its name ends in .gz.

    ValueError names the file and the line of the first byte that is not UTF-8 (with its byte offset), or says the
    file is not valid gzip (not compressed at all, corrupt, or truncated): the codec's, gzip's and `datasets`' own
    errors name neither the file nor the line.
    """
    n, offset = 0, 0  # lines read, and the (decompressed) offset of the next line's first byte
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb") as f:
            # split on b"\n" before decoding: in UTF-8 that byte is never part of another character
            for n, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{path}, line {n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                        f"{offset + err.start}); save the file as UTF-8"
                    ) from None
                offset += len(raw)
                yield n, text
    except EOFError:
        raise ValueError(
            f"{path}: not valid gzip: the file is truncated (its compressed data stops before the end of the stream; "
            f"{n} whole lines read)"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as err:
        reason = "it is not gzip-compressed" if str(err).startswith("Not a gzipped file") else str(err)
        raise ValueError(f"{path}: not valid gzip: {reason}") from None


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type (object, array, string, number, boolean, null), for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_json_lines(path: Path) -> tuple[list[dict], list[int]]:
    """The records of a JSON-lines file (.jsonl, or .jsonl.gz) and their 1-based line numbers, blank lines skipped.

    ValueError names the file and line of the first line that is not UTF-8, not JSON or not a JSON object.
    """
    records, numbers = [], []
    for n, line in read_text_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line.rstrip("\r\n"))  # so that the column is the line's
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}, line {n}: not a JSON object (got {json_type(value)})")
        records.append(value)
        numbers.append(n)
    return records, numbers


def _not_a_string(value: object) -> str:
    return "missing or null" if value is None else f"a JSON {json_type(value)}"


def _find_damage(p: Path, string_fields: tuple[str, ...]) -> None:
    """Read a local file ourselves and raise a ValueError naming the file and line of its first flaw (not UTF-8, not
    valid gzip, not a JSON object, a `string_fields` field that some record has and this one lacks or holds as
    something else); return if there is none."""
    if not p.name.removesuffix(".gz").endswith(".jsonl"):
        for _ in read_text_lines(p):
            pass
        return
    records, lines = read_json_lines(p)
    present = [f for f in string_fields if any(f in r for r in records)]
    for record, n in zip(records, lines, strict=True):
        for field in present:
            if not isinstance(record.get(field), str):
                raise ValueError(f"{p}, line {n}: field {field!r} is {_not_a_string(record.get(field))}, not a string")


def load_local_or_hub(
    path: str | None, dataset: str | None, split: str, key: str, string_fields: tuple[str, ...] = (), **kwargs
):
    """A `datasets.Dataset` from a local .txt/.json/.jsonl(.gz) file, a saved datasets folder, or a hub name.

    Hub names need the network the first time; afterwards the datasets cache serves them offline. A local file that
    `datasets` cannot read (not UTF-8, not JSON, not valid gzip) is refused naming the file and line, and so is a
    record whose `string_fields` column (where the data has that column) is missing, null or not a string.
    """
    import datasets

    if (path is None) == (dataset is None):
        raise ValueError(f"{key}: give exactly one of a local path or a dataset name")
    if dataset is not None:
        ds, p = datasets.load_dataset(dataset, split=split, **kwargs), None
    else:
        p = check_data_file(path, key)
        ds = datasets.load_from_disk(str(p)) if p.is_dir() else _load_file(p, key, string_fields, **kwargs)
    try:
        _check_string_columns(ds, string_fields, str(p or dataset))
    except ValueError:
        if p is not None and p.is_file():
            _find_damage(p, string_fields)  # a JSON-lines file: the same flaw, named by its line
        raise
    return ds


def _load_file(p: Path, key: str, string_fields: tuple[str, ...], **kwargs):
    import datasets

    name = p.name.removesuffix(".gz")
    is_json = name.endswith((".jsonl", ".json"))
    if not is_json and not (name.endswith(".txt") or "." not in name):
        raise ValueError(
            f"{key}: {p} has an unsupported extension; use .txt, .jsonl, .jsonl.gz or a saved dataset folder"
        )
    try:
        if not is_json:
            # the whole file is one document: line splits would cut sentences and waste block padding
            return datasets.load_dataset("text", data_files=str(p), split="train", sample_by="document", **kwargs)
        ds = datasets.load_dataset("json", data_files=str(p), split="train", **kwargs)
        # Arrow's JSON reader keeps bytes that are not UTF-8, to fail later wherever the text is decoded
        ds.data.table.validate(full=True)
        return ds
    except Exception:
        # The builders' errors (DatasetGenerationError, EOFError, ArrowInvalid, ...) name neither the file nor the
        # line: read the file ourselves, only now that it failed, to say where. An error it cannot explain stays.
        _find_damage(p, string_fields)
        raise


def _check_string_columns(ds, fields: tuple[str, ...], source: str) -> None:
    """ValueError naming the first record whose `fields` value is not a string, where ds has that column. Free when
    Arrow typed the column as strings without nulls; the column is scanned only otherwise."""
    import datasets

    for field in fields:
        if field not in ds.column_names:
            continue
        feature = ds.features[field]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            if ds.data.column(field).null_count == 0:
                continue
        for i, value in enumerate(ds[field], start=1):
            if not isinstance(value, str):
                raise ValueError(f"{source}, record {i}: field {field!r} is {_not_a_string(value)}, not a string")


def move_batch(batch, device: torch.device):
    """Move a dataclass batch's tensors; a no-op on CPU (Lightning's generic walk costs ~5 ms a step)."""
    if device.type == "cpu":
        return batch
    from dataclasses import fields, replace

    moved = {
        f.name: getattr(batch, f.name).to(device, non_blocking=True)
        for f in fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return replace(batch, **moved)
