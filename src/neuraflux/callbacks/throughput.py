"""Training throughput: tokens/s, achieved FLOPs/s and model FLOPs utilisation over each logging window, validation
time excluded."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class ThroughputMonitor(pl.Callback):
    """Logs train/tokens_per_sec, train/flops_per_sec and, given `peak_flops`, train/mfu; keeps totals for the
    run's metrics.json.

    Time is measured from one train batch's end to the next, so data loading, the optimizer step and
    every hook count; an interval that contains validation is dropped, and so is the first (warm-up) one.

    FLOPs are the model's `flops_per_token(T)` (PaLM's 6N + 12·L·T·C: one forward and backward) times the batch's
    tokens: they leave out what a stage computes besides that (a frozen reference's forward, RL's generation), and a
    model without `flops_per_token` (a reward model) logs no FLOPs. train/mfu = achieved FLOPs/s over
    `peak_flops` (one device's peak, e.g. 989e12 for an H100's dense bf16) times the number of devices.
    """

    def __init__(self, window_steps: int = 10, peak_flops: float | None = None):
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"callbacks.throughput.peak_flops must be positive or null, got {peak_flops!r}")
        self.window_steps = window_steps
        self.peak_flops = peak_flops
        self._window_flops = 0.0
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._window_tokens = 0
        self._window_seconds = 0.0
        self._last: float | None = None
        self._flops: dict[int, int | None] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            tokens = batch.input_ids.numel() * trainer.world_size
            self.total_tokens += tokens
            self.total_seconds += now - self._last
            self._window_tokens += tokens
            self._window_seconds += now - self._last
            flops = self._flops_per_token(pl_module, batch.input_ids.shape[-1])
            if flops is not None:
                self._window_flops += tokens * flops
        self._last = now
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if step_done and trainer.global_step % self.window_steps == 0 and self._window_seconds > 0:
            pl_module.log("train/tokens_per_sec", self._window_tokens / self._window_seconds, on_step=True)
            if self._window_flops:
                flops_per_sec = self._window_flops / self._window_seconds
                pl_module.log("train/flops_per_sec", flops_per_sec, on_step=True)
                if self.peak_flops is not None:
                    pl_module.log("train/mfu", flops_per_sec / (self.peak_flops * trainer.world_size), on_step=True)
            self._window_tokens, self._window_seconds, self._window_flops = 0, 0.0, 0.0

    def _flops_per_token(self, pl_module, seq_len: int) -> int | None:
        """The model's `flops_per_token(seq_len)`, once per length: it counts the parameters, which cost more than the
        rest of this hook on every step."""
        if seq_len not in self._flops:
            flops_per_token = getattr(getattr(pl_module, "model", None), "flops_per_token", None)
            self._flops[seq_len] = None if flops_per_token is None else flops_per_token(seq_len)
        return self._flops[seq_len]

    def on_train_start(self, trainer, pl_module) -> None:
        self._flops = {}  # the model is fixed for a run; counted again for the next one

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = None

    @property
    def tokens_per_sec(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds else 0.0
