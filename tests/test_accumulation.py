"""Gradient accumulation is exact: k micro-batches of b give the gradient of one batch of k x b, for SFT, DPO (with
the RPO term) and the reward model, through the whole `train()` path (Lightning's accumulate_grad_batches).

SFT averages over response tokens and RPO over the chosen responses' tokens, and micro-batches hold different
numbers of them: a per-micro-batch mean weights a short micro-batch's tokens more than a long one's. Each
micro-batch's summed loss is divided by the whole step's count instead (`stages.common.step_denominator`).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from neuraflux.train import train
from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

K, B = 3, 4  # micro-batches per optimizer step, pairs or examples per micro-batch


class FirstStepGrads(pl.Callback):
    """The gradients of the first optimizer step (accumulated, before clipping) and each micro-batch's counts."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] | None = None
        self.counts: list[dict[str, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.grads is None:
            self.counts.append(batch.counts())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def first_step(tmp_path, *overrides: str, accumulate: int, batch_size: int) -> FirstStepGrads:
    cfg = compose_cfg(
        tmp_path,
        *overrides,
        "model.dropout=0.0",
        "trainer.max_steps=1",
        f"trainer.accumulate_grad_batches={accumulate}",
        f"trainer.val_check_interval={accumulate}",
        "trainer.limit_val_batches=1",
        f"data.batch_size={batch_size}",
        "+callbacks.grads._target_=tests.test_accumulation.FirstStepGrads",
    )
    _, objects = train(cfg)
    return next(c for c in objects["trainer"].callbacks if isinstance(c, FirstStepGrads))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A briefly SFT'd tiny policy for the stages that refine one."""
    tmp = tmp_path_factory.mktemp("sft")
    train(compose_cfg(tmp, "stage=sft", "trainer.max_steps=4", "trainer.val_check_interval=4"))
    return tmp / "run" / "model"


STAGES = {
    "sft": (["stage=sft"], "tokens"),
    "dpo with RPO": (
        ["stage=dpo", "stage.module.rpo_alpha=1.0", "stage.module.precompute_ref_logps=false"],
        "chosen_tokens",
    ),
    "reward model": (["stage=reward", "world.practice_preference_entities=0"], "pairs"),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_k_micro_batches_give_the_gradient_of_one_k_times_batch(tmp_path, init_dir, stage):
    overrides, uneven = STAGES[stage]
    if stage != "sft":
        overrides = [*overrides, f"stage.init_from={init_dir}"]
    micro = first_step(tmp_path / "micro", *overrides, accumulate=K, batch_size=B)
    big = first_step(tmp_path / "big", *overrides, accumulate=1, batch_size=K * B)
    # the same K x B examples, split three ways; the normalising counts differ between micro-batches (pairs do
    # not, but the reward model's step is checked all the same)
    assert len(micro.counts) == K and len(big.counts) == 1
    assert sum(c[uneven] for c in micro.counts) == big.counts[0][uneven]
    if uneven != "pairs":
        assert len({c[uneven] for c in micro.counts}) > 1, micro.counts
    assert micro.grads.keys() == big.grads.keys() and len(big.grads) > 10
    for name, grad in big.grads.items():
        torch.testing.assert_close(micro.grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
