"""Preference pairs as token batches for `stage=reward` and `stage=dpo`: `PreferenceBatch` and its data module.

A pair becomes two sequences, prompt + chosen and prompt + rejected, each ending with the chat format's
`<|end|><|eos|>` (as `chat.render_example` ends a response). Both halves of a batch are right padded to one
length and stacked, so a stage scores all 2B sequences in one forward. When a sequence is longer than
`max_length`, the prompt loses tokens from the left (the question sits at its end) and the response is kept;
only a response that alone does not fit is cut at its end, with one logged warning counting such pairs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from neuraflux.chat import render_completion
from neuraflux.data.common import Window
from neuraflux.data.lm import ResumableDataModule
from neuraflux.data.preference import ON_INVALID, PreferenceDataset, PreferenceExample, PreferenceSplit
from neuraflux.data.splits import split_held_out

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


class Paired(NamedTuple):
    """A per-pair quantity for the chosen and the rejected responses, each `(B,)`."""

    chosen: torch.Tensor
    rejected: torch.Tensor


@dataclass
class PreferenceBatch:
    """B pairs as one `(2B, T)` batch: rows `[0, B)` are prompt + chosen, rows `[B, 2B)` prompt + rejected.

    Right padded. `targets[:, t]` is `input_ids[:, t + 1]` (pad in the last column) and `response_mask[:, t]` is
    True where that target is a response token, so per-token log-probs of the responses are
    `token_logprobs(logits, targets)` under `response_mask`.
    """

    input_ids: torch.Tensor  # (2B, T) long
    attention_mask: torch.Tensor  # (2B, T) bool, True = a real token
    targets: torch.Tensor  # (2B, T) long
    response_mask: torch.Tensor  # (2B, T) bool, aligned to targets
    index: torch.Tensor  # (B,) long: each pair's position in its split (keys precomputed reference log-probs)
    window: Window | None = None  # set on training batches by WindowedLoader

    @property
    def num_pairs(self) -> int:
        return self.index.shape[0]

    def counts(self) -> dict[str, int]:
        """What the preference losses are normalised by: pairs, and the chosen responses' tokens (RPO)."""
        return {"pairs": self.num_pairs, "chosen_tokens": int(self.chosen_response_mask.sum())}

    def pair(self, values: torch.Tensor) -> Paired:
        """Split a `(2B, ...)` result of the stacked forward into its chosen and rejected halves."""
        return Paired(values[: self.num_pairs], values[self.num_pairs :])

    @property
    def chosen_ids(self) -> torch.Tensor:
        return self.input_ids[: self.num_pairs]

    @property
    def rejected_ids(self) -> torch.Tensor:
        return self.input_ids[self.num_pairs :]

    @property
    def chosen_attention_mask(self) -> torch.Tensor:
        return self.attention_mask[: self.num_pairs]

    @property
    def rejected_attention_mask(self) -> torch.Tensor:
        return self.attention_mask[self.num_pairs :]

    @property
    def chosen_response_mask(self) -> torch.Tensor:
        return self.response_mask[: self.num_pairs]

    @property
    def rejected_response_mask(self) -> torch.Tensor:
        return self.response_mask[self.num_pairs :]


@dataclass(frozen=True)
class EncodedSequence:
    ids: list[int]  # prompt tokens, then response tokens
    response_start: int  # index of the first response token
    response_cut: bool  # the response alone was longer than max_length - 1 tokens and lost its end


@dataclass(frozen=True)
class EncodedPair:
    index: int  # position in its split
    chosen: EncodedSequence
    rejected: EncodedSequence

    @property
    def response_cut(self) -> bool:
        return self.chosen.response_cut or self.rejected.response_cut


def split_by_prompt(dataset: PreferenceDataset, val_fraction: float, seed: int) -> PreferenceSplit:
    """A seeded split that holds out whole prompts: every pair of a held-out prompt is in `test`.

    A pair-level split would put the other pairs of a validation prompt (the same question, the same good answer)
    in training, and validation accuracy would measure memory. The prompts are split by `data.splits`, so on the
    world's pairs the held-out prompts are the ones every other stage holds out.
    """
    prompts = list(dataset.data["prompt"])
    train, test = split_held_out(range(len(prompts)), val_fraction, seed, prompt=prompts.__getitem__)
    return PreferenceSplit(PreferenceDataset(dataset.data.select(train)), PreferenceDataset(dataset.data.select(test)))


def completion_text(response: str) -> str:
    """A bare response as the chat format ends it (the second half of `chat.render_example`)."""
    return render_completion(response)


