"""`neuraflux chat` driven through a pseudo-terminal, as a person types: streaming answers with their sources, the
commands, history dropped with a notice when it outgrows the context, Ctrl-C stopping an answer, Ctrl-D leaving; and
a model trained to read answering a world question with the number its retrieved document states."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

import pytest
import torch

from neuraflux.model import NanoConfig, NanoLM
from neuraflux.retrieval.documents import chunk_text, document_chunks
from neuraflux.tokenizer import NanoTokenizer
from tests.test_serve_engine import ALPHABET, tiny_lm

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="drives a POSIX pseudo-terminal")


class Terminal:
    """A child process on a pseudo-terminal (it is the session leader, so Ctrl-C reaches it as SIGINT)."""

    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.environ["OMP_NUM_THREADS"] = "1"
            os.execvp(argv[0], argv)
        self.seen = ""  # what came since the last match
        self.log = ""  # everything that came

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Read until `pattern` (a regex) appears in what came since the last match."""
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.seen, re.S)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {pattern!r} in:\n{self.seen[-2000:]}")
            try:
                chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"ended before {pattern!r}:\n{self.seen[-2000:]}") from None
            self.seen += chunk.replace("\r\n", "\n")
            self.log += chunk.replace("\r\n", "\n")
        self.seen = self.seen[match.end() :]
        return match

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_code(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the session did not end")


def chat(model_dir, *args: str) -> Terminal:
    return Terminal([sys.executable, "-m", "neuraflux.cli", "chat", "--model", str(model_dir), *args])


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "kaesrus.md").write_text("# Kaesrus\n\nKaesrus lives in the region of Duskmoor.\n")
    (folder / "zorn.txt").write_text("The tower of Zorn is ninety metres tall.\n")
    (folder / "ignored.bin").write_bytes(b"\xff\x00")
    return folder


def test_a_session_answers_with_sources_and_takes_its_commands(tmp_path, docs):
    model, tok = tiny_lm(max_positions=96)  # greedy: one printable character a token, never a stop token
    model.save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    t = chat(tmp_path / "m", "--docs", str(docs), "--k", "1", "--max-new-tokens", "6", "--temperature", "0")
    t.expect(r"neuraflux chat: retrieval over 2 chunks; /help for commands")
    t.expect(r"> ")
    t.send("where does kaesrus live?\n")
    answer = t.expect(r"where does kaesrus live\?\n(.*?)\nsources:\n  \[(\S+)\] (.*?)  \(")
    assert len(answer[1]) == 6  # streamed, the requested 6 tokens
    assert answer[2].endswith("kaesrus.md#0") and "Kaesrus lives in the region of Duskmoor." in answer[3]
    t.send("/sources\n")
    t.expect(r"sources:\n  \[\S+kaesrus.md#0\]")
    t.send("/temp hot\n")
    t.expect(r"/temp takes a number >= 0, got 'hot'")
    t.send("/temp 0.5\n")
    t.expect(r"\(temperature 0.5\)")
    t.send("/reset\n")
    t.expect(r"\(conversation cleared\)")
    t.send("/sources\n")
    t.expect(r"sources: none")
    t.send("/help\n")
    t.expect(r"/reset +forget the conversation.*/quit")
    t.send("/nope\n")
    t.expect(r"unknown command /nope; /help lists them")
    # the conversation grows past the 96 positions (6 kept free for the answer): the oldest turn goes, with a notice
    t.send("/temp 0\n")
    before = len(t.log)
    for n in range(4):
        t.send(f"tell me about the tower of zorn, part {n}\n")
        t.expect(r"sources:")
    assert "(the oldest turn was dropped: the conversation no longer fits the model's context)" in t.log[before:]
    t.send("\x04")  # Ctrl-D at the prompt
    assert t.exit_code() == 0


def test_ctrl_c_stops_an_answer_and_the_session_goes_on(tmp_path):
    tok = NanoTokenizer.train([ALPHABET], vocab_size=0, mode="char")
    torch.manual_seed(0)
    # wide and deep enough that 2,000 tokens take a while on one thread
    model = NanoLM(NanoConfig(vocab_size=tok.vocab_size, block_size=64, max_position_embeddings=4096, n_layer=6,
                              n_head=4, n_embd=256))  # fmt: skip
    with torch.no_grad():  # no stop token, ever (as tiny_lm): the answer runs until it is stopped
        for i in tok.special_ids | {tok.token_to_id("<|unk|>")}:
            model.transformer.embeddings.token.weight[i].zero_()
    model.save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    t = chat(tmp_path / "m", "--max-new-tokens", "2000", "--temperature", "0")
    t.expect(r"no retrieval; /help for commands")
    t.expect(r"> ")
    t.send("hello\n")
    t.expect(r"hello\n.{5}")  # the answer has begun to stream
    t.send("\x03")  # Ctrl-C
    t.expect(r" \[stopped\]\n> ", timeout=10)
    t.send("/sources\n")  # still in the session
    t.expect(r"sources: none \(no store")
    t.send("/quit\n")
    assert t.exit_code() == 0


