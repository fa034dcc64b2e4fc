"""`neuraflux index` and the retrieval settings (conf/retrieval): a store built from files that chat, generate and
serve load, and each bad setting or path refused in one line."""

import json

import pytest

from neuraflux.cli import main
from neuraflux.retrieval import RetrievalError, Retriever
from neuraflux.retrieval.documents import RetrievalSettings, load_retrieval_settings


def docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "zorn.md").write_text("# Zorn\n\nThe tower of Zorn is 212 metres tall.\n\nIt was built in 1650.\n")
    (folder / "sub" / "bread.txt").write_text("Bread is baked at dawn in the village of Oll.\n")
    (folder / "skip.bin").write_bytes(b"\x00\x01")  # not a text suffix: left out
    return folder


def test_index_writes_a_store_that_retrieves_the_right_chunk(tmp_path, capsys):
    folder = docs(tmp_path)
    out = tmp_path / "store"
    assert main(["index", str(folder), "--out", str(out), "index=hnsw", "chunk_chars=60", "overlap_chars=10"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 3 chunks of 2 files (hnsw index, lexical embedder)")
    assert json.loads((out / "manifest.json").read_text())["index"]["kind"] == "hnsw"
    store = Retriever.load(out)
    # "# Zorn" + "The tower ..." fit in 60 characters; the next paragraph starts a chunk with the last 10 of it
    assert store.search("how tall is the tower of Zorn?", 1)[0].id == f"{folder / 'zorn.md'}#0"
    assert store.search("where is bread baked?", 1)[0].id == f"{folder / 'sub' / 'bread.txt'}#0"
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        main(["index", str(folder), "--out", str(out)])


@pytest.mark.parametrize(
    "override, message",
    [
        ("colour=red", r"unknown retrieval key\(s\) \['colour'\]"),
        ("index=annoy", "retrieval.index must be one of flat, ivf, hnsw, got 'annoy'"),
        ("overlap_chars=700", r"retrieval.overlap_chars must be an integer in \[0, chunk_chars=600\), got 700"),
        ("k=0", "retrieval.k must be a positive integer, got 0"),
        ("embedder.type=word2vec", "embedder config needs 'type'"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_before_anything_is_written(tmp_path, override, message):
    with pytest.raises(SystemExit, match=f"error: .*{message}"):
        main(["index", str(docs(tmp_path)), "--out", str(tmp_path / "store"), override])
    assert not (tmp_path / "store").exists()


def test_index_names_a_missing_path_and_needs_one(tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*nope: no such file or folder"):
        main(["index", str(tmp_path / "nope"), "--out", str(tmp_path / "store")])
    with pytest.raises(SystemExit, match="no files or folders to index"):
        main(["index", "k=3", "--out", str(tmp_path / "store")])


def test_a_settings_file_sets_what_it_names_and_the_command_line_overrides_it(tmp_path):
    assert load_retrieval_settings() == RetrievalSettings()  # the shipped file changes nothing
    (tmp_path / "r.yaml").write_text("index: hnsw\nk: 4\n")
    assert load_retrieval_settings(["k=3"], tmp_path / "r.yaml") == RetrievalSettings(index="hnsw", k=3)
    with pytest.raises(RetrievalError, match="retrieval.chunk_chars must be a positive integer"):
        load_retrieval_settings(["chunk_chars=0"])


def test_generate_and_chat_read_a_saved_store(tmp_path, capsys, decoded_prompts):
    from neuraflux.chat import Message, render_prompt
    from tests.test_serve_engine import tiny_lm

    model, tok = tiny_lm()
    model.save_pretrained(tmp_path / "m", tok)
    folder = docs(tmp_path)
    assert main(["index", str(folder), "--out", str(tmp_path / "store")]) == 0
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "how tall is Zorn?", "--max-new-tokens", "2"]
    assert main([*args, "--chat", "--store", str(tmp_path / "store"), "--k", "1"]) == 0
    top = Retriever.load(tmp_path / "store").search("how tall is Zorn?", 1)[0]
    assert top.id.endswith("zorn.md#0")
    # the top chunk is the context turn (cut to what the tiny model's 64-token window leaves: its start)
    full = tok.encode(render_prompt([Message("user", "how tall is Zorn?")], context=top.text))
    # (the tiny model's character vocabulary has no capitals: they decode as replacement characters)
    assert "he tower of" in tok.decode(decoded_prompts[0]) and len(decoded_prompts[0]) < len(full)
    assert f"source [{top.id}]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--store is a saved store: give it alone"):
        main([*args, "--chat", "--store", str(tmp_path / "store"), "--world"])
    with pytest.raises(SystemExit, match=r"error: corrupt store: .*docs is missing manifest.json"):
        main([*args, "--chat", "--store", str(folder)])


def test_serve_puts_the_settings_k_documents_in_a_prompt_unless_it_sets_its_own():
    from neuraflux.serve import ServeConfig, create_app
    from tests.test_serve_engine import tiny_lm

    model, tok = tiny_lm()
    store = Retriever()
    store.add(["Bread is baked at dawn.", "The tower of Zorn is tall.", "Oll is a village."])
    assert create_app(ServeConfig(), model, tok, store, model_name="m").state.serve.rag.k == RetrievalSettings.k
    assert create_app(ServeConfig(retrieval_k=1), model, tok, store, model_name="m").state.serve.rag.k == 1
