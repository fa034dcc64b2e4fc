"""The held-out split, written once: every prompt-level data module and the report's measurement use it.

A prompt is held out when a seeded hash of its conversation (the rendered prompt without its retrieved-context
turn) falls below `val_fraction`. Membership depends on the prompt, the seed and the fraction only, never on
which other prompts are split with it, so:

- a prompt held out of the RL prompts is held out of the preference pairs, the constitutional prompts and their
  AI-feedback pairs too: each stage splits its own prompt set, and they all agree;
- the same question with and without a retrieved document is on one side (the context is not part of the key);
- a larger fraction holds out a superset of a smaller one's prompts.

The price of that consistency is that the held-out count is binomial around `val_fraction * n`, not exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from neuraflux.chat import CONTEXT, END

T = TypeVar("T")


def prompt_key(prompt: str) -> str:
    """What identifies a prompt for the split: the rendered prompt with its context turn removed (a bare
    string without chat tags is its own key)."""
    if CONTEXT not in prompt:
        return prompt
    head, rest = prompt.split(CONTEXT, 1)
    return head + rest.split(END, 1)[1]


def held_out_score(prompt: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the prompt's key and the seed; below val_fraction means held out."""
    digest = hashlib.sha256(f"{seed}\0{prompt_key(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_held_out(
    items: Sequence[T], val_fraction: float, seed: int, prompt: Callable[[T], str] = str
) -> tuple[list[T], list[T]]:
    """(train, held_out) in the items' order; `prompt(item)` is the item's rendered prompt.

    Items whose score is below val_fraction are held out. A set too small for that to pick any (or to leave any
    for training) still gets one of each: the item with the lowest score is held out, the highest trains; only
    then can the split differ from another set's on the same prompts, and only for that one prompt.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    scores = {key: held_out_score(key, seed) for key in dict.fromkeys(prompt(item) for item in items)}
    if len(scores) < 2:
        raise ValueError(
            f"data: {len(scores)} distinct prompt(s) cannot be split into train and validation; need at least 2"
        )
    held = {key for key, s in scores.items() if s < val_fraction}
    if not held:
        held = {min(scores, key=scores.get)}
    elif len(held) == len(scores):
        held.discard(max(scores, key=scores.get))
    train = [item for item in items if prompt(item) not in held]
    return train, [item for item in items if prompt(item) in held]
