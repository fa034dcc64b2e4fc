"""`neuraflux chat`: an interactive session with a model in the terminal, with retrieval.

    neuraflux chat --model outputs/full/<time>/multitask --world        # retrieval over the built-in world
    neuraflux chat --model MODEL --docs notes/ README.md                 # over your text and markdown files

Each question is answered in the chat format with the conversation so far (the oldest turns are dropped, with a
notice, when it no longer fits the model's context) and, when a store is given, the retrieved documents as the
context turn; tokens stream as they come, and the sources follow the answer. Commands: /reset, /sources,
/temp X, /help, /quit. Ctrl-C stops an answer and keeps the session; Ctrl-D (or /quit) ends it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

HELP = """commands:
  /reset     forget the conversation
  /sources   the documents the last answer was given
  /temp X    sampling temperature (0: greedy)
  /help      this list
  /quit      end the session (or Ctrl-D); Ctrl-C stops an answer"""


@dataclass
class Session:
    """The conversation, the sampling temperature and the last answer's sources."""

    temperature: float
    messages: list = field(default_factory=list)  # chat.Message, alternating user and assistant
    sources: list = field(default_factory=list)  # retrieval.Hit of the last answer


class Chat:
    def __init__(self, model, tokenizer, retriever=None, k: int = 2, max_new_tokens: int = 128,
                 temperature: float = 0.7, out=sys.stdout, compile: bool = False):  # fmt: skip
        from neuraflux.rag import NanoRAG

        self.model, self.tokenizer, self.out = model, tokenizer, out
        self.window = model.config.max_position_embeddings
        self.max_new_tokens = min(max_new_tokens, self.window // 2)
        self.rag = NanoRAG(model, tokenizer, retriever, k=k) if retriever is not None else None
        self.session = Session(temperature)
        self.compile = compile  # torch.compile'd decode steps (model/generation.py)

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def prompt_ids(self, question: str) -> list[int]:
        """The conversation with `question` as its last turn (and the retrieved context), dropping the oldest
        turns while it does not fit the context with room for an answer."""
        from neuraflux.chat import Message, render_prompt

        s = self.session
        s.messages.append(Message("user", question))
        context, s.sources = None, []
        if self.rag is not None:
            hits = self.rag.retriever.search(question, self.rag.k)
            _, s.sources = self.rag.build_prompt(question, hits, self.max_new_tokens)
            context = self.rag.separator.join(h.text for h in s.sources) or None
        while True:
            ids = self.tokenizer.encode(render_prompt(s.messages, context=context))
            if len(ids) <= self.window - self.max_new_tokens or len(s.messages) == 1:
                break
            del s.messages[:2]  # the oldest question and its answer
            self.say("(the oldest turn was dropped: the conversation no longer fits the model's context)")
        return ids[-(self.window - self.max_new_tokens) :]

    def answer(self, question: str) -> str:
        """Stream the answer to `question`; Ctrl-C stops it (what was written stays in the conversation)."""
        import torch

        from neuraflux.chat import Message
        from neuraflux.model import generate_stream
        from neuraflux.tokenizer import StreamDecoder

        ids = self.prompt_ids(question)
        decoder, pieces = StreamDecoder(self.tokenizer), []
        stops = [self.tokenizer.end_id, self.tokenizer.eos_id]
        try:
            for token, finished in generate_stream(
                self.model, torch.tensor([ids]), self.max_new_tokens,
                temperature=self.session.temperature, eos_token_id=stops, compile=self.compile,
            ):  # fmt: skip
                if bool(finished[0]):
                    break
                piece = decoder.push(int(token[0]))
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
            pieces.append(decoder.flush())
            self.say(pieces[-1])
        except KeyboardInterrupt:
            self.say(" [stopped]")
        text = "".join(pieces).strip()
        self.session.messages.append(Message("assistant", text))
        if self.session.sources:
            self.say(self.sources_text())
        return text

    def sources_text(self) -> str:
        if not self.session.sources:
            return "sources: none" + (" (no store: start with --world or --docs)" if self.rag is None else "")
        lines = [f"  [{h.id}] {h.text[:70].strip()}{'…' if len(h.text) > 70 else ''}  ({h.score:.2f})"
                 for h in self.session.sources]  # fmt: skip
        return "sources:\n" + "\n".join(lines)

    def command(self, line: str) -> bool:
        """Run a /command; False ends the session."""
        name, _, arg = line.partition(" ")
        if name == "/quit":
            return False
        if name == "/reset":
            self.session.messages.clear()
            self.session.sources = []
            self.say("(conversation cleared)")
        elif name == "/sources":
            self.say(self.sources_text())
        elif name == "/temp":
            try:
                value = float(arg)
                if not value >= 0 or value == float("inf"):
                    raise ValueError
            except ValueError:
                self.say(f"/temp takes a number >= 0, got {arg.strip()!r}")
                return True
            self.session.temperature = value
            self.say(f"(temperature {value:g})")
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def run(self, read=input) -> int:
        store = "no retrieval" if self.rag is None else f"retrieval over {len(self.rag.retriever)} chunks"
        self.say(f"neuraflux chat: {store}; /help for commands, Ctrl-D to quit")
        while True:
            try:
                line = read("> ").strip()
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:  # at the prompt: a fresh line, the session goes on
                self.say()
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.answer(line)


def build_store(docs: list[str] | None, world: bool, store: str | None = None):
    """The retrieval store for `--docs PATH...` and/or `--world`, or a saved one (`--store DIR`, from `neuraflux
    index`), or None; ValueError names a bad path. --docs chunks and embeds as conf/retrieval/default.yaml says."""
    if store is not None:
        if docs or world:
            raise ValueError("--store is a saved store: give it alone, not with --docs or --world")
        from neuraflux.retrieval import Retriever

        return Retriever.load(store)
    if not docs and not world:
        return None
    from neuraflux.retrieval.documents import index_documents, load_retrieval_settings

    settings = load_retrieval_settings()
    retriever = index_documents(docs, settings) if docs else settings.retriever()
    if world:
        from neuraflux.world import WorldConfig, generate_world

        documents = generate_world(WorldConfig()).retrieval_documents()
        retriever.add([d.text for d in documents], ids=[d.doc_id for d in documents])
    return retriever
