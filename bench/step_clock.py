"""A callback for benchmarks: the wall time at which chosen optimizer steps end, written to a JSON file.

bench/train_throughput.py adds it to a `python train.py` run with
`+callbacks.step_clock._target_=step_clock.StepClock +callbacks.step_clock.path=FILE` (bench/ on PYTHONPATH), so the
framework's steady-state rate is the slope of wall time between two steps, measured as the reference loop's is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch


class StepClock(pl.Callback):
    """For every step in `steps`, when its batch ends (optimizer step done): wall seconds (perf_counter) and the
    process's CPU seconds (process_time, every thread: on a busy machine the less noisy of the two), written to
    `path` as `{"wall": {step: s}, "cpu": {step: s}}` when training ends."""

    def __init__(self, path: str, steps: list[int]):
        self.path, self.steps = Path(path), set(steps)
        self.wall: dict[int, float] = {}
        self.cpu: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.wall:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)  # the step's kernels done, not only queued
            self.wall[step], self.cpu[step] = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.write_text(json.dumps({"wall": self.wall, "cpu": self.cpu}))
