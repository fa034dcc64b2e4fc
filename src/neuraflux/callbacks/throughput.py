"""Training throughput: tokens/s over each logging window, validation time excluded."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class ThroughputMonitor(pl.Callback):
    """Logs train/tokens_per_sec; keeps totals for the run's metrics.json.

    Time is measured from one train batch's end to the next, so data loading, the optimizer step and
    every hook count; an interval that contains validation is dropped, and so is the first (warm-up) one.
    """

    def __init__(self, window_steps: int = 10):
        self.window_steps = window_steps
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._window_tokens = 0
        self._window_seconds = 0.0
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            tokens = batch.input_ids.numel() * trainer.world_size
            self.total_tokens += tokens
            self.total_seconds += now - self._last
            self._window_tokens += tokens
            self._window_seconds += now - self._last
        self._last = now
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if step_done and trainer.global_step % self.window_steps == 0 and self._window_seconds > 0:
            pl_module.log("train/tokens_per_sec", self._window_tokens / self._window_seconds, on_step=True)
            self._window_tokens, self._window_seconds = 0, 0.0

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = None

    @property
    def tokens_per_sec(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds else 0.0
