"""Supervised fine-tuning data: prompt/response pairs in the chat format, loss on response tokens only.

A record is `{"prompt": str, "response": str, "context"?: str | null, "repeats"?: int >= 1}`, or a conversation as TRL
writes it, `{"messages": [{"role", "content"}, ...], "repeats"?}`, whose last (assistant) turn is trained on and whose
earlier turns are its prompt (data/conversation.py). JSON-lines files are
read here, line by line, so that a record of the wrong shape is refused naming the file, the 1-based line and the
field: through Arrow a number or a list where text belongs would arrive as such, or as a string, without a word.
"""

from __future__ import annotations

import json
import logging

import torch
from torch.utils.data import DataLoader, Dataset

from neuraflux.chat import Message, render_completion, render_example, render_prompt
from neuraflux.data.common import LMBatch, check_data_file, json_type, load_local_or_hub, read_json_lines
from neuraflux.data.conversation import sft_exchange
from neuraflux.data.lm import ResumableDataModule

log = logging.getLogger(__name__)


def render_sft(prompt: str, response: str, context: str | None, history: str = "") -> tuple[str, str]:
    """(prompt_text, completion_text): `history` is the JSON list of turns before the user's `prompt` ("" for none)."""
    if not history:
        return render_example(prompt, response, context or None)
    turns = [Message(t["role"], t["content"]) for t in json.loads(history)]
    return render_prompt([*turns, Message("user", prompt)], context=context or None), render_completion(response)


def encode_example(
    tokenizer, prompt: str, response: str, context: str | None, max_tokens: int, history: str = ""
) -> dict:
    """Token ids and the index where the response starts.

    Over-long examples lose prompt tokens from the left (the response is what is trained on, and the
    question sits at the prompt's end); a response longer than max_tokens is cut at its end.
    """
    prompt_text, completion_text = render_sft(prompt, response, context, history)
    p, c = tokenizer.encode(prompt_text), tokenizer.encode(completion_text)
    c = c[: max_tokens - 1]
    p = p[max(0, len(p) + len(c) - max_tokens) :]
    return {"ids": p + c, "response_start": len(p)}


class SFTExamples(Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]


def make_sft_collate(pad_id: int):
    def collate(items: list[dict]) -> LMBatch:
        T = max(len(it["ids"]) for it in items) - 1
        B = len(items)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        targets = torch.full((B, T), pad_id, dtype=torch.long)
        loss_mask = torch.zeros((B, T), dtype=torch.bool)
        attention_mask = torch.zeros((B, T), dtype=torch.bool)
        for i, it in enumerate(items):
            ids = torch.tensor(it["ids"], dtype=torch.long)
            n = len(ids) - 1
            input_ids[i, :n], targets[i, :n] = ids[:-1], ids[1:]
            attention_mask[i, :n] = True
            # target t is token t + 1: the response's first token is the target at response_start - 1
            loss_mask[i, it["response_start"] - 1 : n] = True
        return LMBatch(input_ids, targets, loss_mask, None if bool(attention_mask.all()) else attention_mask)

    return collate


def _whole_count(value) -> bool:
    # a count may arrive as 1.0 (JSON writers, Arrow columns of 1 and 1.5); True is not a count
    return type(value) in (int, float) and float(value).is_integer() and value >= 1


