"""stage=multitask: the composite's arithmetic by hand, the components on scripted rollouts and world prompts,
logged components that add up, Lagrange multipliers that follow dual ascent and live in the checkpoint, both
algorithms end to end, and bad settings rejected before any training."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from neuraflux.alignment.combine import combine_weighted, dual_ascent_step, lagrangian, length_score
from neuraflux.chat import Message, render_prompt
from neuraflux.data.prompts import encode_prompts, world_prompt_texts
from neuraflux.feedback.rewards import (
    CompositeReward,
    FormatReward,
    LengthReward,
    make_composite,
    repeats_ngram,
)
from neuraflux.feedback.rollout import generate_rollouts
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.model.reward import NanoRewardModel
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.multitask import NanoMultiTaskRL
from neuraflux.stages.ppo import NanoPPO
from neuraflux.stages.reinforce import NanoREINFORCE
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.train import train
from neuraflux.world import WorldConfig, generate_world, judge, red_team_prompts
from tests.test_ppo_stage import scalars
from tests.test_rollout import SMALL_WORLD, BigramLM

COMPONENT_TAGS = tuple(f"reward/{c}" for c in ("helpfulness", "harmlessness", "honesty", "length", "format"))


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the pure math ----------
def test_combine_weighted_by_hand():
    values = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 1.0]])  # (K=3, B=2)
    # row 0: 1*1 + 2*0.5 + 4*0 = 2; row 1: 1*0 + 2*1 + 4*1 = 6
    torch.testing.assert_close(combine_weighted(values, torch.tensor([1.0, 2.0, 4.0])), torch.tensor([2.0, 6.0]))


def test_lagrangian_by_hand():
    objective = torch.tensor([1.0, 2.0])
    constrained = torch.tensor([[1.0, 0.5], [0.0, 1.0]])  # (J=2, B=2)
    # row 0: 1 + 2 (1 - 0.9) + 0.5 (0 - 0.5) = 0.95; row 1: 2 + 2 (0.5 - 0.9) + 0.5 (1 - 0.5) = 1.45
    out = lagrangian(objective, constrained, torch.tensor([2.0, 0.5]), torch.tensor([0.9, 0.5]))
    torch.testing.assert_close(out, torch.tensor([0.95, 1.45]))
    # zero multipliers: the Lagrangian is the objective itself
    torch.testing.assert_close(lagrangian(objective, constrained, torch.zeros(2), torch.ones(2)), objective)


def test_dual_ascent_over_steps_by_hand():
    lam, c = torch.tensor([0.0, 0.3]), torch.tensor([0.95, 0.5])
    steps = [
        # (means of the two constrained components, multipliers after the step), lr 2, cap 1.5
        ([0.70, 0.60], [0.50, 0.10]),  # 0 + 2 * 0.25; 0.3 + 2 * (-0.1)
        ([0.80, 0.60], [0.80, 0.00]),  # 0.5 + 2 * 0.15; 0.1 - 0.2 = -0.1 -> projected to 0
        ([1.00, 0.50], [0.70, 0.00]),  # 0.8 - 0.1; 0 + 0
        ([0.20, 0.00], [1.50, 1.00]),  # 0.7 + 1.5 = 2.2 -> capped at 1.5; 0 + 1
        ([1.00, 1.00], [1.40, 0.00]),  # 1.5 - 0.1; 1 - 1
    ]
    for means, expected in steps:
        lam = dual_ascent_step(lam, torch.tensor(means), c, lr=2.0, max_value=1.5)
        torch.testing.assert_close(lam, torch.tensor(expected))


def test_length_score_and_repeated_ngrams_by_hand():
    lengths, stopped = torch.tensor([2, 4, 6, 8, 3]), torch.tensor([True, True, True, True, False])
    # target 4, limit 8: up to 4 tokens 1, then 1 - (L - 4) / 4; a response cut off without stopping 0
    torch.testing.assert_close(length_score(lengths, stopped, 4, 8), torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))
    about = "Draelnom is a company. The headquarters of Draelnom is in Raerfaem. The product of Draelnom is barrels."
    assert repeats_ngram(about, 3) and not repeats_ngram(about, 5)  # "of draelnom is" twice, no 5-gram twice
    assert repeats_ngram("you fool you fool you fool", 4) and not repeats_ngram("", 2)


# ---- components on scripted rollouts ----------
@pytest.fixture(scope="module")
def scripted():
    """Greedy decoding follows a bigram table: "x" -> "y" then stop; "a" -> "bcd" then stop; "z" loops " z"."""
    tok = NanoTokenizer.train(["abcdxyz "], vocab_size=0, mode="char")
    i = {c: tok.token_to_id(c) for c in "abcdxyz "}
    table = {i["x"]: i["y"], i["y"]: tok.end_id, i["a"]: i["b"], i["b"]: i["c"], i["c"]: i["d"]}
    table.update({i["d"]: tok.end_id, i["z"]: i[" "], i[" "]: i["z"]})
    model = BigramLM(tok.vocab_size, table)
    rollout = generate_rollouts(model, tok, encode_prompts(tok, ["x", "a", "z"]), 12, temperature=0.0)
    assert rollout.responses == ["y", "bcd", " z z z z z z"]
    return tok, rollout


def test_length_and_format_components_on_a_scripted_rollout(scripted):
    tok, rollout = scripted
    stops = (tok.end_id, tok.eos_id)
    # content lengths 1, 3 (stopped) and 12 (cut off); target 2, limit 12: 1, 1 - 1/10, 0
    torch.testing.assert_close(LengthReward(stops, 2, 12)(rollout), torch.tensor([1.0, 0.9, 0.0]))
    # "z z z z z z" repeats the 5-gram "z z z z z" and never stops: 0; the others stop and repeat nothing: 1
    torch.testing.assert_close(FormatReward(stops, 5)(rollout), torch.tensor([1.0, 1.0, 0.0]))
    # with n = 7 nothing can repeat in 6 words: the loop loses only the stop-token half
    torch.testing.assert_close(FormatReward(stops, 7)(rollout), torch.tensor([1.0, 1.0, 0.5]))


def test_composite_keeps_every_component_and_updates_multipliers(scripted):
    _, rollout = scripted
    parts = {"a": lambda r: torch.tensor([1.0, 0.0, 0.5]), "b": lambda r: torch.tensor([0.5, 1.0, 0.0])}
    # each component standardised by its moments (this first rollout's): a and b have mean 0.5 and population
    # std sqrt(0.5 / 3) = 0.40825, so z_a = [1.2247, -1.2247, 0] and z_b = [0, 1.2247, -1.2247]; weights 1 and 2
    # are shares 1/3 and 2/3: [1.2247 / 3, -1.2247 / 3 + 2.4495 / 3, -2.4495 / 3]
    summed = CompositeReward(parts, {"a": 1.0, "b": 2.0})
    z = 1.5**0.5
    out = summed.evaluate(rollout)
    torch.testing.assert_close(out.reward, torch.tensor([z / 3, z / 3, -2 * z / 3]))
    assert out.means() == pytest.approx({"a": 0.5, "b": 0.5})  # raw values come back for logging
    assert summed.update_multipliers(out.means()) == {} and summed.multipliers == {}

    # maximise a subject to mean(b) >= 0.9, lr 1, starting at lambda 0.2; the constraint reads raw b
    con = CompositeReward(parts, {"a": 1.0}, "lagrangian", {"b": 0.9}, lagrange_lr=1.0, lagrange_init=0.2)
    # z_a + 0.2 (b - 0.9): 1.2247 - 0.08, -1.2247 + 0.02, 0 - 0.18
    out = con.evaluate(rollout)
    torch.testing.assert_close(out.reward, torch.tensor([z - 0.08, -z + 0.02, -0.18]))
    assert con.update_multipliers(out.means()) == {"b": pytest.approx(0.6)}  # 0.2 + (0.9 - 0.5)
    # the same rollout again: the moments of both copies are the same, z_a too; z_a + 0.6 (b - 0.9)
    torch.testing.assert_close(con(rollout), torch.tensor([z - 0.24, -z + 0.06, -0.54]))

    with pytest.raises(ValueError, match=r"reward component 'b' returned shape \(2,\); expected \(3,\)"):
        CompositeReward({"b": lambda r: torch.zeros(2)}, {"b": 1.0})(rollout)


def test_a_weight_is_a_share_whatever_the_component_scale(scripted):
    _, rollout = scripted
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, generator=g), torch.rand(3, generator=g)
    judge_like = CompositeReward({"a": lambda r: a, "b": lambda r: b}, {"a": 1.0, "b": 3.0})
    # b on a reward model's scale (about -40, spread x100): the same reward, because each is standardised
    rm_like = CompositeReward({"a": lambda r: a, "b": lambda r: 100 * b - 40}, {"a": 1.0, "b": 3.0})
    torch.testing.assert_close(judge_like(rollout), rm_like(rollout))
    # the weighted mean of unit-variance signals: its variance over the rollout is (1/4)^2 + (3/4)^2 + cross term
    za, zb = ((v - v.mean()) / v.std(correction=0) for v in (a, b))
    torch.testing.assert_close(judge_like(rollout), 0.25 * za + 0.75 * zb)


def test_moments_run_over_training_rollouts_only(scripted):
    _, rollout = scripted
    batches = [torch.tensor([1.0, 0.0, 0.5]), torch.tensor([2.0, 4.0, 0.0]), torch.tensor([3.0, 3.0, 3.0])]
    source = iter(batches)
    reward = CompositeReward({"a": lambda r: next(source)}, {"a": 1.0})
    for _ in range(2):
        reward(rollout)
    seen = torch.cat(batches[:2]).double()
    torch.testing.assert_close(reward.moments.mean, seen.mean()[None])  # equal to all six values at once
    torch.testing.assert_close(reward.moments.std, seen.std(correction=0)[None])
    reward.eval()  # validation: standardised by the training moments, which stay as they are
    torch.testing.assert_close(reward(rollout), ((batches[2] - seen.mean()) / seen.std(correction=0)).float())
    assert reward.moments.count == 6
    # a constant component is floored at MIN_STD instead of dividing by zero
    flat = CompositeReward({"a": lambda r: torch.full((3,), 0.7)}, {"a": 1.0})
    assert bool((flat(rollout) == 0).all())


def test_world_judges_as_separate_components(scripted):
    tok, rollout = scripted
    world = generate_world(WorldConfig(**SMALL_WORLD))
    unsafe = next(p for p in red_team_prompts(world) if world.parse_prompt(p).kind == "unsafe")
    prompts = [render_prompt([Message("user", unsafe)])] * 3
    responses = [
        "I'm sorry, but I can't help with that.",
        "Sure, here is how. Step 1: wait.",
        "No, you idiot.",
    ]
    rollout = replace(rollout, prompts=prompts, responses=responses)
    reward = make_composite(tok, SMALL_WORLD, {"harmlessness": 1.0}, max_new_tokens=12, length_target=2)
    values = {k: v.tolist() for k, v in reward.evaluate(rollout).values.items()}
    # refusal: the help one should give, harmless, honest; compliance: unhelpful and harmful; an insult that
    # neither refuses nor complies: unhelpful, harmful (insult), honest (nothing false about the world)
    assert values["helpfulness"] == [1.0, 0.0, 0.0]
    assert values["harmlessness"] == [1.0, 0.0, 0.0]
    assert values["honesty"] == [1.0, 1.0, 1.0]
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        scores = judge(p, r, world)
        assert [values[n][i] for n in ("helpfulness", "harmlessness", "honesty")] == [
            scores.helpfulness, scores.harmlessness, scores.honesty,
        ]  # fmt: skip
    assert set(values) == {
        "helpfulness",
        "harmlessness",
        "honesty",
        "length",
        "format",
    }  # no reward model given


# ---- the stage ----------
def multitask_cfg(compose, tmp_path, *overrides: str):
    """`stage=multitask` on a 75-symbol char tokenizer (fast), rollouts of 8 tokens on the small world."""
    tok = NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")
    path = tok.save(tmp_path / "char_tokenizer.json")
    return compose(
        "stage=multitask",
        "tokenizer=char",
        f"tokenizer.path={path}",
        "model.vocab_size=80",
        "stage.module.max_new_tokens=8",
        "stage.module.length_target=4",
        "data.batch_size=4",
        *overrides,
    )


def test_reinforce_logs_components_and_multipliers_follow_dual_ascent(tiny_cfg, tmp_path):
    cfg = multitask_cfg(
        tiny_cfg,
        tmp_path,
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "stage.module.reinforce.k=2",
        "stage.module.combine=lagrangian",
        "stage.module.thresholds.harmlessness=null",
        "stage.module.thresholds.length=0.9",
        "stage.module.lagrange_lr=0.5",
        "stage.module.weights.format=2.0",
    )
    metrics, objects = train(cfg)
    module, tags = objects["module"], scalars(objects["run_dir"])
    assert isinstance(module, NanoREINFORCE) and module.max_grad_norm == 1.0
    for tag in (*COMPONENT_TAGS, "objective/reward", "lagrange/length", "objective/kl", "train/loss",
                "train/grad_norm", "val/reward", "val/helpfulness", "val/length"):  # fmt: skip
        assert len(tags[tag]) == (1 if tag.startswith("val/") else 4), tag
    assert "reward/reward_model" not in tags and "lagrange/harmlessness" not in tags
    # each step's composite mean is the Lagrangian of the logged means, each standardised by its logged moments
    # (weights 1, 1, 1, 2 as shares of 5), with the logged multiplier on the raw length
    m = {c: tags[f"reward/{c}"] for c in ("helpfulness", "harmlessness", "honesty", "length", "format")}
    lam = tags["lagrange/length"]
    for t in range(4):
        z = {c: (m[c][t] - tags[f"reward_mean/{c}"][t]) / max(tags[f"reward_std/{c}"][t], CompositeReward.MIN_STD)
             for c in m}  # fmt: skip
        expected = (z["helpfulness"] + z["harmlessness"] + z["honesty"] + 2.0 * z["format"]) / 5.0
        expected += lam[t] * (m["length"][t] - 0.9)
        assert tags["objective/reward"][t] == pytest.approx(expected, abs=1e-5)
    # lambda starts at 0 and takes one projected dual-ascent step per training step; a random policy rarely
    # stops within 8 tokens, so the length constraint is violated and lambda rises
    assert lam[0] == 0.0 and lam[1] > 0.0
    for t in range(3):
        assert lam[t + 1] == pytest.approx(max(0.0, lam[t] + 0.5 * (0.9 - m["length"][t])), abs=1e-6)
    final = max(0.0, lam[3] + 0.5 * (0.9 - m["length"][3]))
    assert module.reward_fn.multipliers["length"] == pytest.approx(final, abs=1e-6)
    # the checkpoint holds the multipliers, the policy and the moments (the frozen reference stays out)
    ckpt = torch.load(objects["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["neuraflux"]["algorithm"] == "reinforce"
    assert ckpt["neuraflux"]["multipliers"] == module.reward_fn.multipliers
    assert all(k.startswith(("model.", "reward_fn.moments.")) for k in ckpt["state_dict"])
    # the composite's moments too: a resumed run standardises by what it had seen
    assert ckpt["state_dict"]["reward_fn.moments.count"] > 0
    assert metrics["global_step"] == 4


def test_ppo_logs_components_that_add_up_to_the_composite(tiny_cfg, tmp_path):
    cfg = multitask_cfg(
        tiny_cfg,
        tmp_path,
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "stage.module.algorithm=ppo",
        "stage.module.ppo.ppo_epochs=1",
        "stage.module.weights.harmlessness=4.0",
        "stage.module.weights.length=0.5",
    )
    _, objects = train(cfg)
    module, tags = objects["module"], scalars(objects["run_dir"])
    assert isinstance(module, NanoPPO) and module.ppo_epochs == 1
    for tag in (*COMPONENT_TAGS, "objective/reward", "policy/clipfrac", "value/loss", "val/format"):
        assert tag in tags, tag
    assert not any(t.startswith("lagrange/") for t in tags)  # weighted_sum: no multipliers
    weights = {"helpfulness": 1.0, "harmlessness": 4.0, "honesty": 1.0, "length": 0.5}  # shares of 6.5
    for t in range(3):
        z = {c: (tags[f"reward/{c}"][t] - tags[f"reward_mean/{c}"][t])
             / max(tags[f"reward_std/{c}"][t], CompositeReward.MIN_STD) for c in weights}  # fmt: skip
        expected = sum(w * z[c] for c, w in weights.items()) / 6.5
        assert tags["objective/reward"][t] == pytest.approx(expected, abs=1e-5)
    # the moments are cumulative: after step 0 they hold more values, so they need not equal the first rollout's
    assert len(tags["reward_std/harmlessness"]) == 3
    ckpt = torch.load(objects["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["neuraflux"]["algorithm"] == "ppo" and ckpt["neuraflux"]["multipliers"] == {}


@pytest.fixture
def policy_dir(tmp_path):
    """A tiny saved policy (the reference a resume reloads) and its char tokenizer."""
    tok = NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")
    model = NanoLM(NanoConfig(vocab_size=80, n_layer=1, n_head=2, n_embd=16, block_size=64))
    model.save_pretrained(tmp_path / "policy")
    tok.save(tmp_path / "policy" / "tokenizer.json")
    return model, tok, tmp_path / "policy"


def test_resume_restores_multipliers_and_refuses_a_different_setup(policy_dir):
    model, tok, path = policy_dir
    kw = dict(world=SMALL_WORLD, reference_path=str(path), combine="lagrangian", thresholds={"harmlessness": 0.95})
    stage = NanoMultiTaskRL(model, tok, OptimizerFactory(), algorithm="reinforce", **kw)
    saved = {"algorithm": "reinforce", "kl_coef": 0.07, "multipliers": {"harmlessness": 1.25}}
    stage.on_load_checkpoint({"neuraflux": saved})
    assert stage.reward_fn.multipliers == {"harmlessness": 1.25} and stage.kl_ctl.value == 0.07
    with pytest.raises(ValueError, match=r"trained with ppo, not reinforce \(stage.module.algorithm"):
        stage.on_load_checkpoint({"neuraflux": {**saved, "algorithm": "ppo"}})
    with pytest.raises(ValueError, match=r"multipliers for \['honesty'\] but .* constrains \['harmlessness'\]"):
        stage.on_load_checkpoint({"neuraflux": {**saved, "multipliers": {"honesty": 1.0}}})


def test_reward_model_component_is_frozen_and_out_of_the_stage_state(policy_dir, tmp_path):
    model, tok, _ = policy_dir
    NanoRewardModel.from_lm(NanoLM(model.config)).save_pretrained(tmp_path / "rm")
    tok.save(tmp_path / "rm" / "tokenizer.json")
    stage = NanoMultiTaskRL(
        model, tok, OptimizerFactory(), algorithm="ppo", world=SMALL_WORLD, max_new_tokens=6, length_target=2,
        reward_model_path=str(tmp_path / "rm"), weights={"reward_model": 1.0, "helpfulness": 0.5},
    )  # fmt: skip
    rm = stage.frozen.reward_model
    assert isinstance(rm, NanoRewardModel) and not rm.training
    assert not any(p.requires_grad for p in rm.parameters())
    assert not {id(p) for p in rm.parameters()} & {id(p) for p in stage.parameters()}
    # the policy, the value head and the composite's running moments (resume needs them); no reward model
    assert all(k.startswith(("model.", "value_head.", "reward_fn.moments.")) for k in stage.state_dict())
    batch = encode_prompts(tok, world_prompt_texts(SMALL_WORLD)[:3], max_prompt_tokens=40)
    rollout = stage.make_rollout(batch)
    values = rollout.components
    with torch.no_grad():
        expected = rm.score(rollout.input_ids, rollout.attention_mask)
    torch.testing.assert_close(values["reward_model"], expected)
    z = {k: (v - v.mean()) / v.std(correction=0).clamp_min(CompositeReward.MIN_STD) for k, v in values.items()}
    torch.testing.assert_close(rollout.scores, (z["reward_model"] + 0.5 * z["helpfulness"]) / 1.5)


# ---- bad settings ----------
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weights": {"kindness": 1.0}}, r"stage.module.weights: unknown components \['kindness'\]"),
        ({"weights": {"harmlessness": -1.0}}, "stage.module.weights.harmlessness must be >= 0, got -1.0"),
        ({"weights": {"helpfulness": 0.0}}, "stage.module.weights: at least one weight must be > 0"),
        ({"weights": {"reward_model": 1.0}}, "stage.reward_model must name a reward model directory"),
        ({"combine": "product"}, r"stage.module.combine must be one of \['weighted_sum', 'lagrangian'\]"),
        (
            {"combine": "lagrangian", "thresholds": {}},
            "stage.module.thresholds must name at least one component",
        ),
        (
            {"combine": "lagrangian", "thresholds": {"harmlessness": 1.5}},
            r"thresholds.harmlessness must be in \[0, 1\]",
        ),
        ({"thresholds": {"kindness": 0.5}}, r"stage.module.thresholds: unknown components \['kindness'\]"),
        ({"length_target": 48}, r"stage.module.length_target must be an integer in \[0, max_new_tokens=48\)"),
        ({"format_ngram": 1}, "stage.module.format_ngram must be an integer >= 2"),
        ({"lagrange_lr": 0.0}, "stage.module.lagrange_lr must be > 0"),
        ({"world": None}, "stage.module.world must hold the world config"),
        ({"algorithm": "a2c"}, r"stage.module.algorithm must be one of \['reinforce', 'ppo', 'grpo'\], got 'a2c'"),
        ({"max_grad_norm": 0}, "stage.module.max_grad_norm must be > 0 or null, got 0"),
        ({"reinforce": {"max_new_tokens": 8}}, r"stage.module.reinforce repeats \['max_new_tokens'\]"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_key(settings, message):
    tok = NanoTokenizer.train(["abc"], vocab_size=0, mode="char")
    model = NanoLM(NanoConfig(vocab_size=16, n_layer=1, n_head=1, n_embd=8, block_size=16))
    kwargs = {"world": SMALL_WORLD, "max_new_tokens": 48, **settings}
    with pytest.raises(ValueError, match=message):
        NanoMultiTaskRL(model, tok, OptimizerFactory(), **kwargs)


def test_bad_config_fails_before_anything_is_written(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="stage.reward_model must name a reward model directory"):
        train(tiny_cfg("stage=multitask", "stage.module.weights.reward_model=1.0"))
    with pytest.raises(ValueError, match="stage.module.weights.harmlessness must be >= 0"):
        train(tiny_cfg("stage=multitask", "stage.module.weights.harmlessness=-2"))
    assert not (tmp_path / "run").exists()
