"""The end of a `-m` multirun: one table of every job (its overrides, its objective, its run directory) and the best
job named, also written to `<sweep dir>/summary.json`.

A Hydra callback (`hydra.callbacks.multirun_summary` in conf/hydra/default.yaml). Each job writes `job.json` into its
own directory when it ends, and the summary reads them back, so it works with launchers that run jobs elsewhere.
The objective is what `python train.py` returns: the last stage's `stage.optimized_metric`; which way is better is
its `stage.optimized_mode` (min or max), read from the `objective.json` the run wrote (neuraflux.run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

JOB_FILE = "job.json"
OBJECTIVE_FILE = "objective.json"  # {"metric", "mode", "value"}: written by each run (neuraflux.run)


def job_record(
    number: int,
    overrides: list[str],
    status: str,
    objective: Any,
    run_dir: str,
    metric: str | None = None,
    mode: str | None = None,
) -> dict:
    value = float(objective) if isinstance(objective, int | float) and math.isfinite(objective) else None
    return {"job": number, "overrides": overrides, "status": status, "objective": value, "run_dir": run_dir,
            "metric": metric, "mode": mode}  # fmt: skip


def summarize(records: list[dict]) -> dict:
    """{"jobs": records sorted by number, "best": the completed job with the best objective (the lowest, or the
    highest where the jobs' mode is max), or None}."""
    records = sorted(records, key=lambda r: r["job"])
    scored = [r for r in records if r["status"] == "COMPLETED" and r["objective"] is not None]
    pick = max if scored and scored[0].get("mode") == "max" else min
    return {"jobs": records, "best": pick(scored, key=lambda r: r["objective"]) if scored else None}


def summary_lines(summary: dict) -> list[str]:
    named = next((r for r in summary["jobs"] if r.get("metric")), {})
    metric = named.get("metric") or "objective"
    rows = [("job", "overrides", f"{metric} ({named.get('mode') or 'min'})", "status")]
    for r in summary["jobs"]:
        objective = "-" if r["objective"] is None else f"{r['objective']:.4f}"
        rows.append((str(r["job"]), " ".join(r["overrides"]) or "(none)", objective, r["status"].lower()))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    best = summary["best"]
    if best is None:
        lines.append("no job finished with an objective")
    else:
        lines.append(f"best: job {best['job']} ({' '.join(best['overrides']) or 'defaults'}), "
                     f"{metric} {best['objective']:.4f}, {best['run_dir']}")  # fmt: skip
    return lines


class MultirunSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        # a SLURM job of several tasks (hydra/launcher=slurm) runs every rank through Hydra: rank 0 keeps the record
        if config.hydra.mode != RunMode.MULTIRUN or rank_zero_only.rank != 0:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        status = "COMPLETED" if job_return.status == JobStatus.COMPLETED else "FAILED"
        objective = job_return.return_value if status == "COMPLETED" else None
        written = run_dir / OBJECTIVE_FILE
        named = json.loads(written.read_text()) if written.is_file() else {}
        record = job_record(
            int(config.hydra.job.num),
            list(config.hydra.overrides.task),
            status,
            objective,
            str(run_dir),
            named.get("metric"),
            named.get("mode"),
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / JOB_FILE).write_text(json.dumps(record, indent=2) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = [json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{JOB_FILE}")]
        if not records:
            return
        summary = summarize(records)
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("\n".join(["", f"multirun: {len(records)} jobs in {sweep_dir}", *summary_lines(summary)]), flush=True)
