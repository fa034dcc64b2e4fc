"""`resume=` continues the run that was interrupted, as it was launched: its own composed config (saved beside it
as `config.yaml` when it started; a curriculum's launch overrides in `curriculum.json`), in its own directory.

The command line may change only what is safe to change in the middle of a run (`SAFE_KEYS`): how long it trains
(`trainer.max_steps`, to extend it), how many threads it uses, what the diagnostic callbacks log. Any other
setting given with `resume=` that differs from the run's is refused, naming both values. Extending a run keeps its
learning-rate schedule: `optim.total_steps` is pinned to the length the run was launched with (so the rate past
that step stays at the schedule's end value) unless the command line sets it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SAFE_KEYS = ("trainer.max_steps", "optim.total_steps", "threads")
SAFE_PREFIXES = ("callbacks.",)
# keys that say where or how to resume, not what the run is
IGNORED = ("resume", "hydra.", "paths.run_dir")


def override_keys(overrides: list[str]) -> list[str]:
    """The keys a command line's overrides set (`+a.b=1` -> `a.b`; a group choice `stage=sft` -> `stage`)."""
    keys = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("~+")
        if not key.startswith(IGNORED) and key not in keys:
            keys.append(key)
    return keys


def is_safe(key: str) -> bool:
    return key in SAFE_KEYS or key.startswith(SAFE_PREFIXES)


def check_changes(stored: DictConfig, current: DictConfig, keys: list[str], where: Path) -> list[str]:
    """The keys among `keys` whose value in `current` differs from the stored run's: ValueError for any that is not
    safe to change, naming both values; returns the safe ones."""
    changed = []
    for key in keys:
        old = OmegaConf.select(stored, key, default=None)
        new = OmegaConf.select(current, key, default=None)
        if isinstance(new, DictConfig):  # a group choice (stage=dpo): compare what it composed
            new = OmegaConf.to_container(new, resolve=True)
            old = OmegaConf.to_container(old, resolve=True) if isinstance(old, DictConfig) else old
        if old == new:
            continue
        if not is_safe(key):
            raise ValueError(
                f"resume: {key}={new!r} differs from the interrupted run's {key}={old!r} ({where}); a resumed run "
                f"keeps its config, and only {', '.join(SAFE_KEYS)} and callbacks.* may change"
            )
        changed.append(key)
    return changed


def pin_schedule(stored: DictConfig, current: DictConfig, changed: list[str]) -> None:
    """Extending a run (`trainer.max_steps` up) keeps the schedule it was trained with, unless the command line sets
    `optim.total_steps` itself."""
    if "trainer.max_steps" not in changed or "optim.total_steps" in changed:
        return
    if OmegaConf.select(stored, "optim.total_steps", default=None) is None:
        launched = stored.trainer.max_steps
        stored.optim.total_steps = launched
        log.info(
            "resume: trainer.max_steps %s -> %s; optim.total_steps pinned to %s, so the learning-rate schedule is "
            "the one the run was trained with (pass optim.total_steps=N to stretch it instead)",
            launched,
            current.trainer.max_steps,
            launched,
        )


def resumed_run_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config a `resume=` launch of one stage trains with: the interrupted run's own (from its config.yaml),
    with the command line's safe changes, continuing in the run's directory from its checkpoint. A run saved no
    config (older runs): the command line's config, as before, in the run's directory."""
    from neuraflux.train import resolve_resume

    checkpoint = resolve_resume(cfg.resume, Path(cfg.paths.output_dir), cfg.stage.name)
    run_dir = checkpoint.parent.parent
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        log.warning("resume: %s has no config.yaml; resuming with this command line's config", run_dir)
        stored = cfg.copy()
    else:
        stored = OmegaConf.load(saved)
        OmegaConf.set_struct(stored, False)
        changed = check_changes(stored, cfg, override_keys(overrides), saved)
        pin_schedule(stored, cfg, changed)  # before the update: it reads the length the run was launched with
        for key in changed:
            OmegaConf.update(stored, key, OmegaConf.select(cfg, key), force_add=True)
    stored.resume = str(checkpoint)
    stored.paths.run_dir = str(run_dir)
    log.info("resume: continuing %s from %s", run_dir, checkpoint.name)
    return stored


def resumed_curriculum_overrides(cfg: DictConfig, overrides: list[str]) -> tuple[Path, list[str]]:
    """(parent, overrides) of an interrupted curriculum: the overrides it was launched with (curriculum.json), the
    command line's safe changes, and `resume=PARENT`. ValueError for any other change."""
    from neuraflux.curriculum import CurriculumState, resume_parent

    parent = resume_parent(cfg)
    state = CurriculumState.load(parent)
    launched = list(state.overrides)
    given = [o for o in overrides if not o.lstrip("~+").startswith(IGNORED)]
    stored_keys = dict((o.split("=", 1)[0].lstrip("~+"), o) for o in launched)
    extra = []
    for item in given:
        key = item.split("=", 1)[0].lstrip("~+")
        if stored_keys.get(key) == item:
            continue
        if not is_safe(key):
            before = stored_keys.get(key, "(not set)")
            raise ValueError(
                f"resume: {item} differs from the interrupted curriculum's {before} ({parent}/curriculum.json); a "
                f"resumed curriculum keeps its launch settings, and only {', '.join(SAFE_KEYS)} and callbacks.* may "
                "change"
            )
        extra.append(item)
    return parent, [*launched, *extra, f"resume={parent}"]