def fit_sequence(prompt: list[int], response: list[int], max_length: int) -> EncodedSequence:
    """Prompt + response in at most max_length tokens; the prompt loses tokens from the left first.

    At least one prompt token stays, because the first response token is only a target after some input
    position.
    """
    if not prompt:
        raise ValueError("a preference prompt encodes to no tokens")
    cut = len(response) > max_length - 1
    response = response[: max_length - 1]
    prompt = prompt[max(0, len(prompt) + len(response) - max_length) :]
    return EncodedSequence(prompt + response, len(prompt), cut)


def encode_scored(
    tokenizer, prompts: list[str], responses: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response texts as a reward model reads them in training (`encode_pairs`): right-padded
    `(B, T)` input ids and bool attention mask."""
    seqs = [
        fit_sequence(p, r, max_length)
        for p, r in zip(
            tokenizer.encode_batch(prompts),
            tokenizer.encode_batch([completion_text(r) for r in responses]),
            strict=True,
        )
    ]
    return right_pad(seqs, tokenizer.pad_id)


def right_pad(sequences: list[EncodedSequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N, T)` input ids padded on the right with `pad_id`, and the bool mask of the real tokens."""
    T = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.bool)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        attention_mask[i, : len(s.ids)] = True
    return input_ids, attention_mask


def encode_pairs(tokenizer, examples: list[PreferenceExample], max_length: int) -> list[EncodedPair]:
    """Token ids of each pair's two sequences, indexed by position; one batched encode per column."""
    prompts = tokenizer.encode_batch([e.prompt for e in examples])
    chosen = tokenizer.encode_batch([completion_text(e.chosen) for e in examples])
    rejected = tokenizer.encode_batch([completion_text(e.rejected) for e in examples])
    return [
        EncodedPair(i, fit_sequence(p, c, max_length), fit_sequence(p, r, max_length))
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True))
    ]


