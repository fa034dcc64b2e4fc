"""Output going to a file gets a progress line at a steady interval: step of steps, loss, throughput, time left."""

from __future__ import annotations

import re
import sys

import pytest

from neuraflux.callbacks.progress import ProgressLog, format_duration
from neuraflux.train import train


def test_durations_read_as_a_clock():
    assert [format_duration(s) for s in (0, 59.6, 61, 3600, 3723)] == ["0:00", "1:00", "1:01", "1:00:00", "1:02:03"]
    with pytest.raises(ValueError, match="callbacks.progress_log.every_s must be > 0"):
        ProgressLog(every_s=0)


def test_a_run_into_a_file_prints_progress_lines(tiny_cfg, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    train(tiny_cfg("callbacks.progress_log.every_s=0.000001"))
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"^\w+: step \d", line)]
    # every step past the first, then the end again
    steps = [int(re.match(r"^\w+: step (\d+)/6", line).group(1)) for line in lines]
    assert steps[:5] == [1, 2, 3, 4, 5] and steps[-1] == 6, lines
    assert re.fullmatch(
        r"pretrain: step 6/6 \(100%\)  train/loss [\d.]+  tokens/s [\d,]+  elapsed 0:\d\d  left 0:00", lines[-1]
    ), lines[-1]
    assert "left" in lines[0]


def test_a_terminal_gets_no_lines(tiny_cfg, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    train(tiny_cfg("callbacks.progress_log.every_s=0.000001"))
    assert not re.search(r"^\w+: step \d", capsys.readouterr().out, re.M)


def test_lightnings_accelerator_lines_and_adverts_are_dropped_the_rest_kept():
    import logging

    from neuraflux.train import QuietLightning, quiet_lightning

    quiet_lightning()
    quiet_lightning()  # once only
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert sum(isinstance(f, QuietLightning) for f in logger.filters) == 1

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord(logger.name, logging.INFO, __file__, 1, msg, None, None)

    dropped = ["GPU available: False, used: False", "TPU available: False, using: 0 TPU cores", "💡 Tip: try it"]
    kept = ["Restoring states from the checkpoint path at last.ckpt", "`Trainer.fit` stopped: `max_steps=6` reached."]
    assert [logger.filters[-1].filter(record(m)) for m in dropped + kept] == [False] * 3 + [True] * 2


def test_the_bar_counts_the_runs_steps_under_the_stage_name(tiny_cfg):
    from neuraflux.callbacks.progress import StepProgressBar

    _, objects = train(tiny_cfg("+callbacks.progress_bar._target_=neuraflux.callbacks.progress.StepProgressBar"))
    (bar,) = [c for c in objects["trainer"].callbacks if isinstance(c, StepProgressBar)]
    assert bar.shown == ("pretrain step", 6, 6)  # not "Epoch 0/-2"


def test_the_bar_redraws_at_its_interval_and_at_the_last_step(tiny_cfg, monkeypatch):
    from neuraflux.callbacks.progress import StepProgressBar

    drawn = []
    show_steps = StepProgressBar.show_steps
    monkeypatch.setattr(
        StepProgressBar, "show_steps", lambda bar, t, m: (drawn.append(t.global_step), show_steps(bar, t, m))
    )
    bar = "+callbacks.progress_bar._target_=neuraflux.callbacks.progress.StepProgressBar"
    _, objects = train(tiny_cfg(bar, "+callbacks.progress_bar.refresh_s=3600"))
    # the epoch's start, the first step (nothing shown yet), then nothing within the hour but the run's last step
    assert drawn == [0, 1, 6]
    (bar,) = [c for c in objects["trainer"].callbacks if isinstance(c, StepProgressBar)]
    assert bar.shown == ("pretrain step", 6, 6)
    with pytest.raises(ValueError, match="callbacks.progress_bar.refresh_s must be >= 0"):
        StepProgressBar(refresh_s=-1)


def test_the_model_summary_leaves_out_flops_and_mode_counts(capsys):
    from neuraflux.callbacks.progress import ModelSummary

    data = [(" ", ["0"]), ("Name", ["model"]), ("Type", ["NanoLM"]), ("Params", ["1.0 K"]), ("Mode", ["train"]),
            ("FLOPs", ["0"])]  # fmt: skip
    ModelSummary.summarize(data, 1000, 900, 0.004, {"train": 1, "eval": 0}, 0)
    out = capsys.readouterr().out
    assert "NanoLM" in out and "1.0 K" in out and "params: 900 trainable, 100 frozen, 0.0 MB" in out
    assert "FLOPs" not in out and "train mode" not in out and "Mode" not in out
