"""stage=ppo: the first PPO pass has ratio 1, the toy reward goes up, the frozen reference stays frozen and
out of the optimizer and the checkpoint, and a reward-model source without a path fails before training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from neuraflux.data.prompts import encode_prompts, world_prompt_texts
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.ppo import NanoPPO
from neuraflux.train import train
from tests.test_rollout import SMALL_WORLD, token_share, toy_reward_cfg

PPO_TAGS = (
    "objective/kl",
    "objective/entropy",
    "objective/reward",
    "objective/kl_coef",
    "policy/clipfrac",
    "policy/approx_kl",
    "value/clipfrac",
    "value/loss",
    "time/rollout_s",
    "time/learn_s",
    "rollout/response_length",
    "train/grad_norm",
    "train/lr",
    "val/reward",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(run_dir) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_first_ppo_epoch_has_ratio_one():
    from neuraflux.tokenizer import NanoTokenizer

    tok = NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")
    torch.manual_seed(0)
    model = NanoLM(NanoConfig(vocab_size=80, n_layer=2, n_head=2, n_embd=32, block_size=64))
    ppo = NanoPPO(
        model,
        tok,
        OptimizerFactory(),
        max_new_tokens=8,
        reward_fn=lambda r: token_share(r, tok.token_to_id("e")),
    )
    batch = encode_prompts(tok, world_prompt_texts(SMALL_WORLD)[:6], max_prompt_tokens=48)
    rollout = ppo.make_rollout(batch)
    adv, returns = ppo.advantages(rollout)
    out = ppo.ppo_loss(rollout, adv, returns)
    # nothing has been updated: new log-probs equal the rollout's, so ratio = 1 everywhere
    assert out.metrics["policy/clipfrac"].item() == 0.0
    assert out.metrics["policy/approx_kl"].item() < 1e-10
    assert out.metrics["value/clipfrac"].item() == 0.0
    # at ratio 1 the clipped surrogate is -mean(A); whitened advantages have mean 0
    assert out.metrics["policy/loss"].item() == pytest.approx(0.0, abs=1e-5)
    # values start at 0 (zero-initialised head), so value loss = 0.5 mean(returns^2)
    mask = rollout.response_mask
    assert out.metrics["value/loss"].item() == pytest.approx(0.5 * returns[mask].square().mean().item(), rel=1e-5)


def test_ppo_run_logs_keeps_the_reference_frozen_and_out_of_optimizer_and_checkpoint(tiny_cfg, tmp_path):
    cfg, _ = toy_reward_cfg(
        tiny_cfg,
        tmp_path,
        "ppo",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "stage.module.kl_controller=adaptive",
        "stage.module.kl_coef=0.2",
        "stage.module.kl_target=0.01",
        "stage.module.kl_horizon=100",
    )
    metrics, objects = train(cfg)
    module, run = objects["module"], objects["run_dir"]
    tags = scalars(run)
    for tag in PPO_TAGS:
        assert tag in tags, tag
    assert len(tags["objective/reward"]) == 4 and metrics["global_step"] == 4  # one step per rollout batch
    # adaptive controller: each step moves beta by at most 20% * batch / horizon = 0.2 * 8 / 100
    coefs = tags["objective/kl_coef"]
    assert coefs[0] == pytest.approx(0.2) and coefs[1] != pytest.approx(coefs[0], abs=1e-9)
    assert all(abs(b / a - 1) <= 0.016 + 1e-6 for a, b in zip(coefs, coefs[1:]))

    reference = module.frozen.reference
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    # toy_reward_cfg has no init_from: the reference is the random initial policy, untouched by 4 updates
    torch.manual_seed(1337)  # train() seeds 1337 before building the model
    initial = NanoLM(reference.config)
    for (name, p), q in zip(reference.named_parameters(), initial.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert not torch.equal(module.model.lm_head.weight, reference.lm_head.weight)  # the policy did move

    optimizer = module.optimizers().optimizer
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in reference.parameters()}
    assert id(module.value_head.weight) in in_optimizer

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert {"value_head.weight", "value_head.bias"} <= keys
    assert all(k.startswith(("model.", "value_head.")) for k in keys), sorted(keys)
    # the coefficient after the checkpoint's step: logged at the next step, or the final one. (Lightning 2.6 writes
    # last.ckpt only at validations that also write a best checkpoint, so it need not be the final step.)
    step = ckpt["global_step"]
    after = coefs[step] if step < len(coefs) else module.kl_ctl.value
    assert ckpt["neuraflux"]["kl_coef"] == pytest.approx(after)
    # the exported LM is the policy alone: no value head
    exported = load_file(str(run / "model" / "model.safetensors"))
    assert not any("value_head" in k for k in exported)
    assert set(exported) == {k for k in module.model.state_dict() if k != "lm_head.weight"}


def test_ppo_raises_the_toy_reward(tiny_cfg, tmp_path):
    cfg, _ = toy_reward_cfg(
        tiny_cfg,
        tmp_path,
        "ppo",
        "trainer.max_steps=16",
        "trainer.val_check_interval=16",
        "data.batch_size=16",
        "optim.lr=1e-2",
        "stage.module.ppo_epochs=2",
    )
    _, objects = train(cfg)
    reward = scalars(objects["run_dir"])["objective/reward"]
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    # seed 1337: about 0.03 -> 0.91 of response tokens are "a" over 16 steps (seeds 1 and 2 reach 0.90 and 0.84);
    # 12 steps reached only 0.41 once the prefill was causal and the held-out split shared
    assert first < 0.1 and last > first + 0.6, reward


def test_reward_model_source_without_path_fails_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="stage.reward_model must name a reward model directory"):
        train(tiny_cfg("stage=ppo", "stage.module.reward_source=reward_model"))
    assert not (tmp_path / "run").exists()  # nothing was written


def test_resume_without_init_from_is_refused():
    from neuraflux.tokenizer import NanoTokenizer

    tok = NanoTokenizer.train(["abc"], vocab_size=0, mode="char")
    model = NanoLM(NanoConfig(vocab_size=16, n_layer=1, n_head=1, n_embd=8, block_size=16))
    ppo = NanoPPO(model, tok, OptimizerFactory(), reward_fn=lambda r: r.response_lengths.float())
    with pytest.raises(ValueError, match="resuming stage ppo needs stage.init_from"):
        ppo.on_load_checkpoint({"neuraflux": {}})
    with pytest.raises(ValueError, match="stage.module.ppo_epochs"):
        NanoPPO(model, tok, OptimizerFactory(), ppo_epochs=0, reward_fn=lambda r: r.scores)


def test_reward_model_is_frozen_and_out_of_the_stage_state(tmp_path):
    from neuraflux.model.reward import NanoRewardModel
    from neuraflux.tokenizer import NanoTokenizer

    tok = NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")
    config = NanoConfig(vocab_size=80, n_layer=1, n_head=2, n_embd=16, block_size=64)
    NanoRewardModel.from_lm(NanoLM(config)).save_pretrained(tmp_path / "rm")
    tok.save(tmp_path / "rm" / "tokenizer.json")
    ppo = NanoPPO(NanoLM(config), tok, OptimizerFactory(), reward_source="both", world=SMALL_WORLD,
                  reward_model_path=str(tmp_path / "rm"))  # fmt: skip
    rm = ppo.frozen.reward_model
    assert isinstance(rm, NanoRewardModel) and not rm.training
    assert not any(p.requires_grad for p in rm.parameters())
    frozen_ids = {id(p) for m in ppo.frozen.modules() for p in m.parameters()}
    assert not frozen_ids & {id(p) for p in ppo.parameters()}  # so configure_optimizers never sees them
    # the policy, the value head and the judges + reward model composite's running moments
    assert all(k.startswith(("model.", "value_head.", "reward_fn.moments.")) for k in ppo.state_dict())


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_steps=2", "trainer.val_check_interval=2", f"paths.run_dir={tmp_path / 'pre'}"))
    common = [
        "stage=ppo", f"stage.init_from={tmp_path / 'pre' / 'model'}", "trainer.val_check_interval=2",
        "stage.module.max_new_tokens=8", "optim.total_steps=4", "data.batch_size=4",
    ]  # fmt: skip
    _, straight = train(tiny_cfg(*common, "trainer.max_steps=4", f"paths.run_dir={tmp_path / 'a'}"))
    train(tiny_cfg(*common, "trainer.max_steps=2", f"paths.run_dir={tmp_path / 'b'}"))
    _, resumed = train(
        tiny_cfg(*common, "trainer.max_steps=4", f"resume={tmp_path / 'b'}", f"paths.run_dir={tmp_path / 'c'}")
    )
    assert resumed["trainer"].global_step == 4
    # sampling RNG, data position, optimizer, scheduler and the KL coefficient all continue where they stopped
    for (name, a), (_, b) in zip(straight["module"].named_parameters(), resumed["module"].named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert resumed["module"].kl_ctl.value == straight["module"].kl_ctl.value
