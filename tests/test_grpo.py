"""stage=grpo: the GRPO maths worked by hand (group advantages, the clipped objective, k3, the aggregations), the stage
samples groups and keeps the reference frozen and out of the optimizer and the checkpoint, and the toy reward rises."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from neuraflux.alignment.grpo import aggregate_tokens, group_advantages, grpo_loss
from neuraflux.alignment.stats import masked_mean
from neuraflux.data.prompts import encode_prompts, world_prompt_texts
from neuraflux.data.splits import prompt_key
from neuraflux.feedback.measure import held_out_prompts, render
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.grpo import NanoGRPO
from neuraflux.stages.multitask import NanoMultiTaskRL
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.train import train
from neuraflux.world import WorldConfig, generate_world, rl_prompts
from tests.conftest import compose_cfg
from tests.test_held_out import trained_prompts
from tests.test_multitask import COMPONENT_TAGS, multitask_cfg
from tests.test_ppo_stage import scalars
from tests.test_rollout import SMALL_WORLD, token_share

GRPO_TAGS = (
    "train/loss",
    "policy/loss",
    "policy/kl",
    "policy/clipfrac",
    "train/grad_norm",
    "rollout/kl",
    "rollout/response_length",
    "group/reward_std",
    "group/zero_std",
    "objective/reward",
    "objective/kl",
    "objective/kl_coef",
    "time/rollout_s",
    "time/learn_s",
    "train/lr",
    "val/reward",
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the maths, by hand ----------
def test_group_advantages_by_hand():
    # group [1, 3]: mean 2, std (Bessel) sqrt(((1 - 2)^2 + (3 - 2)^2) / (2 - 1)) = sqrt(2) -> [-1, 1] / (sqrt(2) + eps)
    # group [5, 5]: mean 5, std 0 -> [0, 0] / (0 + eps) = [0, 0]: equal rewards teach nothing
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2)
    s = 1 / (math.sqrt(2) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-s, s, 0.0, 0.0]))
    # group [0, 0, 3]: mean 1, centred [-1, -1, 2], std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    adv = group_advantages(torch.tensor([0.0, 0.0, 3.0]), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, -1.0, 2.0]) / (math.sqrt(3) + 1e-4))
    # Dr. GRPO (scale_rewards=False): centred only, [-1, -1, 2]; either way a group sums to 0
    dr = group_advantages(torch.tensor([0.0, 0.0, 3.0]), group_size=3, scale_rewards=False)
    torch.testing.assert_close(dr, torch.tensor([-1.0, -1.0, 2.0]))


def test_a_group_of_one_is_refused():
    # one sample is its own mean: advantage 0 whatever it scored, and its Bessel std is 0 / 0
    with pytest.raises(ValueError, match="group_size must be an integer >= 2, got 1"):
        group_advantages(torch.tensor([1.0, 2.0]), group_size=1)
    with pytest.raises(ValueError, match=r"\(N \* group_size,\) values with group_size=2, got shape \(3,\)"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), group_size=2)


def lengths_mask(*lengths: int, T: int = 4) -> torch.Tensor:
    """(B, T) bool: row i's first lengths[i] columns are response tokens."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def test_at_ratio_one_and_policy_equal_to_reference_the_loss_is_minus_the_mean_advantage():
    torch.manual_seed(0)
    logp = torch.randn(2, 4).clamp_max(-0.1)
    mask = lengths_mask(2, 4)
    adv = torch.tensor([0.5, -1.5])
    out = grpo_loss(logp, logp, logp, adv, mask, clip_eps=0.2, beta=0.04)
    # ratio 1 everywhere and k3 = 0: each token's loss is -A_i; the per-response mean is -A_i, their mean
    # -(0.5 - 1.5) / 2 = 0.5 = -mean(A)
    assert out.loss.item() == pytest.approx(0.5, abs=1e-6)
    assert out.policy_loss.item() == pytest.approx(0.5, abs=1e-6)
    assert out.kl.item() == 0.0 and out.clipfrac.item() == 0.0


