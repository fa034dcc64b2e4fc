"""A curriculum: a chain of stage runs under one parent directory, each starting from the previous stage's model.

Each stage is a separate Lightning run (its own TensorBoard run, checkpoints and exported model) composed from
the same config tree, as `python train.py curriculum=none stage=NAME stage.init_from=PREVIOUS/model` would be.
A stage whose config says `stage.produces: reward_model` (stage=reward) does not continue the policy chain: the
next stage starts from the last policy, and stages that score with a reward model get `stage.reward_model` set
to it. `curriculum.json` in the parent records progress, so an interrupted curriculum resumes at the stage it was
in; after each policy stage the curriculum measures it (neuraflux.report) and at the end writes report.md/json.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from neuraflux.paths import CONF_DIR
from neuraflux.rounds import OnlineSettings
from neuraflux.train import check_settings, train

log = logging.getLogger(__name__)

STATE_FILE = "curriculum.json"
# overrides the curriculum sets itself for each stage run; the command line's versions are dropped
_OWNED = ("curriculum", "stage", "paths.run_dir", "resume", "hydra")
# stages that may start from random weights; every other stage refines a policy and needs one to start from
FROM_SCRATCH = ("pretrain", "sft")


@dataclass
class CurriculumState:
    stages: list[str]
    completed: list[str] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)
    measures: dict[str, dict] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # the launch's command line: what resume=... composes

    def save(self, parent: Path) -> None:
        (parent / STATE_FILE).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, parent: Path) -> CurriculumState:
        return cls(**json.loads((parent / STATE_FILE).read_text()))


@dataclass(frozen=True)
class StagePlan:
    name: str
    produces: str  # "policy" | "reward_model"
    needs_reward_model: bool
    takes_reward_model: bool  # has a stage.reward_model key the curriculum can fill


def stage_names(cfg: DictConfig) -> list[str]:
    stages = list(cfg.curriculum.stages)
    start = cfg.curriculum.get("start_at")
    if start is not None:
        if start not in stages:
            raise ValueError(f"curriculum.start_at={start!r} is not one of curriculum.stages {stages}")
        stages = stages[stages.index(start) :]
    return stages


def check_stages(stages: list[str]) -> None:
    """Every stage must be a config in conf/stage, and appear once, checked before anything trains."""
    repeated = sorted({s for s in stages if stages.count(s) > 1})
    if repeated:
        # progress is recorded per stage name, so a second run of a stage would be skipped as already done
        raise ValueError(
            f"curriculum.stages names {', '.join(map(repr, repeated))} more than once ({stages}); a curriculum runs "
            "each stage once: start a second curriculum from this one's model (curriculum.init_from) to repeat it"
        )
    known = sorted(p.stem for p in (CONF_DIR / "stage").glob("*.yaml"))
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValueError(f"curriculum.stages names unknown stage(s) {unknown}; available: {known}")


def needs_reward_model(stage_cfg: DictConfig) -> bool:
    """Whether the stage scores with a reward model: reward_source reward_model|both, a reward_model weight, or
    (multitask, combine=lagrangian) a constraint on the reward model's score."""
    module = stage_cfg.stage.get("module") or {}
    if module.get("reward_source") in ("reward_model", "both"):
        return True
    if module.get("combine") == "lagrangian" and (module.get("thresholds") or {}).get("reward_model") is not None:
        return True
    weights = module.get("weights") or {}
    return float(weights.get("reward_model", 0.0) or 0.0) > 0.0


def plan_stage(name: str, stage_cfg: DictConfig) -> StagePlan:
    produces = stage_cfg.stage.get("produces", "policy")
    if produces not in ("policy", "reward_model"):
        raise ValueError(f"conf/stage/{name}.yaml: stage.produces must be policy or reward_model, got {produces!r}")
    return StagePlan(name, produces, needs_reward_model(stage_cfg), "reward_model" in stage_cfg.stage)


