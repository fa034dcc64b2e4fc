"""A progress line at a steady interval for runs whose output goes to a file (nohup, CI, `| tee`), where a progress
bar writes nothing readable: step, loss, tokens/s and the time left."""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl


def format_duration(seconds: float) -> str:
    """`1:02:03` or `2:03` (hours only when there are some)."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog(pl.Callback):
    """Every `every_s` seconds of training (and at the end), one line on stdout:

        sft: step 1200/4000 (30%)  train/loss 0.412  tokens/s 2,310  elapsed 2:01  left 4:43

    Only when stdout is not a terminal (there the progress bar shows the same), unless `always`. The time left is
    the elapsed training time per step so far times the steps still to go."""

    def __init__(self, every_s: float = 30.0, always: bool = False):
        if not every_s > 0:
            raise ValueError(f"callbacks.progress_log.every_s must be > 0, got {every_s}")
        self.every_s, self.always = float(every_s), always
        self._start: float | None = None
        self._last = 0.0
        self._first_step = 0

    def active(self) -> bool:
        return self.always or not sys.stdout.isatty()

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.monotonic()
        self._first_step = trainer.global_step  # a resumed run: its rate counts only the steps it trained

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if self._start is not None and now - self._last >= self.every_s and trainer.is_global_zero and self.active():
            self._last = now
            print(self.line(trainer, pl_module, now), flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._start is not None and trainer.is_global_zero and self.active():
            print(self.line(trainer, pl_module, time.monotonic()), flush=True)

    def line(self, trainer, pl_module, now: float) -> str:
        step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            estimated = trainer.estimated_stepping_batches
            total = int(estimated) if estimated != float("inf") else None
        parts = [f"{getattr(pl_module, 'name', 'train')}: step {step}" + (f"/{total}" if total else "")]
        if total:
            parts[0] += f" ({100 * step / total:.0f}%)"
        metrics = trainer.callback_metrics
        for key in ("train/loss", "objective/reward"):
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4g}")
        if "train/tokens_per_sec" in metrics:
            parts.append(f"tokens/s {float(metrics['train/tokens_per_sec']):,.0f}")
        elapsed = now - (self._start or now)
        parts.append(f"elapsed {format_duration(elapsed)}")
        done = step - self._first_step
        if total and done > 0:
            parts.append(f"left {format_duration(elapsed / done * max(total - step, 0))}")
        return "  ".join(parts)


class StepProgressBar(pl.callbacks.RichProgressBar):
    """Lightning's rich progress bar counting the run's optimizer steps ("sft step 1200/4000"), which is how a run
    is sized (`trainer.max_steps`), instead of the batches of an epoch under "Epoch 0/-2" (a run bounded by steps
    has no epoch count, and a resumed one showed counts like 600/499).

    Redrawn every `refresh_s` seconds and at the last step, not after every batch: Lightning's bar reads every
    metric (one `.item()` each) and renders the whole bar on each batch, twice with the step count, which cost a few
    percent of a small model's step (docs/BENCHMARKS.md, training throughput)."""

    def __init__(self, refresh_s: float = 0.5, **kwargs):
        if not refresh_s >= 0:
            raise ValueError(f"callbacks.progress_bar.refresh_s must be >= 0, got {refresh_s}")
        super().__init__(**kwargs)
        self.refresh_s = float(refresh_s)
        self._drawn = float("-inf")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.show_steps(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        last = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        if now - self._drawn < self.refresh_s and not last:
            return
        self._drawn = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.show_steps(trainer, pl_module)

    def show_steps(self, trainer, pl_module) -> None:
        if self.progress is None or self.train_progress_bar_id is None:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.shown = (f"{getattr(pl_module, 'name', 'train')} step", trainer.global_step, total)
        self.progress.update(
            self.train_progress_bar_id, description=self.shown[0], completed=self.shown[1], total=total
        )
        self.refresh()


class ModelSummary(pl.callbacks.RichModelSummary):
    """Lightning's rich model summary without what says nothing here: FLOPs (0 unless the module declares an
    example input, which no stage does) and the counts of modules in train and eval mode."""

    @staticmethod
    def summarize(
        summary_data, total_parameters: int, trainable_parameters: int, model_size: float, *args, **kwargs
    ) -> None:
        from pytorch_lightning.utilities.model_summary.model_summary import get_human_readable_count
        from rich import get_console
        from rich.table import Table

        columns = dict(summary_data)
        table = Table(header_style="bold magenta")
        shown = [name for name in ("Name", "Type", "Params", "Params per Device") if name in columns]
        for name in shown:
            table.add_column(name, justify="right" if name.startswith("Params") else "left")
        for row in zip(*(columns[name] for name in shown), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(
            f"params: {get_human_readable_count(int(trainable_parameters)).strip()} trainable, "
            f"{get_human_readable_count(int(frozen)).strip()} frozen, {model_size:.1f} MB"
        )
