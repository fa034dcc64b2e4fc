"""`neuraflux chat` driven through a pseudo-terminal, as a person types: streaming answers with their sources, the
commands, history dropped with a notice when it outgrows the context, Ctrl-C stopping an answer, Ctrl-D leaving."""

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