def check_inputs(plans: list[StagePlan], cfg: DictConfig, user: list[str]) -> None:
    """Fail before any training when a stage's input (a policy, a reward model) comes from nowhere (an online
    round's plans come last: its reward stage, then its policy stage)."""
    has_policy = bool(cfg.curriculum.get("init_from"))
    has_reward = bool(cfg.curriculum.get("reward_model")) or any(o.startswith("stage.reward_model=") for o in user)
    for plan in plans:
        if plan.produces == "reward_model":
            has_reward = True
            if not has_policy:
                # a reward model is a policy's backbone plus a head: it needs the policy's weights and tokenizer
                raise ValueError(
                    f"curriculum stage '{plan.name}' starts from a policy but none comes before it: put a "
                    "pretrain/sft stage first or pass curriculum.init_from=PATH (a model directory)"
                )
            continue
        if not has_policy and plan.name not in FROM_SCRATCH:
            raise ValueError(
                f"curriculum stage '{plan.name}' refines a policy but none comes before it: put a pretrain/sft "
                "stage first or pass curriculum.init_from=PATH (a model directory, e.g. outputs/<run>/sft/model)"
            )
        if plan.needs_reward_model and not has_reward:
            raise ValueError(
                f"curriculum stage '{plan.name}' scores with a reward model but no 'reward' stage comes before it; "
                "add reward to curriculum.stages before it, or pass curriculum.reward_model=PATH "
                "(the model directory of a stage=reward run)"
            )
        has_policy = True


def stage_overrides(
    cfg: DictConfig, name: str, user: list[str], parent: Path, extra: list[str], step: str | None = None
) -> list[str]:
    """The overrides a curriculum composes stage `name` from: its per-stage overrides, the user's, then its own.
    `step` names the run directory under `parent` when it is not the stage's name (an online round's stages)."""
    per_stage = list(cfg.curriculum.get("overrides", {}).get(name, []))
    run_dir = parent / (step or name)
    return [*per_stage, *user, "curriculum=none", f"stage={name}", f"paths.run_dir={run_dir}", *extra]


def stage_composer(cfg: DictConfig, user: list[str], parent: Path) -> Callable[..., DictConfig]:
    """compose_stage(name, extra, step=None): stage `name`'s config as this curriculum composes it."""
    from hydra import compose

    def compose_stage(name: str, extra: list[str], step: str | None = None) -> DictConfig:
        return compose(config_name="config", overrides=stage_overrides(cfg, name, user, parent, extra, step))

    return compose_stage


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


def _existing(path, key: str) -> Path | None:
    if not path:
        return None
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    return path


def stage_configs(cfg: DictConfig, overrides: list[str]) -> dict[str, DictConfig]:
    """Each stage's composed config, as the curriculum will train it (its per-stage overrides, the command line's,
    its own; the previous stage's model appears as `stage.init_from` only when the chain runs)."""

    user = [o for o in overrides if not o.lstrip("~+").startswith(_OWNED)]
    parent = Path(cfg.paths.run_dir)

    compose_stage = stage_composer(cfg, user, parent)
    configs = {name: compose_stage(name, []) for name in stage_names(cfg)}
    if cfg.curriculum.get("rounds"):  # an online round's stages, as round 1 composes them
        rounds = OnlineSettings.from_config(cfg.curriculum).compose_checks(compose_stage, parent)
        configs.update({f"round1/{name}": stage_cfg for name, stage_cfg in rounds.items()})
    return configs


