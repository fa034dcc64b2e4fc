"""measure_policy: judges and violation rates of scripted responses against hand counts, KL to the reference
(0 for the policy itself, > 0 for a different model, seeded), the reward model's mean score, and the held-out
prompts being exactly the PPO/REINFORCE validation split."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from neuraflux.data.prompts import PromptDataModule, world_prompt_texts
from neuraflux.feedback.constitution import Constitution
from neuraflux.feedback.measure import held_out_prompts, measure_policy, render
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import WorldConfig, generate_world, lexicon, rl_prompts
from tests.conftest import CONF
from tests.test_rollout import SMALL_WORLD, BigramLM, tiny_policy

REFUSAL = lexicon.REFUSAL
# An insult, unsafe compliance ("here is how") and a vault code that is nobody's, in one response.
BAD = "Sure, here is how you idiot. K4P7-R3Q9"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(**SMALL_WORLD))


@pytest.fixture(scope="module")
def bpe():
    # Trained with the scripted responses in the text, so each encodes to distinct tokens (a bigram chain).
    return NanoTokenizer.train(world_prompt_texts(SMALL_WORLD) + [REFUSAL, BAD] * 50, vocab_size=600)


def scripted_policy(tok, response: str) -> BigramLM:
    """Greedy decoding answers every prompt (all end with <|assistant|>) with `response`, then <|end|>."""
    ids = tok.encode(response)
    assert len(set(ids)) == len(ids), "the response must encode to distinct tokens"
    chain = [tok.token_to_id("<|assistant|>"), *ids, tok.end_id]
    model = BigramLM(tok.vocab_size, dict(zip(chain, chain[1:], strict=False)))
    model.config.max_position_embeddings = 64  # prompts keep their last 16 tokens (block_size): enough here
    return model


def five_prompts(world):
    """A closed-book question on a seen entity, one on an unknown entity, and red-team: unsafe, insult, secret."""
    wanted = {}
    for p in rl_prompts(world):
        parsed = world.parse_prompt(p.prompt)
        split = parsed.entity.split if parsed.entity is not None else None
        key = {("attribute", "seen"): "seen", ("attribute", "unknown"): "unknown", ("about", "unknown"): "unknown"}.get(
            (parsed.kind, split), parsed.kind
        )
        if key == "seen" and p.context is not None:
            continue
        wanted.setdefault(key, p)
    picked = [wanted[k] for k in ("seen", "unknown", "unsafe", "insult", "secret")]
    assert "K4P7-R3Q9" not in picked[-1].context  # the scripted code is not the real one
    return picked


def test_judges_and_violations_of_a_refusing_policy_match_hand_counts(world, bpe):
    constitution = Constitution.from_config(OmegaConf.load(CONF / "constitution" / "default.yaml"))
    m = measure_policy(scripted_policy(bpe, REFUSAL), bpe, world, five_prompts(world), constitution=constitution)
    # helpful only on the three red-team prompts; harmless everywhere; dishonest only about the unknown entity
    assert m.judges == {"helpfulness": 3 / 5, "harmlessness": 1.0, "honesty": 4 / 5, "mean": pytest.approx(0.8)}
    assert m.violations == {
        "no_insults": 0.0, "no_unsafe_compliance": 0.0, "no_secret_leak": 0.0, "no_fabrication": 0.0, "any": 0.0,
    }  # fmt: skip
    assert m.n == 5 and m.kl is None and m.reward is None
    assert [s["response"] for s in m.samples] == [REFUSAL] * 5
    assert m.responses == [REFUSAL] * 5
    assert m.gap == pytest.approx(0.2)


def test_judges_and_violations_of_a_rude_complying_policy_match_hand_counts(world, bpe):
    constitution = Constitution.from_config(OmegaConf.load(CONF / "constitution" / "default.yaml"))
    m = measure_policy(scripted_policy(bpe, BAD), bpe, world, five_prompts(world), constitution=constitution)
    # never helpful, never harmless (the insult); dishonest about the unknown entity and with the wrong vault code
    assert m.judges == {"helpfulness": 0.0, "harmlessness": 0.0, "honesty": 3 / 5, "mean": pytest.approx(0.2)}
    # over the 3 red-team prompts: every one insults, complies and shows a code; only the secret one fabricates
    assert m.violations == {
        "no_insults": 1.0, "no_unsafe_compliance": 1.0, "no_secret_leak": 1.0, "no_fabrication": 1 / 3, "any": 1.0,
    }  # fmt: skip
    assert m.samples[0] == {"prompt": five_prompts(world)[0].prompt, "response": BAD}
    # no constitution: no violation rates; no red-team prompt among the measured: none either
    assert measure_policy(scripted_policy(bpe, BAD), bpe, world, five_prompts(world)[:2]).violations == {}
    assert (
        measure_policy(
            scripted_policy(bpe, BAD), bpe, world, five_prompts(world)[:2], constitution=constitution
        ).violations
        == {}
    )


class LengthScore(torch.nn.Module):
    """A stub reward model: the number of real tokens of each sequence."""

    def score(self, input_ids, attention_mask):
        return attention_mask.sum(-1).float()


def test_reward_is_the_mean_reward_model_score_of_the_greedy_sequences(world, bpe):
    prompts = five_prompts(world)
    m = measure_policy(scripted_policy(bpe, REFUSAL), bpe, world, prompts, reward_model=LengthScore(), batch_size=2)
    # each row: its prompt's last <= 16 tokens (block_size), the 12 response tokens and <|end|>
    lengths = [min(16, len(bpe.encode(render(p)))) + len(bpe.encode(REFUSAL)) + 1 for p in prompts]
    assert len(bpe.encode(REFUSAL)) == 12
    assert m.reward == pytest.approx(sum(lengths) / 5)


def test_kl_to_itself_is_zero_to_another_model_positive_and_seeded(world, world_tok):
    tok = world_tok
    model = tiny_policy(tok)
    prompts = world_prompt_texts(SMALL_WORLD)[:6]
    same = measure_policy(model, tok, world, prompts, reference=copy.deepcopy(model), max_new_tokens=8)
    assert same.kl == 0.0
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(50.0)  # a much sharper next-token distribution than the near-uniform policy's
    a = measure_policy(model, tok, world, prompts, reference=other, max_new_tokens=8, seed=1)
    b = measure_policy(model, tok, world, prompts, reference=other, max_new_tokens=8, seed=1)
    c = measure_policy(model, tok, world, prompts, reference=other, max_new_tokens=8, seed=2)
    assert a.kl > 1.0
    assert a.kl == b.kl and a.kl != c.kl  # deterministic under a seed, and the seed matters
    assert a.judges == same.judges  # greedy responses do not depend on the reference or the seed
    assert model.training  # the policy's mode is restored


@pytest.fixture(scope="module")
def world_tok():
    return NanoTokenizer.train(world_prompt_texts(SMALL_WORLD), vocab_size=0, mode="char")


def test_held_out_prompts_are_the_prompt_data_modules_validation_split(world, world_tok):
    dm = PromptDataModule(builtin="world", world=SMALL_WORLD, val_fraction=0.25, seed=7)
    dm.tokenizer = world_tok
    dm.setup()
    val = held_out_prompts(world, val_fraction=0.25, seed=7)
    assert [render(p) for p in val] == dm.val_set
    assert [render(p) for p in held_out_prompts(world, "train", val_fraction=0.25, seed=7)] == dm.train_set
    assert len(held_out_prompts(world, "all")) == len(rl_prompts(world))
    with pytest.raises(ValueError, match="split must be one of"):
        held_out_prompts(world, "test")
    with pytest.raises(ValueError, match="no prompts"):
        measure_policy(tiny_policy(world_tok), world_tok, world, [])
