"""What `python train.py` does with a composed config: one stage, or a curriculum of stages; then a summary."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from neuraflux.sweep import OBJECTIVE_FILE
from neuraflux.train import objective, train

log = logging.getLogger(__name__)

# How this package refuses what a user asked for, a setting or a file, with a message naming it: `validate`, the
# stages' and data modules' constructors, model.io and NanoConfig raise these, and Lightning raises
# MisconfigurationException for its own settings. Anything else (AttributeError, TypeError, KeyError, ...) is a
# bug, and keeps its traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    MisconfigurationException,
)


# what Hydra writes into a job's directory before our code runs
HYDRA_FILES = {".hydra", "train.log"}


@contextmanager
def user_errors_exit(job_dir: str | Path | None = None) -> Iterator[None]:
    """Turn a user's mistake into `error: <message>` on stderr and exit status 1, as the CLI does, instead of a
    traceback through Hydra and Lightning. HYDRA_FULL_ERROR=1 keeps the traceback, as for Hydra's own errors.
    `job_dir`, Hydra's directory for this job, is removed when it holds nothing but Hydra's own files: a launch
    refused before any work leaves no stub run behind."""
    try:
        yield
    except USER_ERRORS as err:
        if job_dir is not None:
            remove_stub(Path(job_dir))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {err}") from None


def remove_stub(job_dir: Path) -> None:
    """Delete `job_dir` if it holds only what Hydra wrote (its .hydra folder and log), never anything of a run."""
    if job_dir.is_dir() and {p.name for p in job_dir.iterdir()} <= HYDRA_FILES:
        shutil.rmtree(job_dir)
        with contextlib.suppress(OSError):  # its parent (outputs/<name>/) too, if that is now empty
            job_dir.parent.rmdir()


def summary_table(metrics: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        value = metrics[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def report_objective(stage: DictConfig, metrics: dict, run_dir: str | Path) -> float | None:
    """The stage's `optimized_metric` at the end of its run, also written with its mode to run_dir/objective.json
    (what MultirunSummary ranks a sweep's jobs by). A run that ended before validating has none: a sweep's job
    then fails naming the metric (a sweeper needs the number), a single run warns and returns None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    sweeping = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if stage.get("optimized_metric") and stage.optimized_metric not in metrics and not sweeping:
        log.warning("stage.optimized_metric=%r was not logged (the run never validated): no objective",
                    stage.optimized_metric)  # fmt: skip
        return None
    value = objective(metrics, stage)
    if rank_zero_only.rank == 0:
        record = {"metric": stage.optimized_metric, "mode": stage.get("optimized_mode", "min"), "value": value}
        (Path(run_dir) / OBJECTIVE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return value


def run(cfg: DictConfig, overrides: list[str] | None = None) -> float | None:
    """Train; returns the (last) stage's `stage.optimized_metric`, what a Hydra sweeper optimises."""
    from rich.console import Console

    if overrides is None:  # the command line's overrides (what a resumed run may change)
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    if cfg.curriculum.stages or cfg.curriculum.get("rounds"):
        from neuraflux.curriculum import run_curriculum
        from neuraflux.eval import eval_table

        if cfg.curriculum.get("print_stages"):
            from neuraflux.curriculum import stage_configs

            for name, stage_cfg in stage_configs(cfg, overrides).items():
                print(f"# ---- stage {name} " + "-" * 60 + "\n" + OmegaConf.to_yaml(stage_cfg), flush=True)
            return None
        if cfg.get("resume"):  # the interrupted curriculum as it was launched (its stages, its overrides)
            from hydra import compose

            from neuraflux.resume import resumed_curriculum_overrides

            _, overrides = resumed_curriculum_overrides(cfg, overrides)
            cfg = compose(config_name="config", overrides=overrides)
        result = run_curriculum(cfg, overrides)
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # a log file: no terminal to fit, and wide lines are no harm there
        for name, metrics in result["stages"].items():
            console.print(summary_table(metrics, f"{name}: {result['parent'] / name}"))
        if result["eval"] is not None:
            console.print(eval_table(result["eval"], f"evaluation: {result['parent']}"))
        if result["report"] is not None:
            from neuraflux.report import rich_tables

            for table in rich_tables(result["report"], console.width):
                console.print(table)
            console.print(f"report: {result['parent'] / 'report.md'}")
        last = result["last_stage"]
        return report_objective(last, result["stages"][result["last_step"]], result["parent"])
    if cfg.get("resume"):  # the interrupted run's own config, in its own directory
        from neuraflux.resume import resumed_run_config

        cfg = resumed_run_config(cfg, overrides)
    metrics, objects = train(cfg)
    if objects["trainer"].is_global_zero:
        Console().print(summary_table(metrics, f"{cfg.stage.name}: {objects['run_dir']}"))
    return report_objective(cfg.stage, metrics, objects["run_dir"])
