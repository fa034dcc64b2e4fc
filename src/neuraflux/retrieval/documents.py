"""From documents to a store: the retrieval settings (conf/retrieval), chunking text files, and building a store.

    neuraflux index docs/ notes.md --out store/                     # conf/retrieval/default.yaml's settings
    neuraflux index docs/ --out store/ index=hnsw chunk_chars=400   # key=value overrides

`chat`, `generate --chat` and `serve retrieval=DIR` load such a store; `--docs` builds the same store in memory
with the same settings. The training config composes the same group (`python train.py retrieval.index=hnsw`): its
world store, for evaluation and the reward stage's retrieved context, is built as it says (`rag.world_retriever`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from neuraflux.paths import conf_file
from neuraflux.retrieval.embedders import build_embedder
from neuraflux.retrieval.errors import RetrievalError
from neuraflux.retrieval.index import INDEX_DEFAULTS, resolve_index_params
from neuraflux.retrieval.retriever import Retriever

DEFAULT_SETTINGS = conf_file("retrieval", "default.yaml")
DOC_SUFFIXES = (".txt", ".md", ".markdown", ".rst")


@dataclass(frozen=True)
class RetrievalSettings:
    """How documents become a store and how many are retrieved: conf/retrieval/default.yaml, then overrides."""

    embedder: dict[str, Any] = field(default_factory=lambda: {"type": "lexical"})  # retrieval.embedders' config
    index: str = "flat"  # flat (exact), ivf or hnsw (approximate; retrieval/index.py)
    index_params: dict[str, int] = field(default_factory=dict)  # e.g. {nlist: 64, nprobe: 8} for ivf
    k: int = 2  # documents put in a prompt's context turn
    chunk_chars: int = 600  # a chunk of a document: paragraphs joined up to about this many characters
    overlap_chars: int = 100  # the end of one chunk repeated at the start of the next: a split fact is kept

    def __post_init__(self) -> None:
        for name in ("k", "chunk_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RetrievalError(f"retrieval.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.overlap_chars, int) or not 0 <= self.overlap_chars < self.chunk_chars:
            raise RetrievalError(
                f"retrieval.overlap_chars must be an integer in [0, chunk_chars={self.chunk_chars}), "
                f"got {self.overlap_chars!r}"
            )
        if self.index not in INDEX_DEFAULTS:
            raise RetrievalError(f"retrieval.index must be one of {', '.join(INDEX_DEFAULTS)}, got {self.index!r}")
        # a bad index setting or embedder key is named now, not when the first text is added
        try:
            resolve_index_params(self.index, dict(self.index_params))
        except RetrievalError as err:
            raise RetrievalError(f"retrieval.index_params: {err}") from None
        try:
            build_embedder(dict(self.embedder))
        except RetrievalError as err:
            raise RetrievalError(f"retrieval.embedder: {err}") from None

    def retriever(self) -> Retriever:
        """An empty store with these settings."""
        return Retriever(build_embedder(dict(self.embedder)), self.index, **self.index_params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retrieval_settings(values: Mapping[str, Any] | None) -> RetrievalSettings:
    """The settings a mapping holds (a composed config's `retrieval` group, a settings file; None: the defaults);
    RetrievalError naming an unknown key or a bad value."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    values = dict(values or {})
    known = {f.name for f in fields(RetrievalSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RetrievalError(f"unknown retrieval key(s) {unknown}: known keys are {sorted(known)}")
    return RetrievalSettings(**values)


def retrieval_schema() -> type:
    """RetrievalSettings' fields, types and defaults as a mutable dataclass: the structured config under the training
    config's `retrieval` group (stages.schema.register stores it), so `python train.py --cfg job` lists every key,
    `retrieval.index=hnsw` overrides one and `retrieval.k=abc` fails at composition; defaults stay written once."""
    hints = typing.get_type_hints(RetrievalSettings)
    return dataclasses.make_dataclass(
        "RetrievalConfig",
        [
            (f.name, hints[f.name], field(default=f.default) if f.default_factory is dataclasses.MISSING
             else field(default_factory=f.default_factory))
            for f in fields(RetrievalSettings)
        ],
    )  # fmt: skip


def load_retrieval_settings(overrides: list[str] = (), path: Path = DEFAULT_SETTINGS) -> RetrievalSettings:
    """The settings file with `key=value` overrides (OmegaConf dot-list syntax); RetrievalError naming a bad key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        values = OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, ValueError) as err:
        raise RetrievalError(f"retrieval settings: {str(err).splitlines()[0]}") from None
    return retrieval_settings(values)


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Paragraphs joined up to `size` characters, each chunk after the first starting with the last `overlap`
    characters of the one before; a paragraph longer than `size` is cut into pieces of `size` that overlap by
    `overlap` characters."""
    chunks: list[str] = []
    for p in (p.strip() for p in text.split("\n\n")):
        if not p:
            continue
        if len(p) > size:
            chunks += [p[i : i + size] for i in range(0, len(p) - overlap, size - overlap)]
        elif chunks and len(chunks[-1]) + 2 + len(p) <= size:
            chunks[-1] += "\n\n" + p
        else:
            chunks.append(((chunks[-1][-overlap:] + " ") if chunks and overlap else "") + p)
    return chunks


def document_chunks(
    paths: list[str], size: int = RetrievalSettings.chunk_chars, overlap: int = RetrievalSettings.overlap_chars
) -> tuple[list[str], list[str]]:
    """(ids, texts) of every chunk of the text files under `paths` (files, or folders searched for .txt/.md/.rst);
    an id is `file#n`. ValueError naming a path that does not exist, is not UTF-8 text, or holds no text."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{raw}: no such file or folder")
    ids, texts = [], []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{f}: not UTF-8 text (byte {err.start})") from None
        for n, chunk in enumerate(chunk_text(text, size, overlap)):
            ids.append(f"{f}#{n}")
            texts.append(chunk)
    if not texts:
        raise ValueError(f"{' '.join(paths)}: no text found (files ending in {', '.join(DOC_SUFFIXES)})")
    return ids, texts


def index_documents(paths: list[str], settings: RetrievalSettings) -> Retriever:
    """A store of every chunk of the documents under `paths`."""
    retriever = settings.retriever()
    ids, texts = document_chunks(paths, settings.chunk_chars, settings.overlap_chars)
    retriever.add(texts, ids=ids)
    return retriever
