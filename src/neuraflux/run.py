"""What `python train.py` does with a composed config: train the stage, print a summary, return the objective."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from neuraflux.train import train

log = logging.getLogger(__name__)


def summary_table(metrics: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        value = metrics[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def run(cfg: DictConfig) -> float | None:
    """Train; the returned val/loss is what a Hydra sweeper minimises."""
    metrics, objects = train(cfg)
    if objects["trainer"].is_global_zero:
        from rich.console import Console

        Console().print(summary_table(metrics, f"{cfg.stage.name}: {objects['run_dir']}"))
    return metrics.get("val/loss")
