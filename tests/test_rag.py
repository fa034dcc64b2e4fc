import pytest
import torch

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
