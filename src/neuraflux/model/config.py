"""NanoConfig: the backbone's shape, validated at construction, and the config.json that holds it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

POSITION_ENCODINGS = ("learned", "rope")
SIZE_KEYS = ("vocab_size", "block_size", "max_position_embeddings", "n_layer", "n_head", "n_embd")
# Far above any model this project trains, far below what a typo asks for: a config.json saying vocab_size=10**12
# is refused here instead of by the allocator (or the OOM killer) a minute later.
MAX_SIZES = {
    "vocab_size": 1 << 21,
    "block_size": 1 << 20,
    "max_position_embeddings": 1 << 20,
    "n_layer": 1024,
    "n_head": 1024,
    "n_embd": 1 << 16,
}
MAX_PARAMETERS = 10_000_000_000
# Beside the shape in config.json, not a field: which tokenizer the weights were trained with (its fingerprint), so
# a load can refuse another tokenizer.json put beside them. Files saved before it was recorded have none.
TOKENIZER_FINGERPRINT_KEY = "tokenizer_fingerprint"


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
        for name in SIZE_KEYS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
            if value > MAX_SIZES[name]:
                raise ValueError(f"model.{name} must be <= {MAX_SIZES[name]:,}, got {value:,}")
        for name in ("dropout", "layer_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"model.{name} must be a number, got {value!r}")
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            raise ValueError(f"model.pad_token_id must be an integer, got {self.pad_token_id!r}")
        if self.approx_parameters() > MAX_PARAMETERS:
            raise ValueError(
                f"model.vocab_size={self.vocab_size}, model.n_embd={self.n_embd}, model.n_layer={self.n_layer} and "
                f"model.max_position_embeddings={self.max_position_embeddings} make about "
                f"{self.approx_parameters():,} parameters, more than the {MAX_PARAMETERS:,} a NanoConfig allows"
            )
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

    def approx_parameters(self) -> int:
        """Parameters this shape allocates, to within the biases and norms: embeddings plus 12 C^2 a layer."""
        positions = self.max_position_embeddings if self.position_encoding == "learned" else 0
        return (self.vocab_size + positions) * self.n_embd + 12 * self.n_layer * self.n_embd**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NanoConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path, tokenizer_fingerprint: str | None = None) -> None:
        """config.json; with the fingerprint of the tokenizer the weights were trained with, when given."""
        data = self.to_dict()
        if tokenizer_fingerprint is not None:
            data[TOKENIZER_FINGERPRINT_KEY] = tokenizer_fingerprint
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> NanoConfig:
        """A config.json, validated before anything is allocated; ValueError naming the file when it is not JSON,
        lacks a size, or asks for an impossible shape."""
        data = read_config_file(path)
        data.pop(TOKENIZER_FINGERPRINT_KEY, None)
        missing = [key for key in SIZE_KEYS if key not in data]
        if missing:
            raise ValueError(f"{path}: model config without {missing}: not a config.json written by save_pretrained")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def recorded_tokenizer_fingerprint(path: str | Path) -> str | None:
    """The tokenizer fingerprint a config.json was saved with; None for one saved before fingerprints were kept."""
    return read_config_file(path).get(TOKENIZER_FINGERPRINT_KEY)


def read_config_file(path: str | Path) -> dict:
    """config.json as a dict; ValueError naming the file when it is unreadable, not JSON or not a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable (truncated or not JSON): {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a model config is a JSON object, got {type(data).__name__}")
    return data
