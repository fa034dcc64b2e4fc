"""Rollouts, rewards and prompt data: masks by hand, log-probs against a recomputation, shaped rewards."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from neuraflux.alignment.stats import masked_mean
from neuraflux.chat import END, Message, render_prompt
from neuraflux.data.prompts import PromptDataModule, encode_prompts, world_prompt_texts
from neuraflux.feedback.rewards import CompositeReward, JudgeReward, RewardModelReward, make_reward, reward_model_of
from neuraflux.feedback.rollout import (
    KLSettings,
    SamplingSettings,
    generate_rollouts,
    load_reference,
    score_rollout,
    sequence_kl,
)
from neuraflux.masking import last_token_index
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.model.reward import NanoRewardModel
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import WorldConfig, answer_sentence, generate_world, qa_items

SMALL_WORLD = {"n_entities": 20}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers shared with the stage tests ----------
def token_share(rollout, token_id: int) -> torch.Tensor:
    """Toy reward: the fraction of each response's tokens that are `token_id`. (B,)"""
    hits = (rollout.targets == token_id).float()
    return masked_mean(hits, rollout.response_mask, dim=-1)


def toy_reward_cfg(compose, tmp_path, stage: str, *overrides: str):
    """`stage=...` on a char tokenizer (75 symbols, model vocab 80) rewarded by the share of "a" tokens.

    A char vocabulary this small gives "a" a ~1/80 chance per token at initialisation, so a few steps see it.
    Learned positions: the step counts and thresholds of the tests were calibrated on them (a from-scratch rotary
    model climbs slower here).
    """
    tok = NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")
    path = tok.save(tmp_path / "char_tokenizer.json")
    cfg = compose(
        f"stage={stage}",
        "tokenizer=char",
        f"tokenizer.path={path}",
        "model.vocab_size=80",
        "model.position_encoding=learned",
        "stage.module.max_new_tokens=8",
        "stage.module.kl_coef=0.0",
        *overrides,
    )
    cfg.stage.module.reward_fn = OmegaConf.create(
        {"_target_": "tests.test_rollout.token_share", "_partial_": True, "token_id": tok.token_to_id("a")}
    )
    return cfg, tok


# ---- a scripted policy: greedy decoding follows a fixed bigram table ----------
class OneHot(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask=None, kv_cache=None, **_):
        return nn.functional.one_hot(input_ids, self.vocab_size).float()  # (B, T, V) "hidden" = the token


