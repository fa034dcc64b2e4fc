"""Embedders: texts to L2-normalised float32 rows, so an inner-product index ranks by cosine similarity.

Two kinds. `LexicalEmbedder` hashes word and character n-grams: stateless, so it works on any text with no
training and its config is all there is to save. `BackboneEmbedder` mean-pools the hidden states of a saved
NanoLM. Each describes itself with `to_config()`, and `build_embedder(config)` rebuilds it from that dict,
which is how a saved store gets its embedder back.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from neuraflux.chat import escape_special
from neuraflux.retrieval.errors import RetrievalError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"  # where a training run's model directory keeps its tokenizer


@runtime_checkable
class Embedder(Protocol):
    """What the retriever needs from an embedder."""

    name: str  # the kind, as in to_config()["type"]
    dim: int  # width of every row
    max_chars: int  # longest query accepted, in characters

    def embed(self, texts: list[str]) -> np.ndarray:
        """N texts -> (N, dim) float32, each row of unit L2 norm (all zeros for a text with no features)."""

    def to_config(self) -> dict[str, Any]:
        """JSON-able settings; `build_embedder(self.to_config())` rebuilds an embedder giving the same rows."""


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32 with unit-norm rows; all-zero rows stay zero instead of becoming NaN."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)  # (N, 1)
    return rows / np.maximum(norms, np.finfo(np.float32).tiny)


def _check_keys(kind: str, config: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(config) - allowed - {"type"})
    if unknown:
        raise RetrievalError(f"embedder config of type {kind!r}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def _ngram_range(name: str, value: Any) -> tuple[int, int]:
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= value[1]
    )
    if not ok:
        raise RetrievalError(
            f"LexicalEmbedder.{name} must be a pair (low, high) of integers with 1 <= low <= high, got {value!r}"
        )
    return (value[0], value[1])


def _positive_int(owner: str, name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RetrievalError(f"{owner}.{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class LexicalEmbedder:
    """Hashed word n-grams and character n-grams (within word boundaries), mixed and re-normalised.

    Each half is L2-normalised on its own and weighted by the square root of its share, so, hash collisions
    aside, the cosine of two texts is `word_weight * word_cosine + (1 - word_weight) * char_cosine`. Words
    match whole terms; character n-grams still match inflections and typos. Counts are raw (no IDF: the
    embedder is stateless), so a rare word counts as much as a common one in the same text.
    """

    dim: int = 4096
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (3, 5)
    word_weight: float = 0.5
    lowercase: bool = True
    max_chars: int = 4096
    _word: Any = field(init=False, repr=False, compare=False)
    _char: Any = field(init=False, repr=False, compare=False)

    batch_rows = 1024  # texts densified at once: bounds memory at batch_rows * dim floats

    def __post_init__(self) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        _positive_int("LexicalEmbedder", "dim", self.dim)
        _positive_int("LexicalEmbedder", "max_chars", self.max_chars)
        # JSON gives lists back: store tuples so a reloaded embedder compares equal to the original
        object.__setattr__(self, "word_ngrams", _ngram_range("word_ngrams", self.word_ngrams))
        object.__setattr__(self, "char_ngrams", _ngram_range("char_ngrams", self.char_ngrams))
        if isinstance(self.word_weight, bool) or not isinstance(self.word_weight, (int, float)):
            raise RetrievalError(f"LexicalEmbedder.word_weight must be a number, got {self.word_weight!r}")
        if not 0.0 <= self.word_weight <= 1.0:
            raise RetrievalError(f"LexicalEmbedder.word_weight must be in [0, 1], got {self.word_weight}")
        # alternate_sign: colliding features cancel in expectation, so hashed inner products stay unbiased
        common = dict(n_features=self.dim, lowercase=self.lowercase, norm="l2", alternate_sign=True, dtype=np.float32)
        word = HashingVectorizer(analyzer="word", ngram_range=self.word_ngrams, **common)
        char = HashingVectorizer(analyzer="char_wb", ngram_range=self.char_ngrams, **common)
        object.__setattr__(self, "_word", word)
        object.__setattr__(self, "_char", char)

    @property
    def name(self) -> str:
        return "lexical"

    def embed(self, texts: list[str]) -> np.ndarray:
        """N texts -> (N, dim) float32 unit rows; a text with no word or character n-gram gives a zero row."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        w_word, w_char = math.sqrt(self.word_weight), math.sqrt(1.0 - self.word_weight)
        for start in range(0, len(texts), self.batch_rows):
            chunk = list(texts[start : start + self.batch_rows])
            mixed = w_word * self._word.transform(chunk) + w_char * self._char.transform(chunk)  # sparse (n, dim)
            out[start : start + len(chunk)] = mixed.toarray()
        return l2_normalize(out)

    def to_config(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "dim": self.dim,
            "word_ngrams": list(self.word_ngrams),
            "char_ngrams": list(self.char_ngrams),
            "word_weight": self.word_weight,
            "lowercase": self.lowercase,
            "max_chars": self.max_chars,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LexicalEmbedder:
        _check_keys("lexical", config, {f.name for f in fields(cls) if f.init})
        return cls(**{k: v for k, v in config.items() if k != "type"})


def model_fingerprint(model, tokenizer) -> str:
    """Hash of every weight and the tokenizer's vocabulary: equal fingerprints give equal rows."""
    import torch

    digest = hashlib.sha256(tokenizer.fingerprint().encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        # hashed as raw bytes, which works for any dtype (bfloat16 has no numpy equivalent)
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class BackboneEmbedder:
    """Mean of the backbone's final (layer-normed) hidden states over a text's tokens, L2-normalised.

    Texts are right-padded: the backbone is causal, so real tokens never attend to the padding after them and a
    text's row does not depend on what it is batched with. Texts longer than `max_tokens` keep their first
    `max_tokens` tokens (a warning is logged); queries are held to `max_chars` by the retriever first.
    """

    def __init__(self, model, tokenizer, max_tokens: int | None = None, batch_size: int = 32):
        block_size = model.config.block_size
        max_tokens = block_size if max_tokens is None else max_tokens
        _positive_int("BackboneEmbedder", "max_tokens", max_tokens)
        if max_tokens > block_size:
            # positions past block_size were never trained
            raise RetrievalError(
                f"BackboneEmbedder.max_tokens ({max_tokens}) must be <= the model's block_size ({block_size})"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.batch_size = _positive_int("BackboneEmbedder", "batch_size", batch_size)
        self.model_dir: Path | None = None  # set by from_pretrained; a store can only be reloaded from a directory

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, max_tokens: int | None = None, batch_size: int = 32, device: str = "cpu"
    ) -> BackboneEmbedder:
        """From a directory written by `NanoLM.save_pretrained` holding the run's tokenizer.json too."""
        from neuraflux.model import NanoLM
        from neuraflux.tokenizer import NanoTokenizer

        model_dir = Path(model_dir).resolve()
        if not (model_dir / TOKENIZER_FILE).is_file():
            raise RetrievalError(
                f"{model_dir / TOKENIZER_FILE} not found: a backbone model directory needs its tokenizer"
            )
        model = NanoLM.from_pretrained(model_dir, map_location=device)
        embedder = cls(model, NanoTokenizer.load(model_dir / TOKENIZER_FILE), max_tokens, batch_size)
        embedder.model_dir = model_dir
        return embedder

    @property
    def name(self) -> str:
        return "backbone"

    @property
    def dim(self) -> int:
        return self.model.config.n_embd

    @property
    def max_chars(self) -> int:
        # The character tokenizer gives one token per character and byte-level BPE at most one per byte (one per
        # character of ASCII text), so a query this long fits the window; non-ASCII text may need more tokens
        # and is then truncated, with a warning.
        return self.max_tokens

    def embed(self, texts: list[str]) -> np.ndarray:
        """N texts -> (N, n_embd) float32 unit rows; an empty text gives a zero row."""
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                rows = [
                    self._embed_batch(list(texts[i : i + self.batch_size]))
                    for i in range(0, len(texts), self.batch_size)
                ]
        finally:
            self.model.train(was_training)
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        from neuraflux.masking import masked_mean

        token_ids = [self.tokenizer.encode(escape_special(t)) for t in texts]  # a document's text is never markup
        too_long = sum(len(ids) > self.max_tokens for ids in token_ids)
        if too_long:
            log.warning(
                "%d of %d texts exceed max_tokens=%d; embedding their first %d tokens",
                too_long,
                len(texts),
                self.max_tokens,
                self.max_tokens,
            )
        token_ids = [ids[: self.max_tokens] for ids in token_ids]
        device = next(self.model.parameters()).device
        T = max(1, max(len(ids) for ids in token_ids))  # one pad column keeps an all-empty batch well-formed
        input_ids = torch.full((len(texts), T), self.tokenizer.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(texts), T), dtype=torch.bool)  # (B, T), True on real tokens
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = True
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = self.model.transformer(input_ids, mask).float()  # (B, T, C)
        pooled = masked_mean(hidden, mask[..., None].expand_as(hidden), dim=1)  # (B, C)
        return l2_normalize(pooled.cpu().numpy())

    def to_config(self) -> dict[str, Any]:
        if self.model_dir is None:
            raise RetrievalError(
                "BackboneEmbedder was built from an in-memory model, so a saved store could not find it again; "
                "save the model (save_pretrained + tokenizer.json) and use BackboneEmbedder.from_pretrained(model_dir)"
            )
        # the fingerprint is of the weights in memory: if they were trained after loading, reloading the store
        # from model_dir fails loudly instead of mixing rows from two models
        return {
            "type": self.name,
            "model_dir": str(self.model_dir),
            "max_tokens": self.max_tokens,
            "fingerprint": model_fingerprint(self.model, self.tokenizer),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BackboneEmbedder:
        """Rebuild from `to_config()`; the fingerprint is checked by the caller that compares configs."""
        _check_keys("backbone", config, {"model_dir", "max_tokens", "fingerprint"})
        if "model_dir" not in config:
            raise RetrievalError("embedder config of type 'backbone' needs 'model_dir'")
        return cls.from_pretrained(config["model_dir"], max_tokens=config.get("max_tokens"))


EMBEDDER_TYPES: dict[str, Callable[[dict[str, Any]], Embedder]] = {
    "lexical": LexicalEmbedder.from_config,
    "backbone": BackboneEmbedder.from_config,
}


def build_embedder(config: dict[str, Any]) -> Embedder:
    """The embedder a `to_config()` dict describes, by its "type" key (see EMBEDDER_TYPES)."""
    kind = config.get("type") if isinstance(config, dict) else None
    if kind not in EMBEDDER_TYPES:
        raise RetrievalError(f"embedder config needs 'type', one of {sorted(EMBEDDER_TYPES)}; got {config!r}")
    return EMBEDDER_TYPES[kind](config)
