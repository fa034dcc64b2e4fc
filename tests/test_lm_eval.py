"""The world's questions as an lm-evaluation-harness task (neuraflux.harness): the exported model, scored by lm_eval
on the task file, gets NeuraFlux's own evaluation's figures, from the same prompts and the same answers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from neuraflux.chat import Message, render_completion, render_prompt
from neuraflux.eval import EvalSettings, split_items
from neuraflux.harness import GROUP, compare, process_results, task_name
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import WorldConfig, generate_world, pretrain_text
from neuraflux.world.tasks import dont_know

WORLD = WorldConfig(n_entities=30)
LIMIT = 3  # questions per split


def trained_model_dir(tmp_path):
    """A 2-layer rotary NanoLM taught by heart the evaluation's first seen questions with their values and its first
    unknown ones with "I don't know" (prompts without context), in a run directory whose config.yaml names the
    world: right answers without retrieval, whatever it makes of the prompts with a context, so the figures are
    neither all 0 nor all 1."""
    world = generate_world(WORLD)
    tok = NanoTokenizer.train([pretrain_text(world)], 300)
    entity = {e.name: e for e in world.entities}
    pairs = [(it.question, f"It is {it.answer}.") for it in split_items(world, "seen", LIMIT)]
    pairs += [(it.question, dont_know(entity[it.entity])) for it in split_items(world, "unknown", LIMIT)]
    ids, mask = tok.pad_batch(
        [tok.encode(render_prompt([Message("user", q)]) + render_completion(a)) for q, a in pairs], "right"
    )
    torch.manual_seed(0)
    config = NanoConfig(vocab_size=320, block_size=128, max_position_embeddings=256, n_layer=2, n_head=2, n_embd=32)
    model = NanoLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(ids[:, :-1])  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05  # learned by heart
    run = tmp_path / "run"
    model.eval().save_pretrained(run / "model", tok)
    (run / "config.yaml").write_text(yaml.safe_dump({"world": {"n_entities": WORLD.n_entities}}))
    return run / "model"


def test_the_task_is_scored_by_the_evaluations_own_rule(tmp_path):
    world = generate_world(WORLD)
    path = tmp_path / "world.json"
    path.write_text(json.dumps({"n_entities": WORLD.n_entities}))
    seen = split_items(world, "seen", 1)[0]
    doc = {"question": seen.question, "entity": seen.entity, "attribute": seen.attribute, "answer": seen.answer,
           "split": "seen", "world": str(path)}  # fmt: skip
    assert process_results(doc, [f"It is {seen.answer.upper()}!"]) == {"exact_match": 1.0}  # whole words, any case
    assert process_results(doc, [f"It is {seen.answer}x."]) == {"exact_match": 0.0}
    unknown = split_items(world, "unknown", 1)[0]
    doc = {**doc, "question": unknown.question, "entity": unknown.entity, "attribute": unknown.attribute,
           "answer": unknown.answer, "split": "unknown"}  # fmt: skip
    entity = next(e for e in world.entities if e.name == unknown.entity)
    assert process_results(doc, [dont_know(entity)]) == {"exact_match": 1.0}  # the honesty judge's full mark


def test_lm_eval_scores_the_exported_model_as_neuraflux_does(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install 'neuraflux[harness]'")
    settings = EvalSettings(limit=LIMIT, max_new_tokens=12)
    result = compare(trained_model_dir(tmp_path), tmp_path / "out", settings)
    rows = {r["task"]: r for r in result["tasks"]}
    assert set(rows) == {task_name(s, r) for s in ("seen", "unseen", "unknown") for r in (True, False)}
    for name, row in rows.items():
        assert row["n"] == LIMIT
        assert row["same_prompts"] == LIMIT, name  # lm_eval's chat-template prompt is NeuraFlux's, to the character
        assert row["same_answers"] == LIMIT, (name, row["answers"])  # greedy decoding: the same text
        assert row["lm_eval"] == row["neuraflux"], name
    # what it learned by heart, scored by NeuraFlux's rule inside lm_eval (a plain string match would give 0)
    assert rows[task_name("seen", False)]["lm_eval"] == 1.0
    assert rows[task_name("unknown", False)]["lm_eval"] == 1.0  # the honesty judge
    assert rows[task_name("unseen", False)]["lm_eval"] < 1.0
    assert (tmp_path / "out" / "task" / f"{GROUP}.yaml").is_file()
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["tasks"][0]["n"] == LIMIT
