import pytest
import torch
from omegaconf import OmegaConf

from neuraflux.chat import CONTEXT, END
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.rag import NanoRAG, world_retriever
from neuraflux.retrieval import Hit, Retriever
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import WorldConfig, generate_world

DOCS = ["Vorlak lives in Brimsa.", "The river Ombra is green.", "Tessa founded Kelvash in 1204."]


@pytest.fixture
def rag():
    tok = NanoTokenizer.train(DOCS + ["Where does Vorlak live? abcdefghijklmnopqrstuvwxyz"], 0, mode="char")
    torch.manual_seed(0)
    cfg = NanoConfig(vocab_size=80, block_size=64, max_position_embeddings=96, n_layer=1, n_head=2, n_embd=16)
    retriever = Retriever()
    retriever.add(DOCS, ids=["a", "b", "c"])
    return NanoRAG(NanoLM(cfg).eval(), tok, retriever, k=2)


def test_budget_keeps_whole_chunks_then_cuts_the_next(rag):
    q = "Where?"
    # char tokenizer: 1 token a character. Budget = min(block 64, 96 - 40) = 56.
    # bare prompt: <|bos|><|context|><|end|><|user|>Where?<|end|><|assistant|> = 6 specials + 6 chars = 12 -> 44 left
    hits = [Hit("a", 0.9, DOCS[0]), Hit("b", 0.5, DOCS[1])]
    prompt, used = rag.build_prompt(q, hits, max_new_tokens=40)
    # first chunk whole (23), separator 1, then 44 - 24 = 20 tokens of the second chunk
    assert [h.id for h in used] == ["a", "b"]
    context = prompt.split(CONTEXT)[1].split(END)[0]
    assert context == DOCS[0] + "\n" + DOCS[1][:20]
    assert len(rag.tokenizer.encode(prompt)) == 56


def test_low_scores_are_not_used(rag):
    rag.min_score = 0.6
    prompt, used = rag.build_prompt("Where?", [Hit("a", 0.9, DOCS[0]), Hit("b", 0.5, DOCS[1])], 40)
    assert [h.id for h in used] == ["a"] and DOCS[1] not in prompt


def test_answer_returns_sources_best_first(rag):
    ans = rag.answer("Where does Vorlak live?", max_new_tokens=8)
    assert ans.sources[0].id == "a" and ans.sources[0].score >= ans.sources[1].score
    assert DOCS[0] in ans.prompt
    plain = rag.answer("Where does Vorlak live?", use_retrieval=False, max_new_tokens=8)
    assert plain.sources == [] and CONTEXT not in plain.prompt


def test_empty_store_and_bad_k(rag):
    rag.retriever = Retriever()
    with pytest.raises(ValueError, match="store is empty"):
        rag.answer("x")
    with pytest.raises(ValueError, match="rag.k must be a positive integer"):
        NanoRAG(rag.model, rag.tokenizer, rag.retriever, k=0)


def test_world_retriever_indexes_every_document():
    world = generate_world(WorldConfig(n_entities=20))
    r = world_retriever(world)
    assert len(r) == len(world.retrieval_documents())
    doc = world.retrieval_documents()[3]
    assert r.search(doc.text, 1)[0].id == doc.doc_id


def test_the_default_retrieval_group_builds_the_world_store_as_before(tmp_path):
    # the default curriculum's numbers must not move: the composed `retrieval` group builds the store the fixed code
    # built (lexical embedder, exact search), so every question finds the same documents with the same scores
    from neuraflux.eval import EvalSettings
    from neuraflux.retrieval import LexicalEmbedder
    from neuraflux.retrieval.documents import retrieval_settings
    from neuraflux.world import qa_items
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, tiny=False)
    settings = retrieval_settings(cfg.retrieval)
    assert EvalSettings().retrieval == settings  # what the curriculum's evaluation and report build
    world = generate_world(WorldConfig.from_dict(OmegaConf.to_container(cfg.world, resolve=True)))
    docs = world.retrieval_documents()
    before = Retriever(LexicalEmbedder(), "flat")
    before.add([d.text for d in docs], ids=[d.doc_id for d in docs])
    now = world_retriever(world, settings)
    assert now.embedder.to_config() == before.embedder.to_config()
    assert (now.index.kind, now.index.params) == ("flat", {})
    questions = [it.question for split in ("seen", "unseen", "unknown") for it in qa_items(world, split)]
    assert len(questions) > 300
    assert now.search_batch(questions, 5) == before.search_batch(questions, 5)


def test_the_retrieval_group_reaches_the_reward_stages_store(tiny_cfg):
    from hydra.utils import instantiate

    cfg = tiny_cfg("stage=reward", "retrieval.index=hnsw", "+retrieval.index_params.efSearch=16")
    data = instantiate(cfg.data)
    assert (data.retriever.index.kind, data.retriever.index.params["efSearch"]) == ("hnsw", 16)
    world = generate_world(WorldConfig.from_dict(OmegaConf.to_container(cfg.world, resolve=True)))
    assert data.retriever.ids == tuple(d.doc_id for d in world.retrieval_documents())


def test_the_curriculums_evaluation_builds_its_store_from_the_retrieval_group(tiny_cfg, tmp_path, monkeypatch):
    import neuraflux.eval
    from neuraflux.curriculum import evaluate_model
    from tests.test_serve_engine import tiny_lm

    model, tok = tiny_lm()
    model.save_pretrained(tmp_path / "m", tok)
    given = []
    monkeypatch.setattr(neuraflux.eval, "evaluate", lambda model, tokenizer, world, settings: given.append(settings))
    evaluate_model(tiny_cfg("retrieval.index=hnsw"), tmp_path / "m", tmp_path)
    assert given[0].retrieval.index == "hnsw" and given[0].k == 1  # the evaluation's own k: SFT reads one document


def test_a_reward_model_scores_with_the_store_it_was_trained_with(tiny_cfg, tmp_path):
    # stage=reward gives context-less prompts the world store's top document; PPO and the report, scoring with the
    # exported model, rebuild that store from the settings it records
    from neuraflux.feedback.rewards import reward_model_reward
    from neuraflux.model.reward import NanoRewardModel
    from neuraflux.train import train

    cfg = tiny_cfg("curriculum=none", "stage=reward", "retrieval.index=hnsw", "+retrieval.index_params.efSearch=16")
    _, objects = train(cfg)
    model = NanoRewardModel.from_pretrained(tmp_path / "run" / "model")
    assert model.retrieve_context and model.retrieval["index"] == "hnsw"
    world = OmegaConf.to_container(cfg.world, resolve=True)
    scorer = reward_model_reward(model, objects["tokenizer"], world)
    assert (scorer.retriever.index.kind, scorer.retriever.index.params["efSearch"]) == ("hnsw", 16)
    model.retrieval = None  # a reward model saved before the settings were recorded: the defaults, as then
    assert reward_model_reward(model, objects["tokenizer"], world).retriever.index.kind == "flat"
