"""stage=reinforce: k samples per prompt, zero-sum leave-one-out advantages, KL shaping, reward goes up."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from neuraflux.alignment.stats import masked_mean
from neuraflux.data.prompts import encode_prompts, world_prompt_texts
from neuraflux.feedback.rollout import sequence_kl
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.reinforce import NanoREINFORCE
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.train import train
from tests.test_ppo_stage import scalars
from tests.test_rollout import SMALL_WORLD, token_share, toy_reward_cfg

REINFORCE_TAGS = (
    "objective/kl",
    "objective/entropy",
    "objective/reward",
    "objective/kl_coef",
    "time/rollout_s",
    "time/learn_s",
    "rollout/response_length",
    "train/loss",
    "train/grad_norm",
    "train/lr",
    "val/reward",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stage():
    tok = NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")
    torch.manual_seed(0)
    model = NanoLM(NanoConfig(vocab_size=80, n_layer=2, n_head=2, n_embd=32, block_size=64))
    module = NanoREINFORCE(
        model,
        tok,
        OptimizerFactory(),
        k=3,
        max_new_tokens=8,
        kl_coef=0.5,
        reward_fn=lambda r: token_share(r, tok.token_to_id("e")),
    )
    return module, tok


def test_k_samples_per_prompt_and_zero_sum_advantages(stage):
    module, tok = stage
    batch = encode_prompts(tok, world_prompt_texts(SMALL_WORLD)[:4], max_prompt_tokens=48)
    with torch.no_grad():  # perturb the policy so the KL to the reference is not 0 and shaping shows
        module.model.lm_head.weight.add_(0.1 * torch.randn_like(module.model.lm_head.weight))
    rollout = module.make_rollout(batch)
    assert len(rollout) == 12 and rollout.prompts == [t for t in batch.texts for _ in range(3)]
    adv = module.advantages(rollout)
    assert adv.shape == (12,)
    torch.testing.assert_close(adv.view(4, 3).sum(1), torch.zeros(4), atol=1e-5, rtol=0)
    # the KL is reward shaping: sample 0's advantage by hand from the shaped rewards of its group
    shaped = rollout.scores - 0.5 * sequence_kl(rollout)
    assert sequence_kl(rollout).abs().sum() > 0
    assert adv[0].item() == pytest.approx((shaped[0] - (shaped[1] + shaped[2]) / 2).item(), abs=1e-6)
    # the loss is -mean(A * log pi(y|x)): its gradient reaches the policy only
    out = module.reinforce_loss(rollout, adv)
    out.loss.backward()
    assert module.model.lm_head.weight.grad is not None
    assert all(p.grad is None for p in module.frozen.reference.parameters())


def test_k_below_two_is_rejected(stage):
    module, tok = stage
    with pytest.raises(ValueError, match="stage.module.k must be an integer >= 2"):
        NanoREINFORCE(module.model, tok, OptimizerFactory(), k=1, reward_fn=module.reward_fn)


def test_reinforce_run_logs_and_keeps_the_reference_out_of_optimizer_and_checkpoint(tiny_cfg, tmp_path):
    cfg, _ = toy_reward_cfg(
        tiny_cfg,
        tmp_path,
        "reinforce",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "data.batch_size=4",
        "stage.module.k=2",
    )
    metrics, objects = train(cfg)
    module, run = objects["module"], objects["run_dir"]
    tags = scalars(run)
    for tag in REINFORCE_TAGS:
        assert tag in tags, tag
    assert metrics["global_step"] == 3
    reference = module.frozen.reference
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    in_optimizer = {id(p) for g in module.optimizers().optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in reference.parameters()}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith("model.") for k in ckpt["state_dict"]), sorted(ckpt["state_dict"])


def test_reinforce_raises_the_toy_reward(tiny_cfg, tmp_path):
    cfg, _ = toy_reward_cfg(
        tiny_cfg,
        tmp_path,
        "reinforce",
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        "data.batch_size=8",
        "stage.module.k=4",
        "optim.lr=3e-2",
    )
    _, objects = train(cfg)
    reward = scalars(objects["run_dir"])["objective/reward"]
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    # seed 1337: about 0.004 -> 0.93 of response tokens are "a" (seeds 1 and 2 reach 0.92 and 0.68)
    assert first < 0.1 and last > first + 0.4, reward


def test_reward_model_source_without_path_fails_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="stage.reward_model must name a reward model directory"):
        train(tiny_cfg("stage=reinforce", "stage.module.reward_source=both"))
    assert not (tmp_path / "run").exists()


def mean_token_id(rollout) -> torch.Tensor:
    """A dense toy reward (every response scores differently): the mean id of its tokens."""
    R = rollout.response_ids.shape[1]
    return masked_mean(rollout.response_ids.float(), rollout.response_mask[:, -R:], dim=-1)


class GradNorms(pl.Callback):
    """The gradient norm each optimizer step used: read when the next step zeroes them (after clipping)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.parametrize("max_grad_norm", [None, 0.01])
def test_max_grad_norm_clips_here_and_refuses_the_trainers_clipping(tiny_cfg, tmp_path, max_grad_norm):
    overrides = ["trainer.max_steps=3", "data.batch_size=4", "stage.module.k=2", "trainer.gradient_clip_val=null"]
    cfg, _ = toy_reward_cfg(
        tiny_cfg, tmp_path, "reinforce", *overrides, f"stage.module.max_grad_norm={max_grad_norm or 'null'}"
    )
    with open_dict(cfg):
        cfg.callbacks.grad_norms = {"_target_": "tests.test_reinforce_stage.GradNorms"}
        cfg.stage.module.reward_fn = {"_target_": "tests.test_reinforce_stage.mean_token_id", "_partial_": True}
    _, objects = train(cfg)
    recorder = next(c for c in objects["trainer"].callbacks if isinstance(c, GradNorms))
    assert len(recorder.norms) == 2  # steps 0 and 1, read when steps 1 and 2 zero them
    if max_grad_norm is None:  # unclipped, the toy's gradients are far above the bound below: the check can fail
        assert min(recorder.norms) > 0.1, recorder.norms
    else:
        assert max(recorder.norms) <= max_grad_norm * (1 + 1e-4), recorder.norms
    refused = ("stage.module.max_grad_norm=1.0", f"paths.run_dir={tmp_path / 'refused'}")
    cfg, _ = toy_reward_cfg(tiny_cfg, tmp_path, "reinforce", *refused)
    with pytest.raises(ValueError, match=r"clips with stage.module.max_grad_norm=1.0; leave trainer.gradient_clip_val"):
        train(cfg)
