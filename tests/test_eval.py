import json

import pytest
import torch

from neuraflux.eval import EvalSettings, chance_exact_match, evaluate, main, retrieval_recall
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.rag import world_retriever
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import QAItem, WorldConfig, generate_world, pretrain_text


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(n_entities=30))


def test_lexical_retrieval_finds_the_asked_entity(world):
    # questions name their entity; the hashed n-gram embedder must find one of its documents
    assert retrieval_recall(world, world_retriever(world), k=5, limit=0) >= 0.95


def test_chance_exact_match_by_hand(world):
    key = next(iter(world.entities[0].attributes))
    n_values = len({e.attributes[key] for e in world.entities if key in e.attributes})
    items = [QAItem("q", world.entities[0].name, key, "v", "seen")] * 3
    assert chance_exact_match(world, items) == pytest.approx(1 / n_values)


def test_evaluate_shape_and_ranges(world, tmp_path):
    tok = NanoTokenizer.train([pretrain_text(world)], 300)
    torch.manual_seed(0)
    model = NanoLM(
        NanoConfig(vocab_size=320, block_size=128, max_position_embeddings=256, n_layer=1, n_head=2, n_embd=16)
    )
    result = evaluate(model, tok, world, EvalSettings(limit=4, max_new_tokens=6))
    for split in ("seen", "unseen", "unknown"):
        for cond in ("with_retrieval", "without_retrieval"):
            assert 0.0 <= result["exact_match"][split][cond] <= 1.0
    assert set(result["judges"]) == {"helpfulness", "harmlessness", "honesty"}
    assert 0.0 <= result["retrieval"]["recall_at_5"] <= 1.0
    assert result["n"] == {"seen": 4, "unseen": 4, "unknown": 4, "red_team": 4}
    # an untrained model answers nothing right
    assert result["exact_match"]["unseen"]["with_retrieval"] == 0.0

    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    assert main(["--model", str(tmp_path), "--limit", "2"]) == 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["n"]["seen"] == 2


def test_world_config_for_reads_the_run_and_names_a_stale_key(tmp_path):
    from neuraflux.eval import world_config_for

    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("world:\n  seed: 5\n  n_entities: 40\n")
    assert world_config_for(tmp_path / "model") == WorldConfig(seed=5, n_entities=40)
    (tmp_path / "config.yaml").write_text("world:\n  seed: 5\n  answer_style: value\n")
    with pytest.raises(ValueError, match=r"config.yaml: world: unknown world key\(s\) \['answer_style'\]"):
        world_config_for(tmp_path / "model")


def test_evaluation_uses_the_runs_retrieval_settings_and_names_a_bad_key(tmp_path, monkeypatch):
    """`python -m neuraflux.eval` scores retrieval with the store the run trained with (config.yaml's `retrieval`
    group), not this installation's defaults; a run without one gets conf/retrieval/default.yaml's."""
    from neuraflux import eval as ev
    from neuraflux.retrieval.documents import load_retrieval_settings

    (tmp_path / "model").mkdir()
    assert ev.retrieval_settings_for(tmp_path / "model") == load_retrieval_settings()
    (tmp_path / "config.yaml").write_text(
        "world:\n  seed: 5\n  n_entities: 40\nretrieval:\n  index: hnsw\n  index_params: {efSearch: 16}\n  k: 3\n"
    )
    settings = ev.retrieval_settings_for(tmp_path / "model")
    assert (settings.index, settings.index_params, settings.k) == ("hnsw", {"efSearch": 16}, 3)
    seen = {}
    import neuraflux.model.io as io

    monkeypatch.setattr(io, "load_for_inference", lambda *a: (None, None))

    def fake_evaluate(model, tokenizer, world, s):
        seen["retrieval"] = s.retrieval
        raise SystemExit(0)

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    with pytest.raises(SystemExit):
        ev.main(["--model", str(tmp_path / "model")])
    assert seen["retrieval"] == settings
    (tmp_path / "config.yaml").write_text("retrieval:\n  indx: flat\n")
    with pytest.raises(SystemExit, match=r"error: .*config.yaml: unknown retrieval key\(s\) \['indx'\]"):
        ev.main(["--model", str(tmp_path / "model")])