@pytest.mark.parametrize(
    ("advantage", "ratio", "clipped"),
    [
        # A > 0: the objective stops rewarding a ratio above 1 + eps = 1.2, below 1 - eps it keeps the gradient
        (1.0, 1.2 - 1e-3, False),
        (1.0, 1.2 + 1e-3, True),
        (1.0, 0.8 - 1e-3, False),
        # A < 0: the objective stops penalising a ratio below 1 - eps = 0.8, above 1 + eps it keeps the gradient
        (-1.0, 0.8 + 1e-3, False),
        (-1.0, 0.8 - 1e-3, True),
        (-1.0, 1.2 + 1e-3, False),
    ],
)
def test_clipping_starts_exactly_at_one_plus_or_minus_eps(advantage, ratio, clipped):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    out = grpo_loss(logp, old, logp.detach(), torch.tensor([advantage]), torch.ones(1, 1, dtype=torch.bool), 0.2, 0.0)
    out.loss.backward()
    # loss = -A r unclipped (d/dlogp = -A r), constant -A (1 +- eps) clipped (d/dlogp = 0)
    assert out.clipfrac.item() == float(clipped)
    expected_grad = 0.0 if clipped else -advantage * ratio
    assert logp.grad.item() == pytest.approx(expected_grad, abs=1e-5)
    assert out.loss.item() == pytest.approx(-advantage * (1.2 if ratio > 1 else 0.8) if clipped else -advantage * ratio)


def test_k3_is_zero_at_the_reference_and_weighted_by_beta():
    mask = torch.ones(1, 2, dtype=torch.bool)
    ref = torch.tensor([[math.log(0.5), -1.0]])
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)  # token 0: p = 1 against q = 0.5; token 1: equal
    out = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), mask, clip_eps=0.2, beta=0.5)
    # k3 = exp(ref - logp) - (ref - logp) - 1: token 0: 0.5 + ln 2 - 1 = 0.19315; token 1: 1 - 0 - 1 = 0
    k3 = 0.5 + math.log(2) - 1
    assert out.kl.item() == pytest.approx(k3 / 2, abs=1e-6)  # masked mean over the 2 tokens
    # A = 0: the loss is beta * mean over the response's tokens of k3 = 0.5 * k3 / 2
    assert out.loss.item() == pytest.approx(0.5 * k3 / 2, abs=1e-6)
    out.loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): token 0: 1 - 0.5 = 0.5 (times beta / 2 = 0.25), token 1: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.125, 0.0]]))


def test_dr_grpo_aggregation_differs_from_the_per_response_mean_by_the_computed_amount():
    # two responses of 1 and 3 tokens (T = 4 = max_tokens), A = [1, -1], ratio 1, policy = reference:
    # each token's loss is -A_i
    mask = lengths_mask(1, 3)
    per_token = torch.tensor([[-1.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 9.0]])  # 9s sit on padding
    # grpo: (1/2) (-1/1 + 3/3) = 0                   each response weighs the same
    # dr_grpo: (-1 + 3) / (2 responses * 4 tokens) = 0.25   each token weighs the same, a constant divisor
    # dapo: (-1 + 3) / (1 + 3 tokens) = 0.5          each token weighs the same within the batch
    assert aggregate_tokens(per_token, mask, "grpo").item() == pytest.approx(0.0)
    assert aggregate_tokens(per_token, mask, "dr_grpo", max_tokens=4).item() == pytest.approx(0.25)
    assert aggregate_tokens(per_token, mask, "dapo").item() == pytest.approx(0.5)
    # the same through the loss, and its gradient per token: -A_i / (2 * |o_i|) under grpo, -A_i / (2 * 4) under
    # dr_grpo, so the long wrong answer's tokens are pushed down 1/8 each instead of 1/6 and the short right
    # one's up 1/8 instead of 1/2: the length bias Dr. GRPO removes
    logp0 = torch.full((2, 4), -1.0)
    for how, loss, row0, row1 in (("grpo", 0.0, -1 / 2, 1 / 6), ("dr_grpo", 0.25, -1 / 8, 1 / 8)):
        logp = logp0.clone().requires_grad_()
        out = grpo_loss(logp, logp0, logp0, torch.tensor([1.0, -1.0]), mask, 0.2, 0.04, how, max_tokens=4)
        assert out.loss.item() == pytest.approx(loss, abs=1e-6)
        out.loss.backward()
        expected = torch.tensor([[row0, 0.0, 0.0, 0.0], [row1, row1, row1, 0.0]])
        torch.testing.assert_close(logp.grad, expected)
    with pytest.raises(ValueError, match="dr_grpo aggregation divides by max_tokens"):
        aggregate_tokens(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="loss aggregation must be one of"):
        aggregate_tokens(per_token, mask, "sequence")