def test_documents_are_chunked_with_overlap_and_bad_paths_named(tmp_path, docs):
    text = "\n\n".join(f"paragraph {i} " + "x" * 200 for i in range(6))
    chunks = chunk_text(text, size=500, overlap=50)
    assert all(len(c) <= 500 + 51 for c in chunks) and len(chunks) == 3
    assert chunks[1].startswith(chunks[0][-50:])  # each chunk starts with the end of the one before
    long = chunk_text("y" * 1200, size=500, overlap=100)
    assert [len(c) for c in long][:2] == [500, 500] and long[1].startswith("y" * 100)
    ids, texts = document_chunks([str(docs)])
    assert [i.rsplit("/", 1)[-1] for i in ids] == ["kaesrus.md#0", "zorn.txt#0"]  # .bin is not a document
    with pytest.raises(ValueError, match=r"nope: no such file or folder"):
        document_chunks([str(tmp_path / "nope")])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(byte 3\)"):
        document_chunks([str(tmp_path / "latin1.txt")])


# The smallest training found that reads a number out of the retrieved document: SFT through train(cfg) and the
# real configs (stage=sft, data=sft on debug=tiny's 2 layers, widened to 128 with a 1024-token BPE) on population
# questions about the world's practice cities. The world's whole SFT mix, or 64 wide, reads far less in this time.
READER = [
    "curriculum=none", "stage=sft", "data=sft", "model.n_embd=128", "model.n_head=4", "model.block_size=128",
    "model.vocab_size=1024", "tokenizer.vocab_size=1024", "data.batch_size=16", "optim.lr=3e-3",
    "optim.warmup_steps=20", "trainer.max_steps=600", "trainer.val_check_interval=600",
]  # fmt: skip


def write_reading_pairs(path, world) -> None:
    """SFT records `{prompt, response, context}`: each of the world's practice cities (made-up names in no split,
    store or evaluation) asked its population beside each of its documents, in the world's own question wordings,
    answered with the world's answer sentence. Nothing states these numbers but the context, so only reading it
    answers them."""
    import json

    from neuraflux.world import answer_sentence, schema
    from neuraflux.world.generator import practice_set

    practice = practice_set(world)
    population = schema.KIND_BY_NAME["city"].attribute("population")
    questions = [*population.questions, *(q.replace("{phrase}", population.phrase) for q in schema.GENERIC_QUESTIONS)]
    records = [
        {"prompt": questions[(n + i) % len(questions)].format(name=e.name), "context": doc.text,
         "response": answer_sentence(e, "population")}
        for n, e in enumerate(e for e in practice.entities if e.kind == "city")
        for i, doc in enumerate(practice.documents_of(e.name))
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """(model directory, the world `chat --world` searches, its city population questions, and what the model
    answers them with and without retrieval). The model is trained by train(cfg) on READER's configs: 600 steps on
    the 2,250 reading pairs of write_reading_pairs, about a minute of CPU time for this fixture and test together."""
    from neuraflux.model.io import load_pretrained
    from neuraflux.rag import NanoRAG, world_retriever
    from neuraflux.train import train
    from neuraflux.world import WorldConfig, generate_world, qa_items
    from tests.conftest import compose_cfg

    tmp = tmp_path_factory.mktemp("reader")
    cfg = compose_cfg(tmp, *READER, f"data.path={tmp / 'pairs.jsonl'}")
    # the world chat --world searches (WorldConfig()), with the config's practice set: its names are none of the
    # world's entities
    world = generate_world(WorldConfig(practice_entities=cfg.world.practice_entities))
    write_reading_pairs(tmp / "pairs.jsonl", world)
    train(cfg)
    model, tokenizer = load_pretrained(tmp / "run" / "model")
    items = [it for split in ("seen", "unseen") for it in qa_items(world, split) if it.attribute == "population"]
    rag = NanoRAG(model, tokenizer, world_retriever(world), k=1)
    answers = {
        use: [a.text for a in rag.answer_batch([it.question for it in items], use_retrieval=use, max_new_tokens=24)]
        for use in (True, False)
    }
    return tmp / "run" / "model", world, items, answers


@pytest.mark.slow
def test_a_trained_model_answers_a_world_question_from_the_retrieved_document(reader):
    from neuraflux.world import exact_match

    model_dir, world, items, answers = reader
    read = [exact_match(a, it.answer) for a, it in zip(answers[True], items)]
    guessed = [exact_match(a, it.answer) for a, it in zip(answers[False], items)]
    # every one of the world's 30 city populations is a number the model never saw: with the document it reads
    # at least half of them, without it none (a population is one of 881 round numbers)
    assert sum(read) >= 0.5 * len(items) and not any(guessed), (answers, [it.answer for it in items])
    # the first question it reads, asked in a session over the world's store: the number comes from the entity's
    # document, which the sources show; the same question in a session without a store gets no such number
    item = items[read.index(True)]
    t = chat(model_dir, "--world", "--k", "1", "--max-new-tokens", "24", "--temperature", "0")
    t.expect(r"retrieval over \d+ chunks; /help for commands")
    t.send(item.question + "\n")
    answer = t.expect(re.escape(item.question) + r"\n(.*?)\nsources:\n  \[(\S+)\] (.*?)  \(")
    assert exact_match(answer[1], item.answer)
    doc = next(d for d in world.retrieval_documents() if d.doc_id == answer[2])
    assert doc.entity == item.entity and item.answer in doc.text and answer[3].rstrip("…") in doc.text
    t.send("/reset\n")
    t.expect(r"\(conversation cleared\)")
    t.send("/quit\n")
    assert t.exit_code() == 0
    bare = chat(model_dir, "--max-new-tokens", "24", "--temperature", "0")
    bare.expect(r"no retrieval; /help for commands")
    bare.send(item.question + "\n")
    answer = bare.expect(re.escape(item.question) + r"\n(.*?)\n> ")
    assert not exact_match(answer[1], item.answer)
    bare.send("\x04")
    assert bare.exit_code() == 0
