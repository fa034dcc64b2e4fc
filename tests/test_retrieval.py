"""Retrieval: embedders, indexes, the Retriever's search/save/load, and one clear error per bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuraflux.retrieval import (
    BackboneEmbedder,
    Embedder,
    LexicalEmbedder,
    RetrievalError,
    Retriever,
    build_embedder,
    build_index,
    read_index,
    recall_at_k,
)
from neuraflux.retrieval import index as index_module
from neuraflux.retrieval.synthetic import synthetic_chunks, synthetic_queries

SMALL = LexicalEmbedder(dim=1024)  # small rows keep every test fast; dim matters little for these stores


def cosine(embedder: Embedder, a: str, b: str) -> float:
    rows = embedder.embed([a, b])
    return float(rows[0] @ rows[1])


def small_store(kind: str = "flat", n: int = 60, **params) -> Retriever:
    store = Retriever(SMALL, kind, **params)
    store.add(synthetic_chunks(n, seed=3, vocab_size=800))
    return store


# ---- LexicalEmbedder ------------------------------------------------------------------------------------------
def test_lexical_word_cosine_is_the_bag_of_words_cosine():
    # Words only, in 2**18 buckets so the handful of features here do not collide.
    words = LexicalEmbedder(dim=2**18, word_ngrams=(1, 1), word_weight=1.0)
    # {alpha, beta} vs {alpha, gamma}: one shared of two each -> 1 / (sqrt 2 * sqrt 2) = 0.5
    assert cosine(words, "alpha beta", "alpha gamma") == pytest.approx(0.5, abs=1e-6)
    assert cosine(words, "alpha beta", "beta alpha") == pytest.approx(1.0, abs=1e-6)
    assert cosine(words, "Alpha BETA", "alpha beta") == pytest.approx(1.0, abs=1e-6)  # lowercased
    bigrams = LexicalEmbedder(dim=2**18, word_ngrams=(1, 2), word_weight=1.0)
    # {alpha, beta, "alpha beta"} vs {beta, alpha, "beta alpha"}: 2 shared of 3 each -> 2/3
    assert cosine(bigrams, "alpha beta", "beta alpha") == pytest.approx(2 / 3, abs=1e-6)


def test_lexical_mix_is_the_weighted_sum_of_word_and_char_cosines():
    a, b = "retrieval augmented generation", "retrieving generated augmentations"
    word = cosine(LexicalEmbedder(dim=2**18, word_weight=1.0), a, b)
    char = cosine(LexicalEmbedder(dim=2**18, word_weight=0.0), a, b)
    mixed = cosine(LexicalEmbedder(dim=2**18, word_weight=0.25), a, b)
    assert word == pytest.approx(0.0, abs=1e-6)  # no word in common
    assert char > 0.2  # but many character n-grams ("retriev", "augment", "generat")
    assert mixed == pytest.approx(0.25 * word + 0.75 * char, abs=1e-3)


def test_lexical_rows_are_unit_float32_and_empty_text_is_a_zero_row():
    rows = SMALL.embed(["one text", "another, longer text here", ""])
    assert rows.dtype == np.float32 and rows.shape == (3, 1024)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), [1.0, 1.0, 0.0], atol=1e-6)
    assert isinstance(SMALL, Embedder)


def test_embedder_config_round_trips_through_json():
    embedder = LexicalEmbedder(dim=512, word_ngrams=(1, 3), char_ngrams=(2, 4), word_weight=0.7, max_chars=100)
    rebuilt = build_embedder(json.loads(json.dumps(embedder.to_config())))
    assert rebuilt == embedder
    texts = ["the same rows", "after a round trip"]
    np.testing.assert_array_equal(rebuilt.embed(texts), embedder.embed(texts))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"type": "tfidf"}, "embedder config needs 'type', one of ['backbone', 'lexical']"),
        ({"dim": 8}, "embedder config needs 'type'"),
        ({"type": "lexical", "dims": 8}, "unknown keys ['dims']"),
        ({"type": "lexical", "dim": 0}, "LexicalEmbedder.dim must be a positive integer, got 0"),
        ({"type": "lexical", "char_ngrams": [5, 3]}, "LexicalEmbedder.char_ngrams must be a pair"),
        ({"type": "lexical", "word_weight": 1.5}, "LexicalEmbedder.word_weight must be in [0, 1], got 1.5"),
    ],
)
def test_bad_embedder_config_is_named(config, message):
    with pytest.raises(RetrievalError, match=re.escape(message)):
        build_embedder(config)


# ---- Retriever: search -------------------------------------------------------------------------------------------
def test_exact_self_queries_find_themselves():
    store = small_store()
    texts = synthetic_chunks(60, seed=3, vocab_size=800)  # the store's own texts, as queries
    assert recall_at_k(store, texts, list(store.ids), k=1) == 1.0
    top = store.search(texts[7], 1)[0]
    assert top.id == "7" and top.score == pytest.approx(1.0, abs=1e-5)  # unit rows: a text's cosine with itself


def test_lexical_retrieval_finds_the_document_sharing_rare_words():
    docs = {
        "harbor": "The harbor office opens at nine and closes at five every day of the week.",
        "library": "The library opens at nine and closes at five, except on the day of the festival.",
        "museum": "The museum of the city opens at ten and closes at six on every day of the week.",
        "vault": "Quillfeather Bank keeps the obsidian ledger in its vault.",
        "bakery": "The bakery in the square sells bread and cakes from early in the morning.",
    }
    store = Retriever()
    store.add(list(docs.values()), ids=list(docs))
    assert store.search("Who keeps the obsidian ledger?", 1)[0].id == "vault"
    # misspelt rare word: character n-grams still match it where whole words cannot
    assert store.search("which bank is quilfether", 1)[0].id == "vault"
    assert store.search("when does the harbor open", 1)[0].id == "harbor"


def test_hits_are_sorted_and_k_past_the_store_size_returns_every_text():
    store = Retriever(SMALL)
    store.add(["red apples", "green apples and pears", "blue sky"])
    hits = store.search("apples", 10)
    assert [h.id for h in hits][:2] == ["0", "1"] and len(hits) == 3
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    batch = store.search_batch(["apples", "sky"], 1)
    assert [[h.id for h in hits] for hits in batch] == [["0"], ["2"]]


def test_recall_at_k_counts_queries_whose_gold_id_is_in_the_top_k():
    store = Retriever(SMALL)
    store.add(["alpha alpha alpha", "beta beta beta", "gamma gamma gamma"])
    # queries 0 and 1 find their gold text first; query 2's gold "0" is not the top hit ("gamma") -> 2/3
    assert recall_at_k(store, ["alpha", "beta", "gamma"], ["0", "1", "0"], k=1) == pytest.approx(2 / 3)
    assert recall_at_k(store, ["alpha", "beta", "gamma"], ["0", "1", "0"], k=3) == 1.0


def test_approximate_indexes_agree_with_exact_search_on_top1():
    chunks = synthetic_chunks(300, seed=1, vocab_size=2000)
    queries = synthetic_queries(chunks, 100, seed=2, words=8).queries
    top1 = {}
    for kind, params in [
        ("flat", {}),
        ("ivf", {"nlist": 8, "nprobe": 4}),
        ("hnsw", {"M": 16, "efSearch": 64}),
    ]:
        store = Retriever(SMALL, kind, **params)
        store.add(chunks)
        top1[kind] = [hits[0].id for hits in store.search_batch(queries, 1)]
    agree = {kind: np.mean([a == b for a, b in zip(top1["flat"], top1[kind])]) for kind in ("ivf", "hnsw")}
    # measured: ivf 0.92 (4 of 8 cells scanned), hnsw 0.95; the 8-word queries often tie closely between chunks
    assert agree["ivf"] >= 0.85, agree
    assert agree["hnsw"] >= 0.90, agree


# ---- Retriever: save and load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, params", [("flat", {}), ("ivf", {"nlist": 8, "nprobe": 3}), ("hnsw", {"M": 8})])
def test_save_load_round_trip_gives_identical_hits_and_ids(tmp_path, kind, params):
    store = small_store(kind=kind, n=50, **params)
    store.add(["an extra text about harbours", "and one about ledgers"], ids=["doc-a", "doc-b"])
    queries = synthetic_queries(synthetic_chunks(50, seed=3, vocab_size=800), 10, seed=4).queries + ["ledgers"]
    store.save(tmp_path / "store")
    loaded = Retriever.load(tmp_path / "store")
    assert loaded.ids == store.ids and len(loaded) == 52
    assert loaded.index.kind == kind and loaded.index.params == store.index.params
    assert loaded.search_batch(queries, 5) == store.search_batch(queries, 5)
    # running ids continue from the store's size on both sides
    assert loaded.add(["one more"]) == store.add(["one more"]) == ["52"]


def test_saving_over_a_store_replaces_it_and_leaves_no_temporary_directories(tmp_path):
    store = Retriever(SMALL)
    store.add(["first version"])
    store.save(tmp_path / "store")
    store.add(["second text"])
    store.save(tmp_path / "store")
    assert len(Retriever.load(tmp_path / "store")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_failed_save_leaves_the_existing_store_untouched(tmp_path, monkeypatch):
    store = Retriever(SMALL)
    store.add(["kept text"], ids=["kept"])
    store.save(tmp_path / "store")
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}

    def full_disk(self, path):
        raise OSError("No space left on device")

    store.add(["new text"])
    monkeypatch.setattr(index_module.VectorIndex, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.save(tmp_path / "store")
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # the temporary directory is gone
    assert Retriever.load(tmp_path / "store").ids == ("kept",)


def test_save_refuses_to_overwrite_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    store = Retriever(SMALL)
    store.add(["text"])
    with pytest.raises(RetrievalError, match="refusing to overwrite .*notes: it exists and is not a retrieval store"):
        store.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# ---- bad input: one clear error each ------------------------------------------------------------------------------
def test_query_longer_than_the_embedder_accepts():
    store = Retriever(LexicalEmbedder(dim=256, max_chars=20))
    store.add(["short text"])
    with pytest.raises(RetrievalError, match=r"query is 21 characters long; the lexical embedder accepts at most 20"):
        store.search("x" * 21, 1)
    with pytest.raises(RetrievalError, match=r"queries\[1\] is 25 characters long"):
        store.search_batch(["fine", "y" * 25], 1)
    assert len(store.search("x" * 20, 1)) == 1  # exactly max_chars is accepted


def test_search_on_an_empty_store():
    for kind in ("flat", "ivf", "hnsw"):
        with pytest.raises(RetrievalError, match="search on an empty store: add\\(\\) texts first"):
            Retriever(SMALL, kind).search("anything", 3)


@pytest.mark.parametrize("k", [0, -2, 1.5, True])
def test_k_must_be_a_positive_integer(k):
    store = Retriever(SMALL)
    store.add(["text"])
    with pytest.raises(RetrievalError, match=re.escape(f"k must be a positive integer, got {k!r}")):
        store.search("text", k)


def test_add_rejects_bad_texts_and_ids_before_changing_the_store():
    store = Retriever(SMALL)
    store.add(["zero", "one"])
    cases = [
        ((["a", "b", "c"], ["x", "y"]), "add() got 3 texts but 2 ids; give one id per text"),
        ((["a", "b"], ["x", "x"]), "duplicate id 'x' (ids[1]) is given twice"),
        ((["a"], ["1"]), "duplicate id '1' (ids[0]) is already in the store"),
        ((["a", "  "],), "texts[1] is empty"),
        (("a single string",), "texts must be a list of strings, got str"),
        ((["a"], [7]), "ids[0] must be a string, got int 7"),
    ]
    for args, message in cases:
        with pytest.raises(RetrievalError, match=re.escape(message)):
            store.add(*args)
    assert store.ids == ("0", "1")


def test_ivf_needs_at_least_nlist_texts_in_its_first_add():
    store = Retriever(SMALL, "ivf", nlist=16)
    with pytest.raises(RetrievalError, match="nlist=16 .* needs at least 16 of them, got 5"):
        store.add([f"text number {i}" for i in range(5)])
    assert len(store) == 0
    store.add([f"text number {i}" for i in range(16)])
    assert len(store) == 16


@pytest.mark.parametrize(
    "kind, params, message",
    [
        ("annoy", {}, "unknown index kind 'annoy'; choose one of ['flat', 'hnsw', 'ivf']"),
        (
            "ivf",
            {"nprobes": 2},
            "index 'ivf' has no settings ['nprobes']; its settings are ['nlist', 'nprobe']",
        ),
        ("hnsw", {"M": 0}, "index 'hnsw': M must be a positive integer, got 0"),
    ],
)
def test_bad_index_settings_are_named(kind, params, message):
    with pytest.raises(RetrievalError, match=re.escape(message)):
        build_index(kind, 8, **params)


@pytest.fixture
def saved(tmp_path) -> Path:
    store = Retriever(SMALL)
    store.add(["first text", "second text", "third text"])
    return store.save(tmp_path / "store")


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_loading_with_another_embedder_than_the_store_was_built_with(saved):
    with pytest.raises(
        RetrievalError, match="built with another embedder than requested .*dim: store 1024 vs requested 2048"
    ):
        Retriever.load(saved, embedder=LexicalEmbedder(dim=2048))
    with pytest.raises(RetrievalError, match="word_weight: store 0.5 vs requested 0.9"):
        Retriever.load(saved, embedder=LexicalEmbedder(dim=1024, word_weight=0.9))
    assert len(Retriever.load(saved, embedder=LexicalEmbedder(dim=1024))) == 3


def test_manifest_dim_that_disagrees_with_the_index(saved):
    edit_json(saved / "manifest.json", lambda m: m.update(dim=512))
    with pytest.raises(RetrievalError, match="manifest.json declares dim 512 but .*index.faiss has d=1024"):
        Retriever.load(saved)


def test_embedder_config_that_disagrees_with_the_declared_dim(saved):
    edit_json(saved / "manifest.json", lambda m: m["embedder"].update(dim=512))
    with pytest.raises(RetrievalError, match="declares dim 1024 but the lexical embedder gives 512"):
        Retriever.load(saved)


@pytest.mark.parametrize("name", ["manifest.json", "docs.json", "index.faiss"])
def test_store_with_a_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(RetrievalError, match=f"corrupt store: .*store is missing {name}"):
        Retriever.load(saved)


def test_truncated_index_file(saved):
    data = (saved / "index.faiss").read_bytes()
    (saved / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(RetrievalError, match=f"index.faiss \\({len(data) // 2} bytes\\) does not match the checksum"):
        Retriever.load(saved)
    # and FAISS's own read error, should a damaged file get that far, comes back as a RetrievalError too
    with pytest.raises(RetrievalError, match="index.faiss: not a readable FAISS index \\(.*read error"):
        read_index(saved / "index.faiss")


def test_docs_count_that_disagrees_with_the_manifest(saved):
    edit_json(saved / "docs.json", lambda d: (d["ids"].pop(), d["texts"].pop()))
    with pytest.raises(RetrievalError, match="docs.json holds 2 ids and 2 texts but manifest.json count is 3"):
        Retriever.load(saved)


def test_docs_count_that_disagrees_with_the_index(saved):
    edit_json(saved / "docs.json", lambda d: (d["ids"].pop(), d["texts"].pop()))
    edit_json(saved / "manifest.json", lambda m: m.update(count=2))
    with pytest.raises(RetrievalError, match="index.faiss holds 3 vectors but docs.json has 2 texts"):
        Retriever.load(saved)


def test_manifest_that_is_not_json(saved):
    (saved / "manifest.json").write_text('{\n  "format": "neuraflux-retrieval",\n  oops\n}')
    with pytest.raises(RetrievalError, match="manifest.json line 3: Expecting property name"):
        Retriever.load(saved)


def test_index_module_without_faiss_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    spec = importlib.util.spec_from_file_location("index_without_faiss", index_module.__file__)
    with pytest.raises(ImportError, match="install the package faiss-cpu"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# ---- BackboneEmbedder ----------------------------------------------------------------------------------------------
TEXTS = ["the harbor opens at nine", "ledgers", "a much longer text about the museum of the city"]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    from neuraflux.model import NanoConfig, NanoLM
    from neuraflux.tokenizer import NanoTokenizer

    tokenizer = NanoTokenizer.train(TEXTS + ["xyz query words"], vocab_size=0, mode="char")
    torch.manual_seed(0)
    config = NanoConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, n_embd=16, pad_token_id=tokenizer.pad_id)
    model = NanoLM(config)
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    tokenizer.save(directory / "tokenizer.json")
    return directory


def test_backbone_row_is_the_normalised_mean_of_hidden_states(model_dir):
    embedder = BackboneEmbedder.from_pretrained(model_dir)
    rows = embedder.embed(TEXTS)
    assert rows.shape == (3, 16) and rows.dtype == np.float32 and embedder.dim == 16
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)
    ids = torch.tensor([embedder.tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        mean = embedder.model.transformer(ids, torch.ones_like(ids, dtype=torch.bool))[0].mean(0)  # (C,)
    np.testing.assert_allclose(rows[0], (mean / mean.norm()).numpy(), atol=1e-5)
    # right padding: a text's row does not depend on the longer texts batched with it
    np.testing.assert_allclose(embedder.embed([TEXTS[1]])[0], rows[1], atol=1e-5)


def test_backbone_truncates_long_texts_to_their_first_tokens(model_dir, caplog):
    embedder = BackboneEmbedder.from_pretrained(model_dir, max_tokens=8)
    assert embedder.max_chars == 8  # the character tokenizer gives one token per character
    with caplog.at_level(logging.WARNING, logger="neuraflux.retrieval.embedders"):
        long_row = embedder.embed([TEXTS[2]])
    assert "1 of 1 texts exceed max_tokens=8" in caplog.text
    np.testing.assert_allclose(long_row, embedder.embed([TEXTS[2][:8]]), atol=1e-6)


def test_backbone_leaves_the_model_in_training_mode(model_dir):
    embedder = BackboneEmbedder.from_pretrained(model_dir)
    embedder.model.train()
    embedder.embed(TEXTS)
    assert embedder.model.training


def test_backbone_store_round_trip_rebuilds_the_embedder_from_its_model_dir(model_dir, tmp_path):
    store = Retriever(BackboneEmbedder.from_pretrained(model_dir))
    store.add(TEXTS, ids=["harbor", "ledgers", "museum"])
    store.save(tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["embedder"]["model_dir"] == str(model_dir.resolve()) and manifest["dim"] == 16
    loaded = Retriever.load(tmp_path / "store")
    assert isinstance(loaded.embedder, BackboneEmbedder)
    assert loaded.search_batch(TEXTS, 3) == store.search_batch(TEXTS, 3)
    assert [hits[0].id for hits in loaded.search_batch(TEXTS, 1)] == ["harbor", "ledgers", "museum"]


def test_backbone_store_fails_to_load_after_its_model_changed(model_dir, tmp_path):
    from neuraflux.model import NanoLM

    store = Retriever(BackboneEmbedder.from_pretrained(model_dir))
    store.add(TEXTS)
    store.save(tmp_path / "store")
    model = NanoLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(0.1)  # "trained further" and saved to the same directory
    model.save_pretrained(model_dir)
    with pytest.raises(RetrievalError, match="built with another embedder than requested .*fingerprint: store"):
        Retriever.load(tmp_path / "store")


def test_backbone_from_an_in_memory_model_cannot_be_saved(model_dir, tmp_path):
    loaded = BackboneEmbedder.from_pretrained(model_dir)
    store = Retriever(BackboneEmbedder(loaded.model, loaded.tokenizer))
    store.add(TEXTS)
    with pytest.raises(RetrievalError, match="in-memory model.*BackboneEmbedder.from_pretrained"):
        store.save(tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_backbone_window_is_bounded_by_the_block_size(model_dir):
    with pytest.raises(RetrievalError, match="max_tokens \\(65\\) must be <= the model's block_size \\(64\\)"):
        BackboneEmbedder.from_pretrained(model_dir, max_tokens=65)
