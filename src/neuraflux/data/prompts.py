"""Prompts for rollouts (PPO, REINFORCE): the built-in world's RL prompts or a JSONL file, rendered as chat.

A JSONL record is `{"prompt": str, "context"?: str}` (one user turn, with the context turn when given) or
`{"messages": [{"role", "content"}, ...], "context"?: str}` (a conversation ending with the user's turn). Special
tokens are never read from the file: a prompt that is already rendered (starts with `<|bos|>`) is refused.
Batches are left-padded so every row's prompt ends in the same column and generation decodes in lockstep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from neuraflux.chat import Message, render_prompt, render_record
from neuraflux.data.common import check_data_file, read_json_lines
from neuraflux.data.lm import ResumableDataModule
from neuraflux.data.splits import split_held_out

log = logging.getLogger(__name__)


@dataclass
class PromptBatch:
    """Rendered prompts and their left-padded token ids."""

    texts: list[str]  # the rendered prompts in full (what judges read), even where the ids were truncated
    input_ids: torch.Tensor  # (B, P) long, left-padded
    attention_mask: torch.Tensor  # (B, P) bool, True = real token

    def __len__(self) -> int:
        return len(self.texts)

    def repeat_interleave(self, k: int) -> PromptBatch:
        """Each prompt k times in a row (k samples per prompt, contiguous as leave-one-out wants them)."""
        return PromptBatch(
            [t for t in self.texts for _ in range(k)],
            self.input_ids.repeat_interleave(k, dim=0),
            self.attention_mask.repeat_interleave(k, dim=0),
        )


def encode_prompts(tokenizer, texts: list[str], max_prompt_tokens: int | None = None) -> PromptBatch:
    """Tokenize and left-pad; a prompt longer than max_prompt_tokens keeps its last tokens (the question)."""
    ids = tokenizer.encode_batch(list(texts))
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"prompts {empty} encode to no tokens")
    input_ids, attention_mask = tokenizer.pad_batch(ids, padding_side="left", max_length=max_prompt_tokens)
    return PromptBatch(list(texts), input_ids, attention_mask)


def render_prompt_record(record: object, where: str) -> str:
    """One `{"prompt" | "messages", "context"?}` record as a rendered chat prompt; ValueError names `where` and why."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return render_record(record, where)


def read_prompt_file(path: str | Path) -> list[str]:
    """Rendered prompts from a .jsonl file; the first bad line (not UTF-8, not a JSON object, not a prompt record) is
    named by file and 1-based line."""
    p = check_data_file(path, "data.path")
    if not p.name.endswith(".jsonl"):
        raise ValueError(f"data.path: {p} must be a .jsonl file of {{'prompt' | 'messages', 'context'?}} records")
    records, lines = read_json_lines(p)
    prompts = [render_prompt_record(record, f"{p}, line {n}") for record, n in zip(records, lines, strict=True)]
    if not prompts:
        raise ValueError(f"data.path: {p} holds no prompts")
    return prompts


def world_prompt_texts(world_cfg: dict) -> list[str]:
    """The world's RL prompts (questions, unknown entities, red-team requests), rendered with contexts."""
    from neuraflux.world import WorldConfig, generate_world, rl_prompts

    world = generate_world(WorldConfig.from_dict(world_cfg))
    return [render_prompt([Message("user", p.prompt)], context=p.context) for p in rl_prompts(world)]


class PromptDataModule(ResumableDataModule):
    """Rendered prompts from a JSONL file (`data.path`) or the built-in world (`data.builtin: world`).

    The prompts `data.splits.split_held_out` holds out (a seeded `val_fraction`) are for validation rollouts
    only; training draws the rest from the resumable endless stream every stage shares.
    """

    def __init__(
        self,
        path: str | None = None,
        builtin: str | None = None,
        max_prompt_tokens: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 1337,
        num_workers: int = 0,
        world: dict | None = None,
    ):
        super().__init__()
        if (path is None) == (builtin is None):
            raise ValueError("data: set exactly one of data.path or data.builtin")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if max_prompt_tokens <= 0:
            raise ValueError(f"data.max_prompt_tokens must be positive, got {max_prompt_tokens}")
        self.path, self.builtin, self.max_prompt_tokens = path, builtin, max_prompt_tokens
        self.batch_size, self.val_fraction, self.seed, self.num_workers = (
            batch_size,
            val_fraction,
            seed,
            num_workers,
        )
        self.tokenizer = None
        self._prompts = self._load(dict(world or {}))  # a missing or bad file fails now, before any work

    def _load(self, world_cfg: dict) -> list[str]:
        if self.builtin is not None:
            from neuraflux.data.builtin import check_builtin

            check_builtin(self.builtin)
            return world_prompt_texts(world_cfg)
        return read_prompt_file(self.path)

    def texts(self) -> list[str]:
        """The rendered prompts, for training a tokenizer."""
        return list(self._prompts)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        if self.tokenizer is None:
            raise RuntimeError("PromptDataModule.tokenizer must be set before setup()")
        self.train_set, self.val_set = split_held_out(self._prompts, self.val_fraction, self.seed)
        self.collate = partial(encode_prompts, self.tokenizer, max_prompt_tokens=self.max_prompt_tokens)
        log.info("prompts: %d train, %d val", len(self.train_set), len(self.val_set))

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.train_set, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._val_loader(self.val_set, self.collate)
