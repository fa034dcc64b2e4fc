"""'Held-out' means no stage after SFT trained on it: checked on the default curriculum's composed stages.

The report measures policies on `held_out_prompts(world)`. Every later stage of `curriculum=full` is composed as
the curriculum composes it, its data module built, and everything it trains on read back as text: rollout
prompts (PPO, multi-task RL), preference pairs (reward model, with its retrieved contexts and practice pairs; DPO)
and constitutional prompts (whose revisions and AI-feedback pairs come from them; `test_constitutional_stage`
checks the files a run writes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from neuraflux.curriculum import stage_overrides
from neuraflux.data.splits import held_out_score, prompt_key, split_held_out
from neuraflux.feedback.measure import held_out_prompts, render
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import WorldConfig, generate_world, rl_prompts
from tests.conftest import CONF


def test_membership_depends_on_the_prompt_alone_and_ignores_its_context():
    prompts = [f"<|bos|><|user|>question {i}<|end|><|assistant|>" for i in range(400)]
    train, held = split_held_out(prompts, 0.1, seed=5)
    assert 20 < len(held) < 60 and len(train) + len(held) == 400  # binomial around 40
    assert held == [p for p in prompts if held_out_score(p, 5) < 0.1]
    # any subset, in any order, holds out exactly its members of that set
    subset = prompts[::-3]
    assert split_held_out(subset, 0.1, seed=5)[1] == [p for p in subset if p in set(held)]
    # the same question with a retrieved document is on the same side
    with_context = [p.replace("<|bos|>", "<|bos|><|context|>a document<|end|>") for p in prompts]
    assert split_held_out(with_context, 0.1, seed=5)[1] == [with_context[prompts.index(p)] for p in held]
    assert prompt_key(with_context[0]) == prompts[0]
    # a larger fraction holds out a superset; another seed, another set
    assert set(held) < set(split_held_out(prompts, 0.2, seed=5)[1])
    assert split_held_out(prompts, 0.1, seed=6)[1] != held


def test_tiny_sets_still_get_one_prompt_on_each_side():
    two = ["a", "b"]
    train, held = split_held_out(two, 0.01, seed=0)
    assert len(train) == len(held) == 1 and held == [min(two, key=lambda p: held_out_score(p, 0))]
    train, held = split_held_out(two, 0.99, seed=0)
    assert len(train) == len(held) == 1 and train == [max(two, key=lambda p: held_out_score(p, 0))]
    with pytest.raises(ValueError, match=r"1 distinct prompt\(s\) cannot be split"):
        split_held_out(["a", "a"], 0.5, seed=0)
    with pytest.raises(ValueError, match=r"data.val_fraction must be in \(0, 1\), got 1.0"):
        split_held_out(two, 1.0, seed=0)


def trained_prompts(cfg, tokenizer) -> list[str]:
    """The rendered prompts of everything the stage's data module trains on."""
    dm = instantiate(cfg.data)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    if hasattr(dm, "examples"):  # preference pairs, as encoded (retrieved contexts and practice pairs included)
        return [e.prompt for e in dm.examples["train"]]
    return list(dm.train_set)  # rollout or constitutional prompts


def test_no_stage_after_sft_trains_on_a_prompt_the_report_measures(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.output_dir={tmp_path}"])
        assert cfg.curriculum.name == "full"
        world = generate_world(WorldConfig.from_dict(OmegaConf.to_container(cfg.world, resolve=True)))
        measured = held_out_prompts(world, val_fraction=cfg.held_out_fraction, seed=cfg.seed)
        measured_keys = {prompt_key(render(p)) for p in measured}
        assert 0.07 * len(rl_prompts(world)) < len(measured) < 0.15 * len(rl_prompts(world))
        tokenizer = NanoTokenizer.train([render(p) for p in rl_prompts(world)], vocab_size=0, mode="char")
        stages = list(cfg.curriculum.stages)
        later = stages[stages.index("sft") + 1 :]
        assert later == ["reward", "ppo", "dpo", "constitutional", "multitask"]
        for name in later:
            stage_cfg = compose(config_name="config", overrides=stage_overrides(cfg, name, [], Path(tmp_path), []))
            trained = trained_prompts(stage_cfg, tokenizer)
            keys = {prompt_key(p) for p in trained}
            leaked = measured_keys & keys
            assert trained and not leaked, f"{name} trains on {len(leaked)} of {len(measured_keys)} held-out prompts"
