"""NaN in a stage stops the run at once, naming the step and the quantity; the last good checkpoint stays as it was
and no model is exported from the broken run."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from neuraflux.train import train
from tests.conftest import compose_cfg
from tests.test_dpo_stage import init_dir  # noqa: F401  (the fixture: an untrained policy with a world tokenizer)
from tests.test_rollout import token_share, toy_reward_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_STEP = 3  # checkpoints are written at step 2 (val_check_interval=2); the run breaks at step 3


class PoisonWeights(pl.Callback):
    """Sets one token's embedding (tied to the LM head) to NaN before training step `step`: a diverged update."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.lm_head.weight[0, 0] = float("nan")


class NaNRewardFrom:
    """The toy reward (share of one token), NaN from the `start`-th training rollout of `rows` rows on."""

    def __init__(self, token_id: int, start: int, rows: int):
        self.token_id, self.start, self.rows, self.calls = token_id, start, rows, 0

    def __call__(self, rollout) -> torch.Tensor:
        scores = token_share(rollout, self.token_id)
        if len(rollout) != self.rows:  # a validation rollout (greedy, one response a prompt)
            return scores
        self.calls += 1
        return scores.fill_(float("nan")) if self.calls > self.start else scores


def assert_last_good_checkpoint_kept(run) -> None:
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == BAD_STEP - 1
    assert all(bool(torch.isfinite(t).all()) for t in last["state_dict"].values())
    assert not any(p.name.startswith("exception") for p in (run / "checkpoints").iterdir())
    assert not (run / "model").exists(), "a broken run must not export a model"


def test_nan_in_the_dpo_loss_names_step_and_input_and_keeps_the_checkpoint(init_dir, tmp_path):  # noqa: F811
    cfg = compose_cfg(
        tmp_path,
        "stage=dpo",
        f"stage.init_from={init_dir}",
        "trainer.max_steps=6",
        "trainer.val_check_interval=2",
        f"+callbacks.poison._target_={__name__}.PoisonWeights",
        f"+callbacks.poison.step={BAD_STEP}",
    )
    with pytest.raises(FloatingPointError) as err:
        train(cfg)
    assert str(err.value) == (
        f"train/loss is nan at step {BAD_STEP} (first non-finite input: logps/chosen); stopping (last good "
        "checkpoint kept)"
    )
    assert_last_good_checkpoint_kept(tmp_path / "run")


def test_nan_reward_in_reinforce_names_step_and_quantity_and_keeps_the_checkpoint(tiny_cfg, tmp_path):
    cfg, tok = toy_reward_cfg(
        tiny_cfg,
        tmp_path,
        "reinforce",
        "trainer.max_steps=6",
        "trainer.val_check_interval=2",
        "data.batch_size=4",
        "stage.module.k=2",
    )
    cfg.stage.module.reward_fn = OmegaConf.create(
        {"_target_": f"{__name__}.NaNRewardFrom", "token_id": tok.token_to_id("a"), "start": BAD_STEP, "rows": 8}
    )
    with pytest.raises(
        FloatingPointError,
        match=rf"^objective/reward is not finite \(\[nan, nan, nan, nan\]\) at step "
        rf"{BAD_STEP}; stopping \(last good checkpoint kept\)$",
    ):
        train(cfg)
    assert_last_good_checkpoint_kept(tmp_path / "run")