def run_curriculum(cfg: DictConfig, overrides: list[str]) -> dict:
    """Run the stages in order; returns {"stages": {name: metrics}, "parent": dir, "eval": result or None,
    "report": report dict or None}.

    Needs an initialised Hydra (inside @hydra.main, or tests' initialize_config_dir) to compose each stage.
    """

    stages = stage_names(cfg)
    check_stages(list(cfg.curriculum.stages))
    online = OnlineSettings.from_config(cfg.curriculum) if cfg.curriculum.get("rounds") else None
    user = [o for o in overrides if not o.lstrip("~+").startswith(_OWNED)]
    previous = _existing(cfg.curriculum.get("init_from"), "curriculum.init_from")
    reward_model = _existing(cfg.curriculum.get("reward_model"), "curriculum.reward_model")
    parent = resume_parent(cfg) or Path(cfg.paths.run_dir)

    compose_stage = stage_composer(cfg, user, parent)
    # Compose every stage before anything runs: a bad override or a missing input fails here, not mid-chain.
    launch = [o for o in overrides if not o.lstrip("~+").startswith(("resume", "hydra"))]
    resuming = (parent / STATE_FILE).is_file()
    steps = stages + (online.steps() if online else [])
    state = CurriculumState.load(parent) if resuming else CurriculumState(steps, overrides=launch)
    # stages before start_at take part only through the outputs they left in this parent (resume)
    composed = {n: compose_stage(n, []) for n in cfg.curriculum.stages if n in stages or n in state.completed}
    plans = [plan_stage(name, stage_cfg) for name, stage_cfg in composed.items()]
    round_configs = online.compose_checks(compose_stage, parent) if online else {}
    check_inputs(plans + [plan_stage(n, c) for n, c in round_configs.items()], cfg, user)
    from neuraflux.retrieval.documents import retrieval_settings

    for name, stage_cfg in {**composed, **round_configs}.items():  # every setting to come, before anything is written
        if name not in state.completed:
            try:
                check_settings(stage_cfg)
                retrieval_settings(stage_cfg.get("retrieval"))  # the world store's (reward data, evaluation)
            except ValueError as err:
                raise ValueError(f"stage {name}: {err}") from None

    parent.mkdir(parents=True, exist_ok=True)
    state.save(parent)

    def run_step(step: str, name: str, extra: list[str]) -> None:
        """Train stage `name` into parent/step (once: a resumed curriculum skips a completed step)."""
        run_dir = parent / step
        if step in state.completed:
            log.info("curriculum: %s already done in %s", step, run_dir)
            return
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            extra = [*extra, f"resume={run_dir}"]  # interrupted mid-stage: continue that run
        stage_cfg = compose_stage(name, extra, step)
        log.info("curriculum: stage %s -> %s", step, run_dir)
        start = time.perf_counter()
        metrics, _ = train(stage_cfg)
        state.wall_s[step] = round(time.perf_counter() - start, 1)
        state.completed.append(step)
        state.metrics[step] = metrics
        state.save(parent)

    def measure(step: str, policy: Path) -> None:
        if cfg.curriculum.get("report") and step not in state.measures and step not in cfg.curriculum.report.skip:
            from neuraflux.report import measure_stage

            start = time.perf_counter()
            state.measures[step] = measure_stage(cfg, policy, reference, reward_model)
            state.measures[step]["measure_s"] = round(time.perf_counter() - start, 1)
            state.save(parent)

    reference = previous  # the policy KL is measured against: the SFT model once there is one
    last = plans[-1].name if plans else None
    for plan in plans:
        name = plan.name
        extra = [f"stage.init_from={previous}"] if previous is not None else []
        if (
            plan.takes_reward_model
            and reward_model is not None
            and not any(o.startswith("stage.reward_model=") for o in user)
        ):
            extra.append(f"stage.reward_model={reward_model}")
        run_step(name, name, extra)
        if plan.produces == "reward_model":
            reward_model = parent / name / "model"
            continue
        previous = parent / name / "model"
        if name == "sft" or reference is None:
            reference = previous
        measure(name, previous)
    if online is not None:
        for step, model_dir in online.run(cfg, state, parent, run_step, previous, reference):
            if step.endswith("/reward"):
                reward_model = model_dir
            else:
                previous = model_dir
                measure(step, previous)
            last = step
    # the last stage's settings: its optimized_metric is the curriculum's objective (neuraflux.run)
    last_stage = (composed.get(last) or round_configs[last.rsplit("/", 1)[1]]).stage
    result = {"stages": state.metrics, "parent": parent, "eval": None, "report": None, "last_stage": last_stage,
              "last_step": last}  # fmt: skip
    if cfg.curriculum.get("report"):
        from neuraflux.report import write_report

        result["report"] = write_report(parent, state, cfg)
    elif cfg.curriculum.get("eval") and previous is not None:
        result["eval"] = evaluate_model(cfg, previous, parent)
    return result


def evaluate_model(cfg: DictConfig, model_dir: Path, parent: Path) -> dict:
    from neuraflux.eval import EvalSettings, evaluate
    from neuraflux.model.io import load_pretrained
    from neuraflux.retrieval.documents import retrieval_settings
    from neuraflux.world import WorldConfig, generate_world

    model, tokenizer = load_pretrained(model_dir)
    world = generate_world(WorldConfig.from_dict(OmegaConf.to_container(cfg.world, resolve=True)))
    settings = EvalSettings(
        limit=cfg.curriculum.get("eval_limit", 100), retrieval=retrieval_settings(cfg.get("retrieval"))
    )
    result = evaluate(model, tokenizer, world, settings)
    (parent / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
