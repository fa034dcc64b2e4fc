"""Seeded synthetic chunks and queries for retrieval tests and benchmarks: no download, any size.

Words are pronounceable nonsense drawn with Zipf frequencies (the r-th most common word has weight 1/r), so,
as in real text, a few words are in almost every chunk and most are rare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


@dataclass(frozen=True)
class SyntheticQueries:
    queries: list[str]
    gold_rows: list[int]  # the chunk each query's words were drawn from


def synthetic_vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    """`size` distinct words of two to four consonant-vowel syllables."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    words: dict[str, None] = {}  # insertion-ordered, so the vocabulary is the same for the same seed
    while len(words) < size:
        n_syllables = int(rng.integers(2, 5))
        words["".join(syllables[i] for i in rng.integers(0, len(syllables), size=n_syllables))] = None
    return list(words)


def synthetic_chunks(
    n: int,
    seed: int = 0,
    vocab_size: int = 5000,
    sentences_per_chunk: tuple[int, int] = (2, 4),
    words_per_sentence: tuple[int, int] = (6, 14),
) -> list[str]:
    """`n` chunks of a few sentences each; the same arguments always give the same chunks."""
    if n < 0 or vocab_size <= 0:
        raise ValueError(f"synthetic_chunks needs n >= 0 and vocab_size > 0, got n={n}, vocab_size={vocab_size}")
    rng = np.random.default_rng(seed)
    vocab = synthetic_vocabulary(vocab_size, rng)
    weights = 1.0 / np.arange(1, vocab_size + 1)
    probs = weights / weights.sum()
    chunks = []
    for _ in range(n):
        sentences = []
        for _ in range(int(rng.integers(sentences_per_chunk[0], sentences_per_chunk[1] + 1))):
            length = int(rng.integers(words_per_sentence[0], words_per_sentence[1] + 1))
            words = [vocab[i] for i in rng.choice(vocab_size, size=length, p=probs)]
            sentences.append(" ".join(words).capitalize() + ".")
        chunks.append(" ".join(sentences))
    return chunks


def synthetic_queries(chunks: list[str], n: int, seed: int = 0, words: int = 5) -> SyntheticQueries:
    """`n` queries, each `words` words drawn (without replacement, shuffled) from one random chunk."""
    if not chunks:
        raise ValueError("synthetic_queries needs at least one chunk")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(chunks), size=n)
    queries = []
    for row in rows:
        tokens = chunks[row].lower().replace(".", "").split()
        picked = rng.choice(len(tokens), size=min(words, len(tokens)), replace=False)
        queries.append(" ".join(tokens[i] for i in picked))
    return SyntheticQueries(queries=queries, gold_rows=[int(r) for r in rows])