def sft_record(record: dict, where: str) -> dict:
    """One raw record as {prompt, response, context, repeats} (context "" and repeats 1 when absent); ValueError
    names `where` ("path, line 3") and the field. A conversation (`messages`) also gets `history`: the JSON list of
    the turns before its last user turn."""
    if "messages" in record and "prompt" not in record and "response" not in record:
        try:
            exchange = sft_exchange(record)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        plain = {"prompt": exchange.history[-1].content, "response": exchange.response, "context": exchange.context}
        history = [{"role": m.role, "content": m.content} for m in exchange.history[:-1]]
        return {**sft_record({**plain, "repeats": record.get("repeats", 1)}, where), "history": json.dumps(history)}
    missing = [name for name in ("prompt", "response") if name not in record]
    if missing:
        raise ValueError(f"{where}: SFT records need fields {missing}; found {sorted(record)}")
    for name in ("prompt", "response"):
        if not isinstance(record[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got a JSON {json_type(record[name])}")
        if not record[name]:
            raise ValueError(f"{where}: field {name!r} is empty")
    context = record.get("context")
    if context is not None and not isinstance(context, str):
        raise ValueError(f"{where}: field 'context' must be a string or null, got a JSON {json_type(context)}")
    repeats = record.get("repeats", 1)
    if not _whole_count(repeats):
        raise ValueError(f"{where}: field 'repeats' is {repeats!r}; it must be an integer >= 1")
    return {
        "prompt": record["prompt"],
        "response": record["response"],
        "context": context or "",
        "repeats": int(repeats),
        "history": "",
    }


class SFTDataModule(ResumableDataModule):
    """Records {prompt, response, context?, repeats?} from a JSONL file, a `datasets` dataset, or the built-in world;
    `repeats` (an integer >= 1, default 1) is how many times a record appears in the training split."""

    def __init__(
        self,
        path: str | None = None,
        dataset: str | None = None,
        builtin: str | None = None,
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        seed: int = 1337,
        num_workers: int = 0,
        world: dict | None = None,
    ):
        super().__init__()
        if len([s for s in (path, dataset, builtin) if s is not None]) != 1:
            raise ValueError("data: set exactly one of data.path, data.dataset or data.builtin")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.path, self.dataset_name, self.builtin = path, dataset, builtin
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.seed, self.num_workers, self.world_cfg = seed, num_workers, world or {}
        self.tokenizer = None
        self._raw = self._load()

    def _load(self):
        import datasets

        if self.builtin is not None:
            from neuraflux.data.builtin import builtin_sft_records

            rows = builtin_sft_records(self.builtin, self.world_cfg)
            wheres = [f"data.builtin={self.builtin}, record {i}" for i in range(1, len(rows) + 1)]
        elif self.path is not None and str(self.path).endswith((".jsonl", ".jsonl.gz")):
            path = check_data_file(self.path, "data.path")
            rows, lines = read_json_lines(path)
            wheres = [f"{path}, line {n}" for n in lines]
        else:  # a .json file, a saved datasets folder or a hub name: records as Arrow typed them
            key = "data.path" if self.path else "data.dataset"
            ds = load_local_or_hub(self.path, self.dataset_name, "train", key)
            missing = {"prompt", "response"} - set(ds.column_names)
            if missing and "messages" not in ds.column_names:
                found = ds.column_names
                raise ValueError(f"{key}: SFT records need fields {sorted(missing)} or 'messages'; found {found}")
            columns = ("prompt", "response", "context", "repeats", "messages")
            ds = ds.select_columns([c for c in columns if c in ds.column_names])
            rows = list(ds)
            wheres = [f"{self.path or self.dataset_name}, record {i}" for i in range(1, len(rows) + 1)]
        if not rows:
            raise ValueError(f"data: {self.path or self.dataset_name or self.builtin} holds no SFT records")
        records = [sft_record(row, where) for row, where in zip(rows, wheres, strict=True)]
        return datasets.Dataset.from_dict(
            {name: [r[name] for r in records] for name in ("prompt", "response", "context", "repeats", "history")},
            features=datasets.Features(
                {
                    "prompt": datasets.Value("string"),
                    "response": datasets.Value("string"),
                    "context": datasets.Value("string"),
                    "repeats": datasets.Value("int64"),
                    "history": datasets.Value("string"),
                }
            ),
        )

    def texts(self) -> list[str]:
        """Rendered conversations, for training a tokenizer."""
        return ["".join(render_sft(r["prompt"], r["response"], r["context"], r["history"])) for r in self._raw]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        tok, max_tokens = self.tokenizer, self.block_size + 1
        encoded = self._raw.map(
            lambda r: encode_example(tok, r["prompt"], r["response"], r["context"], max_tokens, r["history"]),
            remove_columns=self._raw.column_names,
            desc="tokenizing",
        )
        records = [{"ids": ids, "response_start": s} for ids, s in zip(encoded["ids"], encoded["response_start"])]
        repeats = list(self._raw["repeats"])
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(records), generator=g).tolist()
        n_val = max(1, int(len(records) * self.val_fraction))
        self.val_set = SFTExamples([records[i] for i in order[:n_val]])
        # Oversampling after the split, so a repeated record is never in both train and val.
        self.train_set = SFTExamples([records[i] for i in order[n_val:] for _ in range(repeats[i])])
        self.collate = make_sft_collate(tok.pad_id)
        log.info("SFT data: %d train, %d val examples", len(self.train_set), len(self.val_set))

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.train_set, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._val_loader(self.val_set, self.collate)
