"""What every data module shares: named batches, a resumable seeded sampler, loading local or hub datasets."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler


@dataclass(frozen=True)
class Window:
    """The optimizer step a training micro-batch belongs to: each count its loss is normalised by (`counts()` of
    the batch: loss tokens, pairs), summed over the step's micro-batches on this rank, and how many there are."""

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


def load_local_or_hub(path: str | None, dataset: str | None, split: str, key: str, **kwargs):
    """A `datasets.Dataset` from a local .txt/.json/.jsonl(.gz) file, a saved datasets folder, or a hub name.

    Hub names need the network the first time; afterwards the datasets cache serves them offline.
    """
    import datasets

    if (path is None) == (dataset is None):
        raise ValueError(f"{key}: give exactly one of a local path or a dataset name")
    if dataset is not None:
        return datasets.load_dataset(dataset, split=split, **kwargs)
    p = check_data_file(path, key)
    if p.is_dir():
        return datasets.load_from_disk(str(p))
    name = p.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return datasets.load_dataset("json", data_files=str(p), split="train", **kwargs)
    if name.endswith(".txt") or "." not in name:
        # the whole file is one document: line splits would cut sentences and waste block padding
        return datasets.load_dataset("text", data_files=str(p), split="train", sample_by="document", **kwargs)
    raise ValueError(f"{key}: {p} has an unsupported extension; use .txt, .jsonl, .jsonl.gz or a saved dataset folder")


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
