"""NanoConfig: the backbone's shape, validated at construction."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

POSITION_ENCODINGS = ("learned", "rope")


@dataclass
class NanoConfig:
    vocab_size: int = 10_000
    block_size: int = 256  # longest sequence a training example uses
    max_position_embeddings: int = 512  # longest sequence (rows of the learned position table); generation stops here
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 0
    # "learned": absolute position embeddings added to the tokens (GPT-2, nanoGPT); "rope": rotary embeddings on
    # each head's queries and keys (GPT-NeoX, LLaMA), so attention scores depend on relative position only
    position_encoding: str = "learned"
    rope_theta: float = 10_000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "max_position_embeddings", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); "
                f"allowed n_head values for n_embd={self.n_embd}: "
                f"{[h for h in range(1, min(self.n_embd, 64) + 1) if self.n_embd % h == 0]}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.block_size > self.max_position_embeddings:
            raise ValueError(
                f"model.block_size ({self.block_size}) must be <= model.max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"model.position_encoding must be one of {list(POSITION_ENCODINGS)}, got {self.position_encoding!r}"
            )
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ValueError(
                f"model.position_encoding=rope rotates pairs of head dimensions: model.n_embd / model.n_head "
                f"({self.n_embd} / {self.n_head} = {self.head_dim}) must be even"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"model.pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NanoConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> NanoConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
