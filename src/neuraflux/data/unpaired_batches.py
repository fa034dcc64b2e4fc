"""Unpaired examples as token batches for `stage=kto`: `UnpairedBatch` and its data module.

An example becomes prompt + completion, ending with the chat format's `<|end|><|eos|>`, fitted to `max_length` as
preference pairs are (`preference_batches.fit_sequence`: the prompt loses tokens from the left first). A batch
also holds, for KTO's reference point, each prompt with the completion of the example before it in the batch
(the last one's for the first): the mismatched pairs `(x_i, y_{i-1})` TRL's KTOTrainer builds, here from the
batch's own completions, so the KL is estimated on the same outputs the rewards are (as the paper asks).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from neuraflux.data.common import Window
from neuraflux.data.lm import ResumableDataModule
from neuraflux.data.preference_batches import (
    EncodedSequence,
    PreferenceDataModule,
    check_pair_data_settings,
    completion_text,
    fit_sequence,
    split_by_prompt,
    stack_sequences,
)
from neuraflux.data.splits import split_held_out
from neuraflux.data.unpaired import UnpairedExample, read_unpaired_jsonl, unpair

log = logging.getLogger(__name__)


@dataclass
class UnpairedBatch:
    """B examples as one `(2B, T)` batch: rows `[0, B)` are prompt_i + completion_i (the examples), rows `[B, 2B)`
    prompt_i + completion_{i-1 mod B} (the mismatched pairs; with B = 1 the example itself).

    Right padded. `targets[:, t]` is `input_ids[:, t + 1]` (pad in the last column) and `response_mask[:, t]` is
    True where that target is a completion token, as in `PreferenceBatch`.
    """

    input_ids: torch.Tensor  # (2B, T) long
    attention_mask: torch.Tensor  # (2B, T) bool, True = a real token
    targets: torch.Tensor  # (2B, T) long
    response_mask: torch.Tensor  # (2B, T) bool, aligned to targets
    desirable: torch.Tensor  # (B,) bool, the examples' labels
    index: torch.Tensor  # (B,) long: each example's position in its split
    window: Window | None = None  # set on training batches by WindowedLoader

    @property
    def num_examples(self) -> int:
        return self.index.shape[0]

    def counts(self) -> dict[str, int]:
        """What the KTO loss is normalised by: examples (desirable and undesirable together)."""
        return {"examples": self.num_examples}

    def rows(self, mismatched: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, targets, response_mask) of the examples or of the mismatched pairs, `(B, T)` each."""
        part = slice(self.num_examples, None) if mismatched else slice(0, self.num_examples)
        return self.input_ids[part], self.targets[part], self.response_mask[part]


@dataclass(frozen=True)
class EncodedExample:
    index: int  # position in its split
    prompt: list[int]
    completion: list[int]  # the completion as the chat format ends it
    desirable: bool


def encode_examples(tokenizer, examples: list[UnpairedExample]) -> list[EncodedExample]:
    """Token ids of each example's prompt and completion, indexed by position; one batched encode per column."""
    prompts = tokenizer.encode_batch([e.prompt for e in examples])
    completions = tokenizer.encode_batch([completion_text(e.completion) for e in examples])
    return [
        EncodedExample(i, p, c, e.desirable)
        for i, (p, c, e) in enumerate(zip(prompts, completions, examples, strict=True))
    ]


def collate_unpaired(examples: list[EncodedExample], pad_id: int, max_length: int) -> UnpairedBatch:
    """The examples, then each prompt with the previous example's completion, as one right-padded UnpairedBatch."""
    shifted = examples[-1:] + examples[:-1]  # completion i - 1 for prompt i: TRL's rotation
    sequences: list[EncodedSequence] = [fit_sequence(e.prompt, e.completion, max_length) for e in examples]
    sequences += [fit_sequence(e.prompt, s.completion, max_length) for e, s in zip(examples, shifted, strict=True)]
    desirable = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    index = torch.tensor([e.index for e in examples], dtype=torch.long)
    return UnpairedBatch(*stack_sequences(sequences, pad_id), desirable, index)


class EncodedExamples(Dataset):
    def __init__(self, examples: list[EncodedExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> EncodedExample:
        return self.examples[i]


class UnpairedDataModule(ResumableDataModule):
    """Unpaired examples from the built-in world's preference pairs (`builtin: world`, unpaired) or a JSON-lines
    file in TRL's unpaired shape (`path`; see `neuraflux.data.unpaired`).

    The split into train and val holds out whole prompts: on the world, the pairs are split exactly as for
    `stage=dpo` (`split_by_prompt`, the held-out prompts of every stage) before they are unpaired.
    """

    def __init__(
        self,
        path: str | None = None,
        builtin: str | None = None,
        world: dict | None = None,
        on_invalid: str = "error",
        max_length: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        seed: int = 1337,
        num_workers: int = 0,
    ):
        super().__init__()
        check_pair_data_settings(path, builtin, on_invalid, max_length, batch_size, val_fraction)
        self.path, self.builtin, self.world_cfg, self.on_invalid = path, builtin, world or {}, on_invalid
        self.max_length, self.batch_size, self.val_fraction = max_length, batch_size, val_fraction
        self.seed, self.num_workers = seed, num_workers
        self.tokenizer = None
        # a missing file, an invalid record or too few examples fails here, before anything is written
        self.examples = self._load()

    def _load(self) -> dict[str, list[UnpairedExample]]:
        """The train and val examples."""
        if self.builtin is not None:
            # the world's pairs as stage=dpo reads them (validated, practice pairs train-only), split the same way
            pairs = PreferenceDataModule(builtin=self.builtin, world=self.world_cfg, seed=self.seed)
            split = split_by_prompt(pairs.dataset, self.val_fraction, seed=self.seed)
            extra = list(pairs.train_only) if pairs.train_only is not None else []
            return {"train": unpair([*split.train, *extra]), "val": unpair(split.test)}
        examples = read_unpaired_jsonl(self.path, self.on_invalid)
        if len(examples) < 2:
            raise ValueError(
                f"data.path={self.path}: {len(examples)} valid example(s); need at least 2 for train and val"
            )
        train, val = split_held_out(examples, self.val_fraction, self.seed, prompt=lambda e: e.prompt)
        return {"train": train, "val": val}

    def texts(self) -> list[str]:
        """Prompt + completion as rendered text, for training a tokenizer."""
        return [e.prompt + completion_text(e.completion) for part in self.examples.values() for e in part]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "sets"):
            return
        if self.tokenizer is None:
            raise RuntimeError("UnpairedDataModule.tokenizer must be set before setup()")
        self.sets = {
            name: EncodedExamples(encode_examples(self.tokenizer, part)) for name, part in self.examples.items()
        }
        self.collate = functools.partial(collate_unpaired, pad_id=self.tokenizer.pad_id, max_length=self.max_length)
        cut = sum(len(e.completion) > self.max_length - 1 for s in self.sets.values() for e in s.examples)
        if cut:
            log.warning(
                "%d unpaired examples have a completion longer than data.max_length - 1 = %d tokens; its end is cut",
                cut,
                self.max_length - 1,
            )
        counts = {name: (sum(e.desirable for e in part), len(part)) for name, part in self.examples.items()}
        log.info("unpaired data: %s (desirable of all)", ", ".join(f"{n} {d}/{t}" for n, (d, t) in counts.items()))

    @property
    def train_set(self) -> EncodedExamples:
        return self.sets["train"]

    @property
    def val_set(self) -> EncodedExamples:
        return self.sets["val"]

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.train_set, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._val_loader(self.val_set, self.collate)
