"""Causal-LM data: a text source tokenized once (datasets.map, cached), packed into blocks, split, seeded."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from neuraflux.chat import escape_special
from neuraflux.data.common import (
    LMBatch,
    StreamSampler,
    WindowedLoader,
    file_fingerprint,
    load_local_or_hub,
    move_batch,
)

log = logging.getLogger(__name__)


class TokenWindows(Dataset):
    """Windows of block_size + 1 tokens over one token stream, starting every `stride` tokens."""

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int):
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"only {len(tokens)} tokens, fewer than data.block_size + 1 = {block_size + 1}: "
                "use more text, a smaller block size or a smaller val_fraction"
            )
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.stride
        return self.tokens[start : start + self.block_size + 1]


def collate_windows(windows: list[torch.Tensor]) -> LMBatch:
    x = torch.stack(windows).long()  # (B, T + 1)
    return LMBatch(input_ids=x[:, :-1], targets=x[:, 1:], loss_mask=torch.ones_like(x[:, 1:], dtype=torch.bool))


class ResumableDataModule(pl.LightningDataModule):
    """Shared by every data module: the resumable train loader and a sequential val loader."""

    batch_size: int
    num_workers: int
    seed: int

    def _train_loader(self, dataset: Dataset, collate: Callable) -> DataLoader:
        rank, world, start, accumulate = 0, 1, 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            accumulate = self.trainer.accumulate_grad_batches
            # A resumed run has its global step restored before the loaders are built: skip what was used
            # (a whole number of optimizer steps, so the accumulation windows line up again).
            start = self.trainer.global_step * accumulate * self.batch_size
        sampler = StreamSampler(len(dataset), self.seed, start=start, rank=rank, world_size=world)
        return WindowedLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            accumulate=accumulate,
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return move_batch(batch, device)

    def _val_loader(self, dataset: Dataset, collate: Callable) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate, num_workers=0)


class LMDataModule(ResumableDataModule):
    """Pretraining text from a local file (.txt, .jsonl[.gz]), a `datasets` dataset, or the built-in world.

    The token stream is split contiguously: the first 1 - val_fraction for training, the rest for validation.
    Training windows start every `stride` tokens (stride 1 = every offset, as random-offset samplers do);
    validation uses non-overlapping blocks.
    """

    def __init__(
        self,
        path: str | None = None,
        dataset: str | None = None,
        builtin: str | None = None,
        text_field: str = "text",
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        stride: int | None = None,
        seed: int = 1337,
        num_workers: int = 0,
        world: dict | None = None,
    ):
        super().__init__()
        sources = [s for s in (path, dataset, builtin) if s is not None]
        if len(sources) != 1:
            raise ValueError("data: set exactly one of data.path, data.dataset or data.builtin")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size <= 0 or block_size <= 0:
            raise ValueError("data.batch_size and data.block_size must be positive")
        self.path, self.dataset_name, self.builtin, self.text_field = path, dataset, builtin, text_field
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.stride = stride or block_size
        self.seed, self.num_workers, self.world_cfg = seed, num_workers, world or {}
        self.tokenizer = None
        self._raw = self._load()  # fails now, naming the path, if the source is missing or empty

    def _load(self):
        import datasets

        if self.builtin is not None:
            from neuraflux.data.builtin import builtin_pretrain_texts

            return datasets.Dataset.from_dict({"text": builtin_pretrain_texts(self.builtin, self.world_cfg)})
        key = "data.path" if self.path else "data.dataset"
        # every document a string: otherwise tokenizer training fails on it with a TypeError naming neither
        ds = load_local_or_hub(self.path, self.dataset_name, "train", key, string_fields=(self.text_field,))
        if self.text_field not in ds.column_names:
            raise ValueError(f"data.text_field: column {self.text_field!r} not in {ds.column_names}")
        if len(ds) == 0 or not any(ds[: min(len(ds), 100)][self.text_field]):
            raise ValueError(f"data: {self.path or self.dataset_name} has no text")
        return ds

    def texts(self) -> list[str]:
        """The raw documents, for training a tokenizer."""
        return self._raw[self.text_field]

    def _fingerprint(self) -> str:
        from pathlib import Path

        src = file_fingerprint(Path(self.path)) if self.path else str(self.dataset_name or self.builtin)
        # "text": special-token strings in the text are escaped (a cache of ids from before that must not be reused)
        return f"{src}-{self.text_field}-{self.tokenizer.fingerprint()}-text"

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        if self.tokenizer is None:
            raise RuntimeError("LMDataModule.tokenizer must be set before setup()")
        tok, field = self.tokenizer, self.text_field
        eos = tok.eos_id
        # Documents are joined with eos so the model learns where one ends. Text from a file or a dataset never
        # holds a special token; the built-in world's text is ours, and its chat-format reading exercises are meant
        # to carry the chat format's tokens (pretraining learns to read a context turn from them).
        text = (lambda t: t) if self.builtin is not None else escape_special
        tokenized = self._raw.map(
            lambda b: {"ids": [ids + [eos] for ids in tok.encode_batch([text(t) for t in b[field]])]},
            batched=True,
            remove_columns=self._raw.column_names,
            new_fingerprint=self._fingerprint(),
            desc="tokenizing",
        )
        stream = torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.int32) for x in tokenized["ids"]]))
        n_val = max(int(len(stream) * self.val_fraction), self.block_size + 1)
        self.train_tokens, self.val_tokens = stream[:-n_val], stream[-n_val:]
        self.train_set = TokenWindows(self.train_tokens, self.block_size, self.stride)
        self.val_set = TokenWindows(self.val_tokens, self.block_size, self.block_size)
        log.info("LM data: %d train tokens, %d val tokens", len(self.train_tokens), len(self.val_tokens))

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.train_set, collate_windows)

    def val_dataloader(self) -> DataLoader:
        return self._val_loader(self.val_set, collate_windows)
