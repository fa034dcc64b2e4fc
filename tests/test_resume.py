"""`resume=last` alone continues the interrupted run as it was launched: its config, its directory, its stage list;
the result equals an uninterrupted run, and a change that is not safe mid-run is refused."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from neuraflux.curriculum import CurriculumState
from neuraflux.run import run
from neuraflux.train import train
from tests.conftest import CONF, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """Stands for the process dying: raised once, at the start of a given step."""


class KillAt(pl.Callback):
    armed = True  # cleared by the test before it resumes (the resumed run rebuilds this callback from its config)

    def __init__(self, step: int, stage: str | None = None):
        self.step, self.stage = step, stage

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if KillAt.armed and trainer.global_step == self.step and self.stage in (None, pl_module.name):
            raise Killed(f"killed at step {self.step}")


# 9 steps (not the tiny profile's 6), checkpoints every 3, learned from scratch
LAUNCH = ["curriculum=none", "trainer.max_steps=9", "trainer.val_check_interval=3", "optim.warmup_steps=2"]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def interrupt(tmp_path, stage: str = "pretrain"):
    """A `stage` run launched with LAUNCH, killed at step 5 (its last.ckpt is step 3): its run directory."""
    run_dir = tmp_path / stage / "first"
    cfg = compose_cfg(tmp_path, *LAUNCH, f"stage={stage}", f"paths.run_dir={run_dir}")
    OmegaConf.update(cfg, "callbacks.kill", {"_target_": "tests.test_resume.KillAt", "step": 5}, force_add=True)
    KillAt.armed = True
    with pytest.raises(Killed):
        train(cfg)
    KillAt.armed = False
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    return run_dir


@pytest.fixture
def interrupted(tmp_path):
    return interrupt(tmp_path)


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_resume_last_alone_finishes_the_run_as_launched(tmp_path, stage):
    interrupted = interrupt(tmp_path, stage)
    # the command line says only `curriculum=none resume=last` (the README's command): the tiny profile's own
    # max_steps is 6, the run's 9
    cfg = compose_cfg(tmp_path, "curriculum=none", f"stage={stage}", "resume=last")
    assert cfg.trainer.max_steps == 6
    run(cfg, ["curriculum=none", f"stage={stage}", "resume=last"])
    assert sorted(p.name for p in (tmp_path / stage).iterdir()) == ["first"]  # continued in place
    assert json.loads((interrupted / "metrics.json").read_text())["global_step"] == 9
    reference = tmp_path / "reference"
    train(compose_cfg(tmp_path, *LAUNCH, f"stage={stage}", f"paths.run_dir={reference}"))
    resumed, uninterrupted = weights(interrupted), weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0, msg=name)


def test_resume_refuses_a_change_that_is_not_safe_mid_run(tmp_path, interrupted):
    cfg = compose_cfg(tmp_path, "curriculum=none", "resume=last", "optim.lr=0.01")
    with pytest.raises(ValueError, match=r"resume: optim.lr=0.01 differs from the interrupted run's optim.lr=0.001"):
        run(cfg, ["curriculum=none", "resume=last", "optim.lr=0.01"])
    cfg = compose_cfg(tmp_path, "curriculum=none", "resume=last", "stage=sft")
    with pytest.raises(FileNotFoundError, match="resume=last: no .*/sft/"):  # another stage: not this run
        run(cfg, ["curriculum=none", "resume=last", "stage=sft"])


def test_extending_a_run_keeps_its_learning_rate_schedule(tmp_path, interrupted):
    cfg = compose_cfg(tmp_path, "curriculum=none", "resume=last", "trainer.max_steps=12")
    run(cfg, ["curriculum=none", "resume=last", "trainer.max_steps=12"])
    saved = OmegaConf.load(interrupted / "config.yaml")
    assert saved.trainer.max_steps == 12 and saved.optim.total_steps == 9  # the schedule it was trained with
    assert json.loads((interrupted / "metrics.json").read_text())["global_step"] == 12


def test_an_interrupted_curriculum_resumes_its_own_stage_list(tmp_path):
    common = [
        "debug=tiny", "curriculum.stages=[pretrain,sft]", "curriculum.report=false", "curriculum.eval=false",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "world.practice_entities=0",
        "curriculum.overrides.pretrain=[]", "curriculum.overrides.sft=[]", f"paths.output_dir={tmp_path}",
    ]  # fmt: skip
    kill = "+callbacks.kill={_target_:tests.test_resume.KillAt,step:5,stage:sft}"
    launch = [*common, kill, f"paths.run_dir={tmp_path / 'full' / 'run1'}"]

    def launched(cfg, overrides):  # as train.py runs it: inside an initialised Hydra (the stages are composed)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return run(cfg, overrides)

    KillAt.armed = True
    with pytest.raises(Killed):  # dies in sft, after its step-3 checkpoint
        launched(compose_cfg(tmp_path, *launch, tiny=False), launch)
    KillAt.armed = False
    parent = tmp_path / "full" / "run1"
    state = CurriculumState.load(parent)
    assert state.completed == ["pretrain"] and state.overrides == launch
    cfg = compose_cfg(tmp_path, "resume=last", "optim.lr=0.5", tiny=False)
    with pytest.raises(ValueError, match=r"resume: optim.lr=0.5 differs from the interrupted curriculum's"):
        launched(cfg, ["resume=last", "optim.lr=0.5"])
    # the README's command alone: the default curriculum would be seven stages from pretrain
    cfg = compose_cfg(tmp_path, "resume=last", tiny=False)
    assert len(cfg.curriculum.stages) == 7
    launched(cfg, ["resume=last"])
    assert CurriculumState.load(parent).completed == ["pretrain", "sft"]
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == ["pretrain", "sft"]
    # the same curriculum never interrupted: the same final weights
    reference = [*common, f"paths.run_dir={tmp_path / 'full' / 'reference'}"]
    launched(compose_cfg(tmp_path, *reference, tiny=False), reference)
    resumed, uninterrupted = weights(parent / "sft"), weights(tmp_path / "full" / "reference" / "sft")
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0, msg=name)