class BigramLM(nn.Module):
    """logits(next | last) = 10 on table[last], 0 elsewhere; generate() and policy_forward() run on it."""

    def __init__(self, vocab_size: int, table: dict[int, int]):
        super().__init__()
        self.config = NanoConfig(
            vocab_size=vocab_size,
            n_layer=1,
            n_head=1,
            n_embd=vocab_size,
            block_size=16,
            max_position_embeddings=32,
        )
        self.transformer = OneHot(vocab_size)
        self.lm_head = nn.Linear(vocab_size, vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for last, nxt in table.items():
                self.lm_head.weight[nxt, last] = 10.0


@pytest.fixture
def scripted():
    tok = NanoTokenizer.train(["abxyz"], vocab_size=0, mode="char")
    a, b, x, y, z = (tok.token_to_id(c) for c in "abxyz")
    # x -> y -> <|end|> stops after two tokens; z -> z never stops
    model = BigramLM(tok.vocab_size, {x: y, y: tok.end_id, z: z, a: a, b: b})
    batch = encode_prompts(tok, ["ax", "bbz"])
    return tok, model, batch


def test_response_mask_starts_after_prompt_and_stops_after_end_token(scripted):
    tok, model, batch = scripted
    y, z, end, pad = tok.token_to_id("y"), tok.token_to_id("z"), tok.end_id, tok.pad_id
    r = generate_rollouts(model, tok, batch, max_new_tokens=3, temperature=0.0)
    # prompts left-padded to P = 3: [pad a x], [b b z]
    assert r.prompt_mask.tolist() == [[False, True, True], [True, True, True]]
    # row 0: y, <|end|>, then padding; row 1: z z z (no stop within 3 tokens)
    assert r.response_ids.tolist() == [[y, end, pad], [z, z, z]]
    assert r.attention_mask.tolist() == [[False, True, True, True, True, False], [True] * 6]
    # target column t is token t + 1: the response starts at column P - 1 = 2; row 0 ends at its <|end|>
    assert r.response_mask.tolist() == [[False, False, True, True, False], [False, False, True, True, True]]
    assert r.responses == ["y", "zzz"]
    assert r.response_lengths.tolist() == [2, 3]
    # the scripted token has logit 10 against 12 zeros: log p = 10 - log(e^10 + 12)
    expected = 10 - math.log(math.exp(10) + 12)
    torch.testing.assert_close(r.logprobs[r.response_mask], torch.full((5,), expected))
    assert last_token_index(r.response_mask).tolist() == [3, 4]


def test_shaped_rewards_by_hand(scripted):
    tok, model, batch = scripted
    r = generate_rollouts(model, tok, batch, max_new_tokens=3, temperature=0.0)
    logprobs = torch.tensor([[0.0, 0.0, -1.0, -2.0, 0.0], [0.0, 0.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[9.0, 9.0, -1.5, -2.5, 9.0], [9.0, 9.0, -1.0, -1.0, -3.0]])  # 9s sit off the response
    r.logprobs, r.ref_logprobs = logprobs, ref
    scored = score_rollout(r, torch.tensor([1.0, 2.0]), kl_coef=0.1, kl_estimator="k1")
    # k1 = logp - ref on the response: row 0 [.5 .5] at columns 2, 3; row 1 [0 0 2] at columns 2..4
    torch.testing.assert_close(scored.kl, torch.tensor([[0, 0, 0.5, 0.5, 0], [0, 0, 0, 0, 2.0]]))
    # rewards = -0.1 kl, plus the score at the last response token (column 3 and column 4)
    torch.testing.assert_close(scored.rewards, torch.tensor([[0, 0, -0.05, -0.05 + 1.0, 0], [0, 0, 0, 0, -0.2 + 2.0]]))
    torch.testing.assert_close(sequence_kl(scored), torch.tensor([1.0, 2.0]))
    # k3 = (r - 1) - log r with log r = ref - logp = -0.5: e^-0.5 - 1 + 0.5
    k3 = score_rollout(r, torch.tensor([0.0, 0.0]), kl_coef=1.0, kl_estimator="k3")
    assert k3.kl[0, 2].item() == pytest.approx(math.exp(-0.5) - 0.5)
    with pytest.raises(ValueError, match=r"returned shape \(3,\); expected \(2,\)"):
        score_rollout(r, torch.zeros(3), kl_coef=0.1)


def tiny_policy(tok) -> NanoLM:
    torch.manual_seed(0)
    return NanoLM(
        NanoConfig(
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=2,
            n_embd=32,
            block_size=64,
            max_position_embeddings=128,
        )
    )


@pytest.fixture(scope="module")
def world_tok():
    return NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")


def test_rollout_logprobs_values_and_entropy_equal_a_recomputation(world_tok):
    tok = world_tok
    model = tiny_policy(tok)
    value_head = nn.Linear(32, 1)
    texts = ["<|bos|><|user|>hi<|end|><|assistant|>", *world_prompt_texts(SMALL_WORLD)[:3]]
    batch = encode_prompts(tok, texts, max_prompt_tokens=40)
    assert not bool(batch.attention_mask.all())  # rows of different lengths: left padding is exercised
    gen = torch.Generator().manual_seed(3)
    r = generate_rollouts(
        model,
        tok,
        batch,
        12,
        temperature=0.7,
        generator=gen,
        reference=copy.deepcopy(model),
        value_head=value_head,
    )
    P = batch.input_ids.shape[1]
    for i in range(len(r)):
        # each row alone, unpadded: real prompt tokens then the response up to its stop token
        real = r.input_ids[i][r.attention_mask[i]][None]  # (1, n)
        with torch.no_grad():
            hidden = model.transformer(real)
            logp = torch.log_softmax(model.lm_head(hidden)[0, :-1] / 0.7, dim=-1)  # (n - 1, V)
        n_resp = int(r.response_mask[i].sum())
        picked = logp[-n_resp:].gather(-1, real[0, -n_resp:, None]).squeeze(-1)
        torch.testing.assert_close(r.logprobs[i][r.response_mask[i]], picked, atol=1e-5, rtol=0)
        entropy = -(logp.exp() * logp).sum(-1)[-n_resp:]
        torch.testing.assert_close(r.entropy[i][r.response_mask[i]], entropy, atol=1e-5, rtol=0)
        values = value_head(hidden[0, :-1]).squeeze(-1)[-n_resp:]
        torch.testing.assert_close(r.values[i][r.response_mask[i]], values, atol=1e-5, rtol=0)
        # the mask is one run from column P - 1, ending at the first stop token when there is one
        cols = r.response_mask[i].nonzero().flatten().tolist()
        assert cols == list(range(P - 1, P - 1 + n_resp))
        stops = [j for j in cols if int(r.targets[i, j]) in (tok.end_id, tok.eos_id)]
        assert stops in ([], [cols[-1]])
    # a reference that is a copy of the policy gives the same log-probs: KL 0
    torch.testing.assert_close(r.ref_logprobs[r.response_mask], r.logprobs[r.response_mask])


def test_settings_name_the_bad_key():
    with pytest.raises(ValueError, match="stage.module.max_new_tokens must be a positive integer"):
        SamplingSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="stage.module.temperature must be > 0"):
        SamplingSettings(temperature=0.0)
    with pytest.raises(ValueError, match=r"stage.module.kl_estimator must be one of \['k1', 'k3'\], got 'mse'"):
        KLSettings(estimator="mse")
    with pytest.raises(ValueError, match="stage.module.kl_controller must be one of"):
        KLSettings(controller="pid")
    adaptive = KLSettings(controller="adaptive", coef=0.1, target=1.0, horizon=10).controller_object()
    # Ziegler et al.: error clipped to 0.2, beta *= 1 + 0.2 * n / horizon = 1 + 0.2 * 5 / 10
    assert adaptive.update(current_kl=5.0, n_steps=5) == pytest.approx(0.1 * 1.1)


def test_reference_is_a_frozen_copy_or_loaded_from_init_from(tmp_path, world_tok):
    policy = tiny_policy(world_tok)
    ref = load_reference(None, policy, world_tok)
    assert ref is not policy and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    policy.save_pretrained(tmp_path / "m")
    world_tok.save(tmp_path / "m" / "tokenizer.json")
    loaded = load_reference(tmp_path / "m", tiny_policy(world_tok), world_tok)
    torch.testing.assert_close(loaded.lm_head.weight, policy.lm_head.weight)
    other = NanoTokenizer.train(["xyz"], vocab_size=0, mode="char")
    with pytest.raises(ValueError, match="stage.init_from: .* different tokenizer"):
        load_reference(tmp_path / "m", policy, other)


# ---- rewards ----------
def test_judge_reward_is_the_weighted_sum_of_the_judges(scripted):
    tok, model, batch = scripted
    world = generate_world(WorldConfig(**SMALL_WORLD))
    item = qa_items(world, "seen")[0]
    entity = world.entity(item.entity)
    prompt = render_prompt([Message("user", item.question)])
    r = generate_rollouts(model, tok, batch, max_new_tokens=3, temperature=0.0)
    r.prompts = [prompt, prompt]
    # right answer: helpful 1, harmless 1, honest 1; a wrong value of the asked attribute: 0, 1, 0
    wrong = next(
        e.attributes[item.attribute]
        for e in world.entities
        if e.kind == entity.kind and e.attributes[item.attribute] != item.answer
    )
    r.responses = [answer_sentence(entity, item.attribute), answer_sentence(entity, item.attribute, wrong)]
    assert JudgeReward(world)(r).tolist() == [3.0, 1.0]
    weighted = JudgeReward(world, {"helpfulness": 2.0, "harmlessness": 0.5, "honesty": 0.0})
    assert weighted(r).tolist() == [2.5, 0.5]
    with pytest.raises(ValueError, match=r"judge_weights: unknown judges \['kindness'\]"):
        JudgeReward(world, {"kindness": 1.0})


def test_reward_model_reward_scores_the_whole_sequence_and_is_frozen(tmp_path, world_tok):
    torch.manual_seed(0)
    rm = NanoRewardModel.from_lm(tiny_policy(world_tok))
    rm.save_pretrained(tmp_path / "rm")
    world_tok.save(tmp_path / "rm" / "tokenizer.json")
    policy = tiny_policy(world_tok)
    batch = encode_prompts(world_tok, world_prompt_texts(SMALL_WORLD)[:3], max_prompt_tokens=40)
    r = generate_rollouts(policy, world_tok, batch, 6, generator=torch.Generator().manual_seed(0))

    reward = make_reward("reward_model", world_tok, reward_model_path=str(tmp_path / "rm"))
    frozen = reward_model_of(reward)
    assert isinstance(reward, RewardModelReward) and frozen is reward.model and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        expected = rm.score(r.input_ids, r.attention_mask)
    torch.testing.assert_close(reward(r), expected)

    both = make_reward(
        "both", world_tok, world=SMALL_WORLD, reward_model_path=str(tmp_path / "rm"), reward_model_weight=0.5
    )
    assert isinstance(both, CompositeReward) and isinstance(reward_model_of(both), NanoRewardModel)
    judges = make_reward("judges", world_tok, world=SMALL_WORLD)(r)
    # each standardised (judges in [0, 3], the reward model's score on its own scale), then weights 1 : 0.5 as
    # shares 2/3 and 1/3
    standard = [(v - v.mean()) / v.std(correction=0).clamp_min(CompositeReward.MIN_STD) for v in (judges, expected)]
    torch.testing.assert_close(both(r), 2 / 3 * standard[0] + 1 / 3 * standard[1])

    other = NanoTokenizer.train(["xyz"], vocab_size=0, mode="char")
    with pytest.raises(ValueError, match="stage.reward_model .*tokenizer"):
        make_reward("reward_model", other, reward_model_path=str(tmp_path / "rm"))


def test_reward_source_errors_name_the_key(tmp_path, world_tok):
    with pytest.raises(ValueError, match="stage.reward_model must name a reward model directory"):
        make_reward("reward_model", world_tok)
    with pytest.raises(ValueError, match="stage.reward_model must name"):
        make_reward("both", world_tok, world=SMALL_WORLD)
    with pytest.raises(FileNotFoundError, match="stage.reward_model: .*nowhere does not exist"):
        make_reward("reward_model", world_tok, reward_model_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"reward_source must be one of \['judges', 'reward_model', 'both'\]"):
        make_reward("vibes", world_tok)
    with pytest.raises(ValueError, match="stage.module.world must hold the world config"):
        make_reward("judges", world_tok)


# ---- prompt data ----------
def test_encode_prompts_left_pads_and_keeps_the_last_tokens(world_tok):
    tok = world_tok
    batch = encode_prompts(tok, ["abc", "a"], max_prompt_tokens=2)
    ids = [tok.encode("bc"), [tok.pad_id, *tok.encode("a")]]
    assert batch.input_ids.tolist() == ids
    assert batch.attention_mask.tolist() == [[True, True], [False, True]]
    assert batch.texts == ["abc", "a"]  # the judges read the full prompt
    rep = batch.repeat_interleave(3)
    assert rep.texts == ["abc"] * 3 + ["a"] * 3 and rep.input_ids.tolist() == [ids[0]] * 3 + [ids[1]] * 3


def test_prompt_jsonl_renders_records_and_names_a_bad_line(tmp_path, world_tok):
    good = tmp_path / "prompts.jsonl"
    rendered = render_prompt([Message("user", "Who?")])
    good.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "What is Vorlak?"},
                {"prompt": "Why?", "context": "Because."},
                {"messages": [{"role": "user", "content": "Who?"}]},
            ]
        )
        + "\n"
    )
    dm = PromptDataModule(path=str(good), val_fraction=0.3, batch_size=2)
    assert dm.texts() == [
        render_prompt([Message("user", "What is Vorlak?")]),
        render_prompt([Message("user", "Why?")], context="Because."),
        rendered,
    ]
    dm.tokenizer = world_tok
    dm.setup()
    assert len(dm.val_set) == 1 and len(dm.train_set) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape[0] == 2 and all(t.endswith(f"{END}<|assistant|>") for t in batch.texts)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: field 'prompt' must be a non-empty string"):
        PromptDataModule(path=str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl, line 2: not valid JSON"):
        PromptDataModule(path=str(broken))
    with pytest.raises(FileNotFoundError, match="data.path: file .*missing.jsonl does not exist"):
        PromptDataModule(path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="set exactly one of data.path or data.builtin"):
        PromptDataModule(path=str(good), builtin="world")


def test_world_prompts_split_into_train_and_val(world_tok):
    dm = PromptDataModule(builtin="world", world=SMALL_WORLD, val_fraction=0.1, batch_size=4)
    # 20 entities: 12 seen closed-book + 16 seen/unseen with context + 4 unknown + 36 red-team = 68 prompts
    assert len(dm.texts()) == 68
    dm.tokenizer = world_tok
    dm.setup()
    # the shared held-out split: the prompts whose seeded score is below 0.1 (11 here; binomial around 6.8)
    from neuraflux.data.splits import held_out_score

    assert dm.val_set == [p for p in dm.texts() if held_out_score(p, 1337) < 0.1]
    assert (len(dm.train_set), len(dm.val_set)) == (57, 11)
    assert sorted(dm.train_set + dm.val_set) == sorted(dm.texts())  # a split, nothing lost or repeated
