"""`data=feedback`: train on the human feedback a server collected, read straight from its feedback database.

    python train.py stage=dpo data=feedback data.db=feedback.sqlite                   # preference pairs (dpo, reward)
    python train.py stage=kto data=feedback data.db=feedback.sqlite data.format=kto   # desirable / undesirable rows
    python train.py stage=sft data=feedback data.db=feedback.sqlite data.format=sft   # the edits

The database goes through exactly `neuraflux feedback export` (`feedback.export`) into a temporary JSON-lines
file, which the format's own data module reads and validates (`data=preference`, `data=kto`, `data=sft`); the file
is gone once the module holds its records. What each vote becomes, and what is skipped, is in `feedback.export`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from neuraflux.feedback.export import FORMATS, export_feedback
from neuraflux.feedback.store import FeedbackUnavailable

log = logging.getLogger(__name__)


def feedback_data_module(
    db: str,
    format: str = "preference",
    max_length: int = 256,
    batch_size: int = 16,
    val_fraction: float = 0.1,
    seed: int = 1337,
    num_workers: int = 0,
    retrieve_context: bool = False,
):
    """The data module of `format` (preference, kto or sft) over the votes in `db`; ValueError names `data.db` or
    `data.format` when the database cannot be read or holds no record of that format. `max_length` is the SFT
    module's block_size. `retrieve_context` (which stage=dpo sets false) must stay false: a feedback prompt already
    holds the documents the server retrieved for it."""
    if format not in FORMATS:
        raise ValueError(f"data.format must be one of {list(FORMATS)}, got {format!r}")
    if retrieve_context:
        raise ValueError("data.retrieve_context=true searches the built-in world; feedback prompts hold their own")
    settings = {"batch_size": batch_size, "val_fraction": val_fraction, "seed": seed, "num_workers": num_workers}
    with tempfile.TemporaryDirectory(prefix="neuraflux-feedback-") as tmp:
        path = Path(tmp) / f"{Path(db).name}.{format}.jsonl"
        try:
            result = export_feedback(db, format, path)
        except FeedbackUnavailable as err:
            raise ValueError(f"data.db: {err}") from None
        if not result.records:
            skipped = ", ".join(f"{n} {reason}" for reason, n in result.skipped.items()) or "no votes"
            raise ValueError(f"data.db={db}: no {format} records in its feedback (skipped: {skipped})")
        log.info("data.db=%s: %d %s records (skipped: %s)", db, len(result.records), format, dict(result.skipped))
        if format == "preference":
            from neuraflux.data.preference_batches import PreferenceDataModule

            return PreferenceDataModule(path=str(path), on_invalid="error", max_length=max_length, **settings)
        if format == "kto":
            from neuraflux.data.unpaired_batches import UnpairedDataModule

            return UnpairedDataModule(path=str(path), on_invalid="error", max_length=max_length, **settings)
        from neuraflux.data.sft import SFTDataModule

        return SFTDataModule(path=str(path), block_size=max_length, **settings)
