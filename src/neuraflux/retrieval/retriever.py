"""Retriever: texts with string ids, an embedder and a vector index; search, save and load.

A saved store is a directory of three files:
* manifest.json -- format version, the embedder's config, dim, index kind and settings, count, index checksum;
* docs.json     -- {"ids": [...], "texts": [...]}, row i of the index is ids[i] / texts[i];
* index.faiss   -- the FAISS index (faiss.write_index).
Loading reads JSON and the FAISS file only, so it never runs code from the store (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuraflux.retrieval.embedders import Embedder, LexicalEmbedder, build_embedder
from neuraflux.retrieval.errors import RetrievalError
from neuraflux.retrieval.index import build_index, read_index

log = logging.getLogger(__name__)

STORE_FORMAT = "neuraflux-retrieval"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DOCS_FILE = "docs.json"
INDEX_FILE = "index.faiss"
MANIFEST_KEYS = ("format", "format_version", "embedder", "dim", "index", "count", "index_sha256")


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str
    score: float  # cosine similarity of query and text (inner product of unit rows)
    text: str


def _positive_k(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise RetrievalError(f"k must be a positive integer, got {k!r}")
    return k


def _string_list(name: str, values: Any) -> list[str]:
    """A list of non-empty strings, or one error naming the first bad entry."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise RetrievalError(f"{name} must be a list of strings, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise RetrievalError(f"{name}[{i}] must be a string, got {type(value).__name__} {value!r}")
        if not value.strip():
            raise RetrievalError(f"{name}[{i}] is empty")
    return list(values)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RetrievalError(f"corrupt store: {path} line {err.lineno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise RetrievalError(f"corrupt store: {path} is not UTF-8 text") from err


def _config_diff(stored: dict[str, Any], requested: dict[str, Any]) -> str:
    keys = sorted(k for k in set(stored) | set(requested) if stored.get(k) != requested.get(k))
    return ", ".join(f"{k}: store {stored.get(k)!r} vs requested {requested.get(k)!r}" for k in keys)


class Retriever:
    """Texts searchable by meaning; `Retriever()` is lexical embedding with exact search, for any text.

    ids are strings, unique in a store; without ids, texts get running integers ("0", "1", ...) counted
    from the store's size, so they stay consistent across save and load.
    """

    def __init__(self, embedder: Embedder | None = None, index: str = "flat", **index_params: int):
        self.embedder: Embedder = embedder if embedder is not None else LexicalEmbedder()
        self.index = build_index(index, self.embedder.dim, **index_params)
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._row_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._ids)

    # ---- adding -------------------------------------------------------------------------------------------
    def add(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> list[str]:
        """Embed and index `texts`; returns their ids. Everything is checked before anything is embedded."""
        texts = _string_list("texts", texts)
        if ids is None:
            ids = [str(len(self) + i) for i in range(len(texts))]
        else:
            ids = _string_list("ids", ids)
            if len(ids) != len(texts):
                raise RetrievalError(f"add() got {len(texts)} texts but {len(ids)} ids; give one id per text")
        seen: set[str] = set()
        for i, id_ in enumerate(ids):
            if id_ in self._row_of or id_ in seen:
                where = "already in the store" if id_ in self._row_of else "given twice"
                raise RetrievalError(f"duplicate id {id_!r} (ids[{i}]) is {where}; ids must be unique")
            seen.add(id_)
        if not texts:
            return []
        self.index.check_add(len(texts))
        vectors = self.embedder.embed(texts)  # (N, dim)
        if vectors.shape != (len(texts), self.embedder.dim):
            raise RetrievalError(
                f"embedder {self.embedder.name!r} returned shape {vectors.shape} for {len(texts)} texts; "
                f"expected ({len(texts)}, {self.embedder.dim})"
            )
        self.index.add(vectors)
        for id_, text in zip(ids, texts):
            self._row_of[id_] = len(self._ids)
            self._ids.append(id_)
            self._texts.append(text)
        return ids

    # ---- searching ----------------------------------------------------------------------------------------
    def search(self, query: str, k: int) -> list[Hit]:
        """The k texts most similar to `query`, best first (fewer when the store holds fewer)."""
        if not isinstance(query, str):
            raise RetrievalError(f"query must be a string, got {type(query).__name__}; for many use search_batch()")
        return self._search([query], k, labels=["query"])[0]

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """search() for each query, embedded and searched together."""
        queries = _string_list("queries", queries)
        return self._search(queries, k, labels=[f"queries[{i}]" for i in range(len(queries))])

    def _search(self, queries: list[str], k: int, labels: list[str]) -> list[list[Hit]]:
        k = _positive_k(k)
        if len(self) == 0:
            raise RetrievalError("search on an empty store: add() texts first")
        limit = self.embedder.max_chars
        for label, query in zip(labels, queries):
            if not query.strip():
                raise RetrievalError(f"{label} is empty")
            if len(query) > limit:
                raise RetrievalError(
                    f"{label} is {len(query)} characters long; the {self.embedder.name} embedder accepts "
                    f"at most {limit} (max_chars)"
                )
        if not queries:
            return []
        result = self.index.search(self.embedder.embed(queries), min(k, len(self)))
        batch = []
        for scores, rows in zip(result.scores, result.rows):
            hits = [
                Hit(id=self._ids[row], score=float(score), text=self._texts[row])
                for score, row in zip(scores, rows)
                if row >= 0  # approximate indexes may find fewer than k rows
            ]
            batch.append(sorted(hits, key=lambda h: -h.score))
        return batch

    # ---- saving and loading -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the store to `directory`, replacing a store already there only once the new one is complete."""
        target = Path(directory)
        embedder_config = self.embedder.to_config()  # fails for an unsaveable embedder before anything is written
        if target.exists() and not _replaceable(target):
            raise RetrievalError(f"refusing to overwrite {target}: it exists and is not a retrieval store")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            self.index.write(tmp / INDEX_FILE)
            docs = {"ids": self._ids, "texts": self._texts}
            (tmp / DOCS_FILE).write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
            manifest = {
                "format": STORE_FORMAT,
                "format_version": FORMAT_VERSION,
                "embedder": embedder_config,
                "dim": self.embedder.dim,
                "index": {"kind": self.index.kind, "params": self.index.params},
                "count": len(self),
                "index_sha256": _sha256(tmp / INDEX_FILE),
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved %d texts to %s", len(self), target)
        return target

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder | None = None) -> Retriever:
        """A store written by save(). With `embedder`, it must be the one the store was built with."""
        directory = Path(directory)
        manifest = _read_manifest(directory)
        stored = manifest["embedder"]
        if embedder is not None:
            _check_embedder(directory, stored, embedder, manifest["dim"])
        docs = _read_json(directory / DOCS_FILE)
        if not (isinstance(docs, dict) and isinstance(docs.get("ids"), list) and isinstance(docs.get("texts"), list)):
            raise RetrievalError(f"corrupt store: {directory / DOCS_FILE} must hold lists 'ids' and 'texts'")
        ids, texts = docs["ids"], docs["texts"]
        if not len(ids) == len(texts) == manifest["count"]:
            raise RetrievalError(
                f"corrupt store: {directory / DOCS_FILE} holds {len(ids)} ids and {len(texts)} texts but "
                f"{MANIFEST_FILE} count is {manifest['count']}"
            )
        if len(set(ids)) != len(ids) or not all(isinstance(i, str) for i in ids):
            raise RetrievalError(f"corrupt store: {directory / DOCS_FILE} ids must be unique strings")
        # checked before FAISS reads the file: a damaged file must not reach its C++ reader
        index_path = directory / INDEX_FILE
        if _sha256(index_path) != manifest["index_sha256"]:
            raise RetrievalError(
                f"corrupt store: {index_path} ({index_path.stat().st_size} bytes) does not match the checksum "
                f"in {MANIFEST_FILE}; it was truncated or modified"
            )
        index = read_index(index_path)
        if index.dim != manifest["dim"]:
            raise RetrievalError(
                f"corrupt store: {MANIFEST_FILE} declares dim {manifest['dim']} but {index_path} has d={index.dim}"
            )
        if index.ntotal != len(ids):
            raise RetrievalError(
                f"corrupt store: {index_path} holds {index.ntotal} vectors but {DOCS_FILE} has {len(ids)} texts"
            )
        if index.kind != manifest["index"].get("kind"):
            raise RetrievalError(
                f"corrupt store: {MANIFEST_FILE} declares index kind {manifest['index'].get('kind')!r} "
                f"but {index_path} is {index.kind!r}"
            )
        if embedder is None:
            embedder = build_embedder(stored)
            _check_embedder(directory, stored, embedder, manifest["dim"])
        store = cls(embedder)
        store.index = index
        store._ids, store._texts = list(ids), list(texts)
        store._row_of = {id_: row for row, id_ in enumerate(ids)}
        return store


def _replaceable(target: Path) -> bool:
    """An existing path save() may replace: an empty directory or a store (it has a manifest)."""
    return target.is_dir() and (not any(target.iterdir()) or (target / MANIFEST_FILE).is_file())


def _swap_in(tmp: Path, target: Path) -> None:
    """Move the finished store `tmp` to `target`; an old store there is set aside first and restored on failure."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise RetrievalError(f"{directory} is not a directory holding a retrieval store")
    missing = [name for name in (MANIFEST_FILE, DOCS_FILE, INDEX_FILE) if not (directory / name).is_file()]
    if missing:
        raise RetrievalError(f"corrupt store: {directory} is missing {', '.join(missing)}")
    manifest = _read_json(directory / MANIFEST_FILE)
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise RetrievalError(f"{directory / MANIFEST_FILE} is not a {STORE_FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RetrievalError(
            f"{directory / MANIFEST_FILE}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    absent = [key for key in MANIFEST_KEYS if key not in manifest]
    if absent:
        raise RetrievalError(f"corrupt store: {directory / MANIFEST_FILE} lacks {absent}")
    expected_types = {"embedder": dict, "dim": int, "index": dict, "count": int, "index_sha256": str}
    for key, kind in expected_types.items():
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise RetrievalError(
                f"corrupt store: {directory / MANIFEST_FILE} field {key!r} must be {kind.__name__}, "
                f"got {manifest[key]!r}"
            )
    return manifest


def _check_embedder(directory: Path, stored: dict[str, Any], embedder: Embedder, dim: int) -> None:
    """The embedder must be the store's: same config and the dimension the manifest declares."""
    config = embedder.to_config()
    if config != stored:
        raise RetrievalError(
            f"store {directory} was built with another embedder than requested ({_config_diff(stored, config)})"
        )
    if embedder.dim != dim:
        raise RetrievalError(
            f"store {directory} declares dim {dim} but the {embedder.name} embedder gives {embedder.dim}"
        )


def recall_at_k(retriever: Retriever, queries: Sequence[str], gold_ids: Sequence[str], k: int) -> float:
    """Fraction of queries whose gold id is among their top k hits."""
    if len(queries) != len(gold_ids):
        raise RetrievalError(f"recall_at_k got {len(queries)} queries but {len(gold_ids)} gold ids")
    if not queries:
        raise RetrievalError("recall_at_k needs at least one query")
    batch = retriever.search_batch(queries, k)
    found = sum(gold in {hit.id for hit in hits} for gold, hits in zip(gold_ids, batch))
    return found / len(queries)