# ---- the stage ----------
@pytest.fixture
def stage():
    tok = NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")
    torch.manual_seed(0)
    model = NanoLM(NanoConfig(vocab_size=80, n_layer=2, n_head=2, n_embd=32, block_size=64))
    module = NanoGRPO(
        model,
        tok,
        OptimizerFactory(),
        group_size=3,
        max_new_tokens=8,
        beta=0.5,
        reward_fn=lambda r: token_share(r, tok.token_to_id("e")),
    )
    return module, tok


def test_groups_of_samples_zero_sum_advantages_and_the_first_update_at_ratio_one(stage):
    module, tok = stage
    batch = encode_prompts(tok, world_prompt_texts(SMALL_WORLD)[:4], max_prompt_tokens=48)
    with torch.no_grad():  # perturb the policy so the KL to the reference is not 0
        module.model.lm_head.weight.add_(0.1 * torch.randn_like(module.model.lm_head.weight))
    rollout = module.make_rollout(batch)
    assert len(rollout) == 12 and rollout.prompts == [t for t in batch.texts for _ in range(3)]
    adv = module.advantages(rollout)
    torch.testing.assert_close(adv.view(4, 3).sum(1), torch.zeros(4), atol=1e-5, rtol=0)
    g = rollout.scores[:3]  # the reward alone: the KL is in the loss, not the advantage
    assert adv[0].item() == pytest.approx(((g[0] - g.mean()) / (g.std() + 1e-4)).item(), abs=1e-5)
    out = module.grpo_loss(rollout, adv)
    # nothing updated yet: ratio 1, nothing clipped; the surrogate is -mean(A) = 0 (zero-sum groups) and the loss
    # is beta times the per-response mean of the rollout's own k3
    assert out.metrics["policy/clipfrac"].item() == 0.0
    assert out.metrics["policy/loss"].item() == pytest.approx(0.0, abs=1e-5)
    kl = masked_mean(rollout.kl, rollout.response_mask, dim=-1).mean()
    assert kl > 0 and out.loss.item() == pytest.approx(0.5 * kl.item(), rel=1e-4)
    out.loss.backward()
    assert module.model.lm_head.weight.grad is not None
    assert all(p.grad is None for p in module.frozen.reference.parameters())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"group_size": 1}, r"stage.module.group_size must be an integer >= 2, got 1: a group of one"),
        ({"loss_aggregation": "token"}, r"stage.module.loss_aggregation must be one of \['grpo', 'dr_grpo', 'dapo'\]"),
        ({"beta": -0.1}, "beta >= 0"),
        ({"mini_batch_size": 0}, "mini_batch_size"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_key(settings, message):
    tok = NanoTokenizer.train(["abc"], vocab_size=0, mode="char")
    model = NanoLM(NanoConfig(vocab_size=16, n_layer=1, n_head=1, n_embd=8, block_size=16))
    with pytest.raises(ValueError, match=message):
        NanoGRPO(model, tok, OptimizerFactory(), reward_fn=lambda r: r.scores, **settings)


def grpo_cfg(compose, tmp_path, *overrides: str):
    """`stage=grpo` as `tests.test_rollout.toy_reward_cfg` builds the others: a 75-symbol char tokenizer, 8-token
    rollouts, rewarded by the share of "a" tokens, no KL term."""
    tok = NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")
    path = tok.save(tmp_path / "char_tokenizer.json")
    cfg = compose(
        "stage=grpo",
        "tokenizer=char",
        f"tokenizer.path={path}",
        "model.vocab_size=80",
        "model.position_encoding=learned",
        "stage.module.max_new_tokens=8",
        "stage.module.beta=0.0",
        *overrides,
    )
    cfg.stage.module.reward_fn = OmegaConf.create(
        {"_target_": "tests.test_rollout.token_share", "_partial_": True, "token_id": tok.token_to_id("a")}
    )
    return cfg


def test_grpo_run_logs_and_keeps_the_reference_out_of_optimizer_and_checkpoint(tiny_cfg, tmp_path):
    cfg = grpo_cfg(
        tiny_cfg,
        tmp_path,
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "data.batch_size=4",
        "stage.module.group_size=2",
        "stage.module.mini_batch_size=4",  # 8 rows: two updates a step, the second one off-policy
        "stage.module.beta=0.1",
    )
    metrics, objects = train(cfg)
    module, run = objects["module"], objects["run_dir"]
    tags = scalars(run)
    for tag in GRPO_TAGS:
        assert tag in tags, tag
    assert metrics["global_step"] == 3 and len(tags["objective/reward"]) == 3  # one step per rollout batch
    assert tags["objective/kl_coef"] == [pytest.approx(0.1)] * 3
    reference = module.frozen.reference
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    # no init_from: the reference is the random initial policy, untouched by 6 updates
    torch.manual_seed(1337)  # train() seeds 1337 before building the model
    initial = NanoLM(reference.config)
    for (name, p), q in zip(reference.named_parameters(), initial.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert not torch.equal(module.model.lm_head.weight, reference.lm_head.weight)  # the policy did move
    in_optimizer = {id(p) for g in module.optimizers().optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in reference.parameters()}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith("model.") for k in ckpt["state_dict"]), sorted(ckpt["state_dict"])
    assert ckpt["neuraflux"]["algorithm"] == "grpo" and ckpt["neuraflux"]["kl_coef"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "variant",
    [
        # at seed 1337 the share of "a" tokens rises by more than 0.8 in 12 steps (asserted below); at some seeds a
        # group rarely holds an "a", and a group of equal rewards teaches nothing
        [],
        # Dr. GRPO, same assertion
        ["stage.module.scale_rewards=false", "stage.module.loss_aggregation=dr_grpo"],
    ],
    ids=["grpo", "dr_grpo"],
)
def test_grpo_raises_the_toy_reward(tiny_cfg, tmp_path, variant):
    cfg = grpo_cfg(
        tiny_cfg,
        tmp_path,
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        "data.batch_size=8",
        "stage.module.group_size=4",
        "optim.lr=3e-2",
        *variant,
    )
    _, objects = train(cfg)
    reward = scalars(objects["run_dir"])["objective/reward"]
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    assert first < 0.1 and last > first + 0.8, reward


def test_resume_without_init_from_or_into_another_algorithm_is_refused(stage, tmp_path):
    module, tok = stage
    with pytest.raises(ValueError, match="resuming stage grpo needs stage.init_from"):
        module.on_load_checkpoint({"neuraflux": {}})
    module.model.save_pretrained(tmp_path / "policy")
    tok.save(tmp_path / "policy" / "tokenizer.json")
    resumed = NanoGRPO(module.model, tok, OptimizerFactory(), reference_path=str(tmp_path / "policy"),
                       reward_fn=module.reward_fn)  # fmt: skip
    with pytest.raises(ValueError, match=r"trained with reinforce, not grpo"):
        resumed.on_load_checkpoint({"neuraflux": {"algorithm": "reinforce"}})


def test_multitask_hands_its_composite_reward_to_grpo(tiny_cfg, tmp_path):
    cfg = multitask_cfg(
        tiny_cfg,
        tmp_path,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "stage.module.algorithm=grpo",
        "stage.module.grpo.group_size=2",
        "stage.module.grpo.beta=0.1",
        "stage.module.combine=lagrangian",
    )
    metrics, objects = train(cfg)
    module, tags = objects["module"], scalars(objects["run_dir"])
    assert isinstance(module, NanoGRPO) and module.group_size == 2 and module.kl_ctl.value == 0.1
    for tag in (*COMPONENT_TAGS, "objective/reward", "lagrange/harmlessness", "group/reward_std", "val/honesty"):
        assert tag in tags, tag
    ckpt = torch.load(objects["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["neuraflux"]["algorithm"] == "grpo" and set(ckpt["neuraflux"]["multipliers"]) == {"harmlessness"}
    assert all(k.startswith(("model.", "reward_fn.moments.")) for k in ckpt["state_dict"])
    assert metrics["global_step"] == 2


def test_multitask_grpo_refuses_the_shared_kl_settings():
    tok = NanoTokenizer.train(["abc"], vocab_size=0, mode="char")
    model = NanoLM(NanoConfig(vocab_size=16, n_layer=1, n_head=1, n_embd=8, block_size=16))
    with pytest.raises(ValueError, match=r"kl_coef does not apply to algorithm=grpo: .*grpo\.beta"):
        NanoMultiTaskRL(model, tok, OptimizerFactory(), algorithm="grpo", world=SMALL_WORLD, kl_coef=0.3)


def test_grpo_never_trains_on_a_prompt_the_report_measures(tmp_path):
    # stage=grpo is not in curriculum=full (which tests/test_held_out.py composes), so its prompts are checked here
    cfg = compose_cfg(tmp_path, "curriculum=none", "stage=grpo", tiny=False)
    world = generate_world(WorldConfig.from_dict(OmegaConf.to_container(cfg.world, resolve=True)))
    measured = {
        prompt_key(render(p)) for p in held_out_prompts(world, val_fraction=cfg.held_out_fraction, seed=cfg.seed)
    }
    tokenizer = NanoTokenizer.train([render(p) for p in rl_prompts(world)], vocab_size=0, mode="char")
    trained = {prompt_key(p) for p in trained_prompts(cfg, tokenizer)}
    assert measured and trained and not measured & trained


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_steps=2", "trainer.val_check_interval=2", f"paths.run_dir={tmp_path / 'pre'}"))
    common = [
        "stage=grpo", f"stage.init_from={tmp_path / 'pre' / 'model'}", "trainer.val_check_interval=2",
        "stage.module.max_new_tokens=8", "stage.module.group_size=2", "stage.module.mini_batch_size=4",
        "optim.total_steps=4", "data.batch_size=4",
    ]  # fmt: skip
    _, straight = train(tiny_cfg(*common, "trainer.max_steps=4", f"paths.run_dir={tmp_path / 'a'}"))
    train(tiny_cfg(*common, "trainer.max_steps=2", f"paths.run_dir={tmp_path / 'b'}"))
    _, resumed = train(
        tiny_cfg(*common, "trainer.max_steps=4", f"resume={tmp_path / 'b'}", f"paths.run_dir={tmp_path / 'c'}")
    )
    assert resumed["trainer"].global_step == 4
    # sampling RNG, data position, optimizer and scheduler continue where they stopped; the reference is rebuilt
    for (name, a), (_, b) in zip(straight["module"].named_parameters(), resumed["module"].named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
