"""The loggers a run writes to (`logger=tensorboard|csv|mlflow|many`, conf/logger/): built from the config here.

`conf/logger/<name>.yaml` is one logger (a `_target_`) or, as `many.yaml`, a mapping of name -> logger; every
logger gets the stage's scalars from Lightning and the diagnostics through `callbacks/sinks.py`. Only this module
imports MLflow, which is optional.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger

log = logging.getLogger(__name__)

MLFLOW_MISSING = "logger=mlflow needs MLflow, which is not installed: pip install 'neuraflux[mlflow]'"


def build_loggers(spec: DictConfig | None, build) -> list[Logger] | bool:
    """The trainer's `logger` argument from `cfg.logger`: a list of loggers, or False (none: `logger=null`, or
    every logger of a mapping optional and unavailable). `build(spec, key)` instantiates one logger."""
    if not spec:
        return False
    specs = {"logger": spec} if "_target_" in spec else {f"logger.{name}": s for name, s in spec.items()}
    loggers = [build(s, key=key) for key, s in specs.items() if s is not None]
    return [lg for lg in loggers if lg is not None] or False


def check_loggers(spec: DictConfig | None) -> None:
    """Refuse, before anything is written, a logger that cannot be built here: a required MLflow logger without
    MLflow installed."""
    if not spec:
        return
    specs = [spec] if "_target_" in spec else [s for s in spec.values() if s is not None]
    for one in specs:
        if one.get("_target_") == f"{__name__}.mlflow_logger" and one.get("required", True):
            try:
                import mlflow  # noqa: F401
            except ImportError:
                raise ValueError(MLFLOW_MISSING) from None


def mlflow_logger(
    save_dir: str,
    tracking_uri: str | None = None,
    experiment_name: str = "neuraflux",
    run_name: str | None = None,
    required: bool = True,
    **kwargs,
) -> Logger | None:
    """Lightning's MLFlowLogger, by default on a local file store at `save_dir` (inside the run directory).

    MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set (it keeps it in maintenance mode, steering
    users to a database, which mlflow-skinny cannot open without SQLAlchemy): for the store in the run directory it
    is set here, unless the environment already says otherwise. Without MLflow installed: a ValueError naming the
    package, or None (no logger) when `required` is false.
    """
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if required:
            raise ValueError(MLFLOW_MISSING) from None
        log.info("logger.mlflow: MLflow is not installed; logging without it")
        return None
    from pytorch_lightning.loggers import MLFlowLogger

    if tracking_uri is None:
        tracking_uri = Path(save_dir).resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri, **kwargs)