def stack_sequences(sequences: list[EncodedSequence], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded `(N, T)` input_ids, attention_mask, next-token targets (pad after the last) and the bool mask
    of the targets that are response tokens."""
    input_ids, attention_mask = right_pad(sequences, pad_id)
    response_mask = torch.zeros_like(attention_mask)
    for i, s in enumerate(sequences):
        # target t is token t + 1: the response's first token is the target at response_start - 1
        response_mask[i, s.response_start - 1 : len(s.ids) - 1] = True
    targets = torch.cat([input_ids[:, 1:], torch.full((len(sequences), 1), pad_id, dtype=torch.long)], dim=1)
    return input_ids, attention_mask, targets, response_mask


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> PreferenceBatch:
    """Stack chosen then rejected sequences into one right-padded `(2B, T)` PreferenceBatch."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    index = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return PreferenceBatch(*stack_sequences(sequences, pad_id), index)


class EncodedPairs(Dataset):
    def __init__(self, pairs: list[EncodedPair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> EncodedPair:
        return self.pairs[i]


def check_pair_data_settings(path, builtin, on_invalid, max_length, batch_size, val_fraction) -> None:
    """The settings the preference and unpaired (KTO) data modules share, each refused naming its key."""
    if (path is None) == (builtin is None):
        raise ValueError("data: set exactly one of data.path or data.builtin")
    if on_invalid not in ON_INVALID:
        raise ValueError(f"data.on_invalid must be one of {list(ON_INVALID)}, got {on_invalid!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(
            f"data.max_length must be an integer >= 2 (a prompt token and a response token), got {max_length!r}"
        )
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"data.batch_size must be a positive integer, got {batch_size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")


class PreferenceDataModule(ResumableDataModule):
    """Preference pairs from the built-in world (`builtin: world`) or a JSON-lines file (`path`).

    Files may hold {"prompt", "chosen", "rejected"} records or hh-rlhf {"chosen", "rejected"} transcripts (see
    `neuraflux.data.preference`); invalid records are skipped with one warning or, with `on_invalid: error`,
    reported together in one error naming file and line. The split into train and val is seeded and holds out
    whole prompts (`split_by_prompt`).
    """

    def __init__(
        self,
        path: str | None = None,
        builtin: str | None = None,
        world: dict | None = None,
        on_invalid: str = "skip",
        max_length: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        seed: int = 1337,
        num_workers: int = 0,
        retrieve_context: bool = False,
        retrieval: dict | None = None,
    ):
        super().__init__()
        check_pair_data_settings(path, builtin, on_invalid, max_length, batch_size, val_fraction)
        if retrieve_context and builtin is None:
            raise ValueError(
                "data.retrieve_context=true reads the built-in world's documents: it needs data.builtin=world"
            )
        self.retrieve_context = retrieve_context
        self.retrieval = None  # with retrieve_context: the world store's embedder and index (`retrieval` group)
        if retrieve_context:
            from neuraflux.retrieval.documents import retrieval_settings

            self.retrieval = retrieval_settings(retrieval)  # a bad key or value is named before anything is written
        self.path, self.builtin, self.world_cfg, self.on_invalid = path, builtin, world or {}, on_invalid
        self.max_length, self.batch_size, self.val_fraction = max_length, batch_size, val_fraction
        self.seed, self.num_workers = seed, num_workers
        self.tokenizer = None
        self.train_only: PreferenceDataset | None = None  # pairs that join the training split, never held out
        self.retriever = None  # with retrieve_context: the world store, for context-less prompts
        self.dataset = self._load()  # a missing file or no valid pair fails here, before anything is written

    def _load(self) -> PreferenceDataset:
        if self.builtin is not None:
            from neuraflux.data.builtin import check_builtin
            from neuraflux.world import WorldConfig, generate_world

            check_builtin(self.builtin)
            world = generate_world(WorldConfig.from_dict(self.world_cfg))
            dataset = PreferenceDataset.from_world(world)
            if self.retrieve_context:
                from neuraflux.rag import world_retriever

                self.retriever = world_retriever(world, self.retrieval)
            self.train_only = PreferenceDataset.from_practice(world)
            source = f"data.builtin={self.builtin}"
        else:
            dataset = PreferenceDataset.from_jsonl(self.path, on_invalid=self.on_invalid)
            source = f"data.path={self.path}"
        if len(dataset) < 2:
            raise ValueError(f"{source}: {len(dataset)} valid preference pair(s); need at least 2 for train and val")
        return dataset

    def texts(self) -> list[str]:
        """Prompt + chosen and prompt + rejected as rendered text, for training a tokenizer."""
        extra = list(self.train_only) if self.train_only is not None else []
        return [e.prompt + completion_text(r) for e in [*self.dataset, *extra] for r in (e.chosen, e.rejected)]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "sets"):
            return
        if self.tokenizer is None:
            raise RuntimeError("PreferenceDataModule.tokenizer must be set before setup()")
        # split on the pairs as generated, so the held-out prompts are the same with or without retrieved context
        split = split_by_prompt(self.dataset, self.val_fraction, seed=self.seed)
        train = list(split.train) + (list(self.train_only) if self.train_only is not None else [])
        # the pairs each split trains or validates on, as text (what a held-out check reads)
        self.examples = {"train": self.with_context(train), "val": self.with_context(list(split.test))}
        self.sets = {
            name: EncodedPairs(encode_pairs(self.tokenizer, part, self.max_length))
            for name, part in self.examples.items()
        }
        self.collate = functools.partial(collate_pairs, pad_id=self.tokenizer.pad_id)
        cut = sum(p.response_cut for s in self.sets.values() for p in s.pairs)
        if cut:
            log.warning(
                "%d of %d preference pairs have a response longer than data.max_length - 1 = %d tokens; "
                "its end was cut",
                cut,
                len(self.dataset),
                self.max_length - 1,
            )
        log.info("preference data: %d train, %d val pairs", len(self.sets["train"]), len(self.sets["val"]))

    def with_context(self, examples: list[PreferenceExample]) -> list[PreferenceExample]:
        """With retrieve_context, each context-less prompt gets the world store's top document for its question
        as context (what `NanoRAG` would show the policy); otherwise the examples as they are."""
        if self.retriever is None:
            return examples
        from neuraflux.rag import add_retrieved_context

        distinct = list(dict.fromkeys(e.prompt for e in examples))
        rendered = dict(zip(distinct, add_retrieved_context(distinct, self.retriever), strict=True))
        return [PreferenceExample(rendered[e.prompt], e.chosen, e.rejected) for e in examples]

    @property
    def train_set(self) -> EncodedPairs:
        return self.sets["train"]

    @property
    def val_set(self) -> EncodedPairs:
        return self.sets["val"]

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.train_set, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._val_loader(self.val_set, self.collate)

    def sequential_loader(self, split: str) -> DataLoader:
        """Every pair of a split once, in order (for precomputing per-pair quantities such as reference log-probs)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return self._val_loader(self.sets[split], self.collate)
