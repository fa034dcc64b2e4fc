"""A curriculum: a chain of stage runs under one parent directory, each starting from the previous stage's model.

Each stage is a separate Lightning run (its own TensorBoard run, checkpoints and exported model) composed from
the same config tree, as `python train.py curriculum=none stage=NAME stage.init_from=PREVIOUS/model` would be.
`curriculum.json` in the parent records progress, so an interrupted curriculum resumes at the stage it was in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from neuraflux.train import train

log = logging.getLogger(__name__)

STATE_FILE = "curriculum.json"
# overrides the curriculum sets itself for each stage run; the command line's versions are dropped
_OWNED = ("curriculum", "stage", "paths.run_dir", "resume", "hydra")


@dataclass
class CurriculumState:
    stages: list[str]
    completed: list[str] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)

    def save(self, parent: Path) -> None:
        (parent / STATE_FILE).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, parent: Path) -> CurriculumState:
        return cls(**json.loads((parent / STATE_FILE).read_text()))


def stage_names(cfg: DictConfig) -> list[str]:
    stages = list(cfg.curriculum.stages)
    start = cfg.curriculum.get("start_at")
    if start is not None:
        if start not in stages:
            raise ValueError(f"curriculum.start_at={start!r} is not one of curriculum.stages {stages}")
        stages = stages[stages.index(start) :]
    return stages


def check_stages(stages: list[str], conf_dir: Path) -> None:
    """Every stage must be a config in conf/stage, checked before anything trains."""
    known = sorted(p.stem for p in (conf_dir / "stage").glob("*.yaml"))
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValueError(f"curriculum.stages names unknown stage(s) {unknown}; available: {known}")


def resume_parent(cfg: DictConfig) -> Path | None:
    """With resume=last, the newest parent directory of this curriculum that has not finished; or resume=DIR."""
    resume = cfg.get("resume")
    if not resume:
        return None
    if resume != "last":
        parent = Path(resume)
        if not (parent / STATE_FILE).is_file():
            raise FileNotFoundError(f"resume: {parent} is not a curriculum directory (no {STATE_FILE})")
        return parent
    candidates = sorted(
        (Path(cfg.paths.output_dir) / cfg.curriculum.name).glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime
    )
    for state_file in reversed(candidates):
        state = CurriculumState.load(state_file.parent)
        if len(state.completed) < len(state.stages):
            return state_file.parent
    raise FileNotFoundError(f"resume=last: no unfinished curriculum under {cfg.paths.output_dir}/{cfg.curriculum.name}")


def run_curriculum(cfg: DictConfig, overrides: list[str], conf_dir: Path) -> dict:
    """Run the stages in order; returns {"stages": {name: metrics}, "parent": dir, "eval": result or None}.

    Needs an initialised Hydra (inside @hydra.main, or tests' initialize_config_dir) to compose each stage.
    """
    from hydra import compose

    stages = stage_names(cfg)
    check_stages(stages, conf_dir)
    parent = resume_parent(cfg) or Path(cfg.paths.run_dir)
    parent.mkdir(parents=True, exist_ok=True)
    state = CurriculumState.load(parent) if (parent / STATE_FILE).is_file() else CurriculumState(stages)
    state.save(parent)
    user = [o for o in overrides if not o.lstrip("~+").startswith(_OWNED)]
    previous = Path(cfg.curriculum.init_from) if cfg.curriculum.get("init_from") else None
    if previous is not None and not previous.exists():
        raise FileNotFoundError(f"curriculum.init_from: {previous} does not exist")
    for name in stages:
        run_dir = parent / name
        if name in state.completed:
            log.info("curriculum: %s already done in %s", name, run_dir)
            previous = run_dir / "model"
            continue
        per_stage = list(cfg.curriculum.get("overrides", {}).get(name, []))
        forced = ["curriculum=none", f"stage={name}", f"paths.run_dir={run_dir}"]
        if previous is not None:
            forced.append(f"stage.init_from={previous}")
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            forced.append(f"resume={run_dir}")  # interrupted mid-stage: continue that run
        stage_cfg = compose(config_name="config", overrides=[*per_stage, *user, *forced])
        log.info("curriculum: stage %s -> %s", name, run_dir)
        metrics, _ = train(stage_cfg)
        state.completed.append(name)
        state.metrics[name] = metrics
        state.save(parent)
        previous = run_dir / "model"
    result = {"stages": state.metrics, "parent": parent, "eval": None}
    if cfg.curriculum.get("eval") and previous is not None:
        result["eval"] = evaluate_model(cfg, previous, parent)
    return result


def evaluate_model(cfg: DictConfig, model_dir: Path, parent: Path) -> dict:
    from neuraflux.eval import EvalSettings, evaluate
    from neuraflux.train import load_pretrained
    from neuraflux.world import WorldConfig, generate_world

    model, tokenizer = load_pretrained(model_dir)
    world = generate_world(WorldConfig(**OmegaConf.to_container(cfg.world, resolve=True)))
    result = evaluate(model, tokenizer, world, EvalSettings(limit=cfg.curriculum.get("eval_limit", 100)))
    (parent / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
