"""NanoTokenizer: byte-level BPE (trained with `tokenizers`) or a character vocabulary, saved as one JSON file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from neuraflux.chat import BOS, END, EOS, PAD, SPECIAL_TOKENS, UNK  # UNK: character mode only

CHAR_FORMAT = "neuraflux-char-v1"


class NanoTokenizer:
    """Text <-> ids. Special tokens (chat.SPECIAL_TOKENS) come first, so `<|pad|>` is id 0 in both modes."""

    def __init__(self, backend=None, char_vocab: list[str] | None = None):
        if (backend is None) == (char_vocab is None):
            raise ValueError("NanoTokenizer needs exactly one of a tokenizers backend or a character vocabulary")
        self._bpe = backend
        self._chars = char_vocab
        if char_vocab is not None:
            self._char_to_id = {c: i for i, c in enumerate(char_vocab)}
            self._special_re = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, UNK)))
        self.pad_id = self.token_to_id(PAD)
        self.bos_id = self.token_to_id(BOS)
        self.eos_id = self.token_to_id(EOS)
        self.end_id = self.token_to_id(END)

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        mode: str = "bpe",
        min_frequency: int = 2,
        split_digits: bool = False,
    ) -> NanoTokenizer:
        """Train on an iterable of texts. `mode` is "bpe" (byte-level) or "char". `split_digits`: every digit is its
        own token (BPE; as LLaMA does), instead of the corpus's learned chunks."""
        if mode == "char":
            chars = sorted({c for t in texts for c in t})
            return cls(char_vocab=[*SPECIAL_TOKENS, UNK, *chars])
        if mode != "bpe":
            raise ValueError(f"tokenizer mode must be 'bpe' or 'char', got {mode!r}")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        minimum = len(SPECIAL_TOKENS) + 256
        if vocab_size < minimum:
            raise ValueError(f"tokenizer.vocab_size must be >= {minimum} for byte-level BPE, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        # Off by default: on the world, digit tokens made the tiny model copy numbers worse (7 of 37 unseen numeric
        # answers against 21 of 37; docs/WORLD_TUNING.md): "72600" as 7,2,6,0,0 repeats tokens, and copying by
        # matching the previous token then loses its place, where learned chunks ("72", "600") stay distinct.
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits
            else byte_level
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(backend=tok)

    def to_json(self) -> str:
        """The whole tokenizer as JSON text: what tokenizer.json holds and checkpoints store."""
        if self._bpe is not None:
            return self._bpe.to_str(pretty=True)
        return json.dumps({"format": CHAR_FORMAT, "vocab": self._chars}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> NanoTokenizer:
        data = json.loads(text)
        if data.get("format") == CHAR_FORMAT:
            return cls(char_vocab=list(data["vocab"]))
        from tokenizers import Tokenizer

        return cls(backend=Tokenizer.from_str(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> NanoTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found")
        return cls.from_json(path.read_text())

    # ---- vocabulary --------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return "bpe" if self._bpe is not None else "char"

    @property
    def vocab_size(self) -> int:
        return self._bpe.get_vocab_size() if self._bpe is not None else len(self._chars)

    def token_to_id(self, token: str) -> int:
        i = self._bpe.token_to_id(token) if self._bpe is not None else self._char_to_id.get(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def max_chars_per_token(self) -> int:
        """The most characters of text one token can stand for: 1 in character mode; in byte-level BPE the longest
        token's bytes (a character is at least one byte). So a text of n characters is at least
        n / max_chars_per_token tokens, which a server checks before tokenizing anything."""
        if self._bpe is None:
            return 1
        specials = set(SPECIAL_TOKENS)
        return max(len(t) for t in self._bpe.get_vocab() if t not in specials)

    @property
    def special_ids(self) -> set[int]:
        return {self.token_to_id(t) for t in SPECIAL_TOKENS}

    def fingerprint(self) -> str:
        """Stable identity of the vocabulary, so models trained with different tokenizers can be told apart."""
        import hashlib

        if self._bpe is not None:
            payload = json.dumps(sorted(self._bpe.get_vocab().items()))
        else:
            payload = json.dumps(self._chars, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ---- encode / decode ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self._bpe is not None:
            return self._bpe.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        unk = self._char_to_id[UNK]
        pos = 0
        for m in self._special_re.finditer(text):
            ids.extend(self._char_to_id.get(c, unk) for c in text[pos : m.start()])
            ids.append(self._char_to_id[m.group()])
            pos = m.end()
        ids.extend(self._char_to_id.get(c, unk) for c in text[pos:])
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._bpe is not None:
            return [e.ids for e in self._bpe.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._bpe is not None:
            return self._bpe.decode(ids, skip_special_tokens=skip_special_tokens)
        skip = self.special_ids if skip_special_tokens else set()
        n = len(self._chars)
        # ids past the vocabulary (a model may have more rows than the tokenizer has tokens) decode as U+FFFD
        return "".join("\ufffd" if i >= n or self._chars[i] == UNK else self._chars[i] for i in ids if i not in skip)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def pad_batch(
        self, sequences: list[list[int]], padding_side: str = "left", max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id lists into (B, T) ids and a bool mask; too-long rows keep their last max_length tokens."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_length is not None:
            sequences = [s[-max_length:] for s in sequences]
        T = max((len(s) for s in sequences), default=0)
        ids = torch.full((len(sequences), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), T), dtype=torch.bool)
        for i, s in enumerate(sequences):
            if not s:
                continue
            sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = True
        return ids, mask


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer: NanoTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is split across tokens: wait for the rest
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
