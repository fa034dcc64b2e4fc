"""Prompts for `stage=constitutional`: the world's red-team prompts, plus some of its other RL prompts so that
fine-tuning on revisions does not make the policy forget how to answer ordinary questions.

Both groups are split by `data.splits` (the held-out split every world data module shares), each keeping at least
one prompt for validation, so validation has red-team prompts (for val/violation_rate) and ordinary ones (for
val/helpfulness). Batches are `PromptBatch`es, left-padded.
"""

from __future__ import annotations

import logging
import random
from functools import partial

from torch.utils.data import DataLoader

from neuraflux.chat import Message, render_prompt
from neuraflux.data.lm import ResumableDataModule
from neuraflux.data.prompts import encode_prompts
from neuraflux.data.splits import split_held_out

log = logging.getLogger(__name__)


def constitutional_prompts(world, helpful_share: float, seed: int) -> tuple[list[str], list[str]]:
    """(red-team, other) rendered prompts, each without duplicates: every red-team prompt of the world (secret
    requests with the secret document as context) and a seeded draw of the other RL prompts making up
    `helpful_share` of the total."""
    from neuraflux.world import red_team_prompts, rl_prompts

    red_texts = set(red_team_prompts(world))
    red, other = [], []
    for p in rl_prompts(world):
        (red if p.prompt in red_texts else other).append(render_prompt([Message("user", p.prompt)], context=p.context))
    red, other = list(dict.fromkeys(red)), list(dict.fromkeys(other))
    n_other = min(len(other), round(len(red) * helpful_share / (1.0 - helpful_share)))
    return red, random.Random(f"{seed}/constitutional").sample(other, n_other)


class ConstitutionalDataModule(ResumableDataModule):
    """Red-team and ordinary prompts of the built-in world (`builtin: world`), held out per group."""

    def __init__(
        self,
        builtin: str = "world",
        world: dict | None = None,
        helpful_share: float = 0.8,
        max_prompt_tokens: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.15,
        seed: int = 1337,
        num_workers: int = 0,
    ):
        super().__init__()
        from neuraflux.data.builtin import check_builtin

        check_builtin(builtin)
        if not 0.0 <= helpful_share < 1.0:
            raise ValueError(f"data.helpful_share must be in [0, 1), got {helpful_share}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_prompt_tokens, int) or max_prompt_tokens <= 0:
            raise ValueError(f"data.max_prompt_tokens must be a positive integer, got {max_prompt_tokens!r}")
        from neuraflux.world import WorldConfig, generate_world

        self.max_prompt_tokens, self.batch_size, self.val_fraction = (
            max_prompt_tokens,
            batch_size,
            val_fraction,
        )
        self.seed, self.num_workers = seed, num_workers
        self.tokenizer = None
        self.red_team, self.other = constitutional_prompts(
            generate_world(WorldConfig.from_dict(world)), helpful_share, seed
        )
        if len(self.red_team) < 2:
            raise ValueError(f"world: {len(self.red_team)} distinct red-team prompt(s); need 2 for train and val")

    def texts(self) -> list[str]:
        """Every prompt, for training a tokenizer."""
        return self.red_team + self.other

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        if self.tokenizer is None:
            raise RuntimeError("ConstitutionalDataModule.tokenizer must be set before setup()")
        red_train, red_val = split_held_out(self.red_team, self.val_fraction, self.seed)
        other_train, other_val = (
            split_held_out(self.other, self.val_fraction, self.seed) if len(self.other) > 1 else (self.other, [])
        )
        self.train_set, self.val_set = red_train + other_train, red_val + other_val
        self.collate = partial(encode_prompts, self.tokenizer, max_prompt_tokens=self.max_prompt_tokens)
        log.info(
            "constitutional prompts: %d + %d train, %d + %d val (red-team + other)",
            len(red_train),
            len(other_train),
            len(red_val),
            len(other_val),
        )

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.train_set, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._val_loader(self.val_set, self.collate)
