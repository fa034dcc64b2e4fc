import math

import pytest
import torch

from neuraflux.model import NanoConfig, NanoLM
from neuraflux.optim import OptimizerFactory, warmup_cosine


def test_schedule_by_hand():
    # warmup 4: (step+1)/4 -> 0.25, 0.5, 0.75, 1.0 ; then cosine over 10 - 4 = 6 steps to 0.1
    assert [warmup_cosine(s, 4, 10, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # step 7: progress 3/6 = 0.5, cos(pi/2) = 0 -> 0.1 + 0.9 * 0.5 = 0.55
    assert warmup_cosine(7, 4, 10, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(10, 4, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(50, 4, 10, 0.1) == pytest.approx(0.1)


def test_decay_groups_skip_biases_and_norms_and_count_tied_weight_once():
    m = NanoLM(NanoConfig(vocab_size=50, block_size=8, max_position_embeddings=8, n_layer=1, n_head=1, n_embd=8))
    decay, no_decay = OptimizerFactory(weight_decay=0.1).param_groups(m.named_parameters())
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for p in decay["params"]) + sum(p.numel() for p in no_decay["params"])
    assert n == m.num_parameters()


def test_scheduler_drives_lr():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt, sched = OptimizerFactory(lr=1.0, warmup_steps=2, min_lr_ratio=0.0)([("w", p)], total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 0.5, 1.0, then cosine over 2 steps: progress 0 -> 1.0, progress 0.5 -> 0.5
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert math.isclose(OptimizerFactory(total_steps=8).total_steps, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1e-3), "optim.lr must be > 0"),
        (dict(betas=(0.9, 1.5)), "optim.betas must be two values in [0, 1)"),
        (dict(schedule="linear"), "optim.schedule must be one of ['cosine', 'constant']"),
        (dict(weight_decay=-0.1), "optim.weight_decay must be >= 0"),
    ],
)
def test_bad_optimizer_settings(kwargs, message):
    with pytest.raises(ValueError) as err:
        OptimizerFactory(**kwargs)
    assert message in str(err.value)
