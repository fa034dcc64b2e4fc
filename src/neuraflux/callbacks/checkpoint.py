"""What every stage's checkpoint carries besides Lightning's own state, written once for all stages."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class CheckpointExtras(pl.Callback):
    """Adds `checkpoint["neuraflux"]` (the model config, the tokenizer's JSON and the stage's name: the file alone
    rebuilds model and tokenizer, weights_only-safe) and the RNG state, which Lightning does not restore (dropout
    needs it for an exact resume); the RNG comes back when training starts, after what Lightning draws while it
    loads. `train()` adds it to every run; a stage adds its own extras to `checkpoint["neuraflux"]` in its
    `on_save_checkpoint`, which Lightning calls after this."""

    def __init__(self):
        self._rng: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        model = pl_module.model
        checkpoint["neuraflux"] = {
            "model_config": model.config.to_dict(),
            "tokenizer_json": pl_module.tokenizer.to_json(),
            "stage": pl_module.name,
        }
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._rng = checkpoint.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._rng is None:
            return
        torch.set_rng_state(self._rng["torch"])
        if "cuda" in self._rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._rng["cuda"])
