"""Where the diagnostics go: one small adapter per kind of Lightning logger, so every diagnostic (attention maps,
gradient flow, activation statistics, LR, text samples) reaches whichever loggers the run uses (`logger=...`).

- TensorBoard: add_scalar / add_image / add_figure / add_text / add_histogram, the tags as they always were.
- CSV: scalars through the logger into metrics.csv; beside it, figures and images as PNG files
  (`images/<tag>/step_000006.png`), text as `text.jsonl`, tables as `<tag>.csv` and histograms as `histograms.jsonl`.
- MLflow: scalars through the logger; figures, images, text, tables and histograms as artifacts of the run, at
  `<tag>/step_000006.<png|md|json>`.

A logger of any other kind is skipped. Only global rank zero gets sinks: the other ranks log nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HISTOGRAM_BINS = 64


def fenced(text: str) -> str:
    """A markdown code block showing text verbatim; the fence is longer than any backtick run in the text."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def table_markdown(rows: list[dict[str, str]]) -> str:
    """Rows as markdown for TensorBoard's text tab: per row n, each column as `**Column n**` over its value
    verbatim; rows apart by a rule. (Its table syntax would fold the multi-line values into one cell line.)"""
    blocks = ["\n\n".join(f"**{key.capitalize()} {n}**\n\n{fenced(value)}" for key, value in row.items())
              for n, row in enumerate(rows, 1)]  # fmt: skip
    return "\n\n---\n\n".join(blocks)


def artifact_name(tag: str, step: int, suffix: str) -> str:
    """`attention/layer0` at step 6 -> `attention/layer0/step_000006.png`: one folder per tag, sorted by step."""
    return f"{tag}/step_{step:06d}.{suffix}"


def histogram(values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """What a histogram sink that is not TensorBoard keeps of `values`: counts over `bins` equal bins between the
    minimum and the maximum (their `bins + 1` edges), and the count, sum and sum of squares (so the L2 norm)."""
    v = values.detach().float().flatten().cpu()
    counts = torch.histc(v, bins=bins, min=float(v.min()), max=float(v.max()))
    edges = torch.linspace(float(v.min()), float(v.max()), bins + 1)
    return {"num": v.numel(), "sum": float(v.sum()), "sum_squares": float((v * v).sum()),
            "edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}  # fmt: skip


class Sink:
    """One logger as the diagnostics see it. Images are (H, W) uint8 tensors; text is markdown; a table is a list
    of rows with the same keys; a figure is a matplotlib Figure, left open (the next sink draws it too)."""

    def __init__(self, logger: Logger):
        self.logger = logger

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.logger.log_metrics(values, step)

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None: ...

    def log_figure(self, tag: str, figure: Figure, step: int) -> None: ...

    def log_text(self, tag: str, text: str, step: int) -> None: ...

    def log_table(self, tag: str, rows: list[dict[str, str]], step: int) -> None: ...

    def log_histogram(self, tag: str, values: torch.Tensor, step: int) -> None: ...


class TensorBoardSink(Sink):
    """Straight to the SummaryWriter, as the diagnostics always wrote (one add_scalar per tag)."""

    def __init__(self, logger: TensorBoardLogger):
        super().__init__(logger)
        self.writer = logger.experiment

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HW")

    def log_figure(self, tag: str, figure: Figure, step: int) -> None:
        self.writer.add_figure(tag, figure, step, close=False)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def log_table(self, tag: str, rows: list[dict[str, str]], step: int) -> None:
        self.writer.add_text(tag, table_markdown(rows), step)

    def log_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values.detach().cpu(), step)


class CSVSink(Sink):
    """Files beside the logger's metrics.csv, appended to as the run goes."""

    def __init__(self, logger: CSVLogger):
        super().__init__(logger)
        self.dir = Path(logger.log_dir)

    def _append_json(self, name: str, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        from PIL import Image

        path = self.dir / "images" / artifact_name(tag, step, "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.cpu().numpy()).save(path)  # (H, W) uint8: grayscale

    def log_figure(self, tag: str, figure: Figure, step: int) -> None:
        path = self.dir / "images" / artifact_name(tag, step, "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._append_json("text.jsonl", {"step": step, "tag": tag, "text": text})

    def log_table(self, tag: str, rows: list[dict[str, str]], step: int) -> None:
        if not rows:
            return
        path = self.dir / f"{tag.replace('/', '_')}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *rows[0]])
            if new:
                writer.writeheader()
            writer.writerows({"step": step, **row} for row in rows)

    def log_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self._append_json("histograms.jsonl", {"step": step, "tag": tag, **histogram(values)})


class MLflowSink(Sink):
    """Artifacts of the logger's MLflow run, through its client."""

    def __init__(self, logger: MLFlowLogger):
        super().__init__(logger)
        self.client, self.run_id = logger.experiment, logger.run_id

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.client.log_image(self.run_id, image.cpu().numpy(), artifact_file=artifact_name(tag, step, "png"))

    def log_figure(self, tag: str, figure: Figure, step: int) -> None:
        self.client.log_figure(self.run_id, figure, artifact_name(tag, step, "png"))

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, artifact_name(tag, step, "md"))

    def log_table(self, tag: str, rows: list[dict[str, str]], step: int) -> None:
        columns = {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}
        self.client.log_table(self.run_id, columns, artifact_name(tag, step, "json"))

    def log_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.client.log_dict(self.run_id, histogram(values), artifact_name(tag, step, "json"))


# the most specific class first: a subclass of one of these loggers is treated as its parent
SINKS: tuple[tuple[type[Logger], type[Sink]], ...] = (
    (TensorBoardLogger, TensorBoardSink),
    (CSVLogger, CSVSink),
    (MLFlowLogger, MLflowSink),
)


def sink_for(logger: Logger) -> Sink | None:
    for kind, sink in SINKS:
        if isinstance(logger, kind):
            return sink(logger)
    return None


def diagnostic_sinks(trainer: pl.Trainer) -> list[Sink]:
    """A sink per logger of the trainer that takes diagnostics, on global rank zero; elsewhere none."""
    if not trainer.is_global_zero:
        return []
    return [s for s in map(sink_for, trainer.loggers) if s is not None]


def has_sinks(trainer: pl.Trainer) -> bool:
    """Whether any of the trainer's loggers takes diagnostics (read on every rank, before anything is logged)."""
    return any(isinstance(lg, tuple(kind for kind, _ in SINKS)) for lg in trainer.loggers)
