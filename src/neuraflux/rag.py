"""NanoRAG: the language model plus the retriever, in the chat format's context section."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from neuraflux.chat import Message, escape_special, render_prompt
from neuraflux.model import NanoLM, generate
from neuraflux.retrieval import Hit, Retriever
from neuraflux.retrieval.documents import RetrievalSettings
from neuraflux.tokenizer import NanoTokenizer


@dataclass
class RAGAnswer:
    question: str
    text: str
    sources: list[Hit] = field(default_factory=list)  # the chunks that went into the prompt, best first
    prompt: str = ""


class NanoRAG:
    """Retrieve top-k chunks, fit them into the context budget, generate, return the answer with its sources.

    Context budget rule: the prompt may use `min(block_size, max_position_embeddings - max_new_tokens)` tokens.
    Chunks go in by score, whole, while they fit; the first chunk that does not fit whole is cut to the tokens
    that remain (its beginning kept: a document names its subject first) and lower-ranked chunks are dropped.
    Chunks scoring below `min_score` are never used.
    """

    def __init__(
        self,
        model: NanoLM,
        tokenizer: NanoTokenizer,
        retriever: Retriever,
        k: int = 1,
        min_score: float = 0.0,
        separator: str = "\n",
    ):
        if k <= 0:
            raise ValueError(f"rag.k must be a positive integer, got {k}")
        self.model, self.tokenizer, self.retriever = model, tokenizer, retriever
        self.k, self.min_score, self.separator = k, min_score, separator

    def context_budget(self, max_new_tokens: int) -> int:
        c = self.model.config
        return min(c.block_size, c.max_position_embeddings - max_new_tokens)

    def build_prompt(self, question: str, hits: list[Hit], max_new_tokens: int) -> tuple[str, list[Hit]]:
        """Prompt text and the hits it uses, within the context budget."""
        tok = self.tokenizer
        budget = self.context_budget(max_new_tokens)
        # the context section costs its text plus the <|context|> ... <|end|> wrapper
        bare = len(tok.encode(render_prompt([Message("user", question)], context="x"))) - len(tok.encode("x"))
        if bare > budget:
            raise ValueError(f"the question alone needs {bare} tokens, over the prompt budget of {budget}")
        left = budget - bare
        used, pieces = [], []
        for hit in hits:
            if hit.score < self.min_score or left <= 0:
                break
            sep = tok.encode(self.separator) if pieces else []
            ids = tok.encode(escape_special(hit.text))
            if len(sep) + len(ids) > left:
                ids = ids[: max(0, left - len(sep))]
                if not ids:
                    break
                text = tok.decode(ids)
            else:
                text = hit.text
            pieces.append(text)
            used.append(hit)
            left -= len(sep) + len(ids)
        context = self.separator.join(pieces) if pieces else None
        return render_prompt([Message("user", question)], context=context), used

    @torch.no_grad()
    def answer_batch(
        self,
        questions: list[str],
        use_retrieval: bool = True,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> list[RAGAnswer]:
        tok = self.tokenizer
        if use_retrieval:
            if len(self.retriever) == 0:
                raise ValueError("NanoRAG: the retriever's store is empty; add documents before asking with retrieval")
            all_hits = self.retriever.search_batch(questions, self.k)
        else:
            all_hits = [[] for _ in questions]
        prompts, sources = [], []
        for q, hits in zip(questions, all_hits):
            if use_retrieval:
                text, used = self.build_prompt(q, hits, max_new_tokens)
            else:
                text, used = render_prompt([Message("user", q)]), []
            prompts.append(text)
            sources.append(used)
        ids, mask = tok.pad_batch(tok.encode_batch(prompts), padding_side="left")
        device = self.model.lm_head.weight.device
        out = generate(
            self.model,
            ids.to(device),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=[tok.end_id, tok.eos_id],
            attention_mask=mask.to(device),
            generator=generator,
        )
        texts = [tok.decode(row[ids.shape[1] :].tolist(), skip_special_tokens=True).strip() for row in out]
        return [RAGAnswer(q, t, s, p) for q, t, s, p in zip(questions, texts, sources, prompts)]

    def answer(self, question: str, **kwargs) -> RAGAnswer:
        return self.answer_batch([question], **kwargs)[0]


def world_retriever(world, settings: RetrievalSettings | None = None) -> Retriever:
    """A retriever over every document of the world (secret ones included: the model must learn to withhold), with
    the embedder and index that `settings` (the `retrieval` config group; None: its defaults) name. Each document is
    one entry, not chunked: the world's documents are a few sentences, and SFT trains on them whole."""
    retriever = (settings if settings is not None else RetrievalSettings()).retriever()
    docs = world.retrieval_documents()
    retriever.add([d.text for d in docs], ids=[d.doc_id for d in docs])
    return retriever


def add_retrieved_context(prompts: list[str], retriever: Retriever) -> list[str]:
    """Rendered chat prompts, each one without a context turn given the retriever's top chunk for its question as
    context (one batched search); prompts that carry a context are returned as they are."""
    from neuraflux.chat import context_of
    from neuraflux.world.generator import question_text

    bare = [i for i, p in enumerate(prompts) if context_of(p) is None]
    out = list(prompts)
    if not bare:
        return out
    hits = retriever.search_batch([question_text(prompts[i]) for i in bare], 1)
    for i, h in zip(bare, hits, strict=True):
        out[i] = render_prompt([Message("user", question_text(prompts[i]))], context=h[0].text if h else None)
    return out
