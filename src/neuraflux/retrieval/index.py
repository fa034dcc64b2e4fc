"""Vector indexes over unit-norm rows, scored by inner product (= cosine). The one module that imports faiss.

Kinds, each from a name and settings (`build_index(kind, dim, **params)`):
* "flat": exact search over every row.
* "ivf":  rows grouped into `nlist` k-means cells; a query scans the `nprobe` nearest cells. The cells are
  trained on the first batch added, which must hold at least `nlist` rows.
* "hnsw": a graph with `M` links per node, built with beam `efConstruction` and searched with beam `efSearch`.
Rows are numbered 0, 1, ... in the order they were added; the retriever maps rows to ids and texts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuraflux.retrieval.errors import RetrievalError

# FAISS's loader logs, at INFO, each CPU-specific build it tries and fails to find (11 lines) before the one it loads
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

try:
    import faiss
except ImportError as err:  # the one door for the heavy optional piece
    raise ImportError("neuraflux.retrieval needs FAISS; install the package faiss-cpu (pip install faiss-cpu)") from err

INDEX_DEFAULTS: dict[str, dict[str, int]] = {
    "flat": {},
    "ivf": {"nlist": 64, "nprobe": 8},
    "hnsw": {"M": 32, "efConstruction": 80, "efSearch": 64},
}


@dataclass(frozen=True)
class SearchResult:
    """The k best rows per query, best first."""

    scores: np.ndarray  # (Q, k) float32 inner products
    rows: np.ndarray  # (Q, k) int64 row numbers; -1 where fewer than k rows were found


def set_threads(n: int) -> None:
    """Threads FAISS may use for building and searching (its OpenMP pool)."""
    faiss.omp_set_num_threads(n)


def get_threads() -> int:
    return faiss.omp_get_max_threads()


def resolve_index_params(kind: str, params: dict[str, Any]) -> dict[str, int]:
    """`params` over the kind's defaults (INDEX_DEFAULTS); RetrievalError naming an unknown kind or setting."""
    if kind not in INDEX_DEFAULTS:
        raise RetrievalError(f"unknown index kind {kind!r}; choose one of {sorted(INDEX_DEFAULTS)}")
    defaults = INDEX_DEFAULTS[kind]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise RetrievalError(f"index {kind!r} has no settings {unknown}; its settings are {sorted(defaults)}")
    resolved = {**defaults, **params}
    for name, value in resolved.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise RetrievalError(f"index {kind!r}: {name} must be a positive integer, got {value!r}")
    return resolved


class VectorIndex:
    """A FAISS inner-product index with its kind and settings; build with `build_index` or `read_index`."""

    def __init__(self, kind: str, params: dict[str, int], index: Any):
        self.kind = kind
        self.params = params
        self._index = index

    @property
    def dim(self) -> int:
        return self._index.d

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    def check_add(self, n: int) -> None:
        """Raise if adding n rows would fail, so callers can refuse before embedding anything."""
        if self.kind == "ivf" and not self._index.is_trained and n < self.params["nlist"]:
            raise RetrievalError(
                f"an ivf index with nlist={self.params['nlist']} trains its cells on the first rows added and "
                f"needs at least {self.params['nlist']} of them, got {n}; add more texts at once or lower nlist"
            )

    def _as_rows(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise RetrievalError(f"{what} must have shape (N, {self.dim}), got {vectors.shape}")
        return np.ascontiguousarray(vectors, dtype=np.float32)  # FAISS reads raw float32 rows

    def add(self, vectors: np.ndarray) -> None:
        """vectors: (N, dim) float32 unit rows, numbered from ntotal on."""
        vectors = self._as_rows(vectors, "vectors to add")
        self.check_add(len(vectors))
        if not self._index.is_trained:
            self._index.train(vectors)
        self._index.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """queries: (Q, dim) float32 unit rows -> the k best rows of each."""
        queries = self._as_rows(queries, "query vectors")
        scores, rows = self._index.search(queries, k)
        return SearchResult(scores=scores, rows=rows)

    def write(self, path: str | Path) -> None:
        faiss.write_index(self._index, str(path))


def build_index(kind: str, dim: int, **params: int) -> VectorIndex:
    """An empty index of `kind` ("flat", "ivf", "hnsw") over `dim`-wide rows; settings default per INDEX_DEFAULTS."""
    resolved = resolve_index_params(kind, params)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise RetrievalError(f"index dim must be a positive integer, got {dim!r}")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        # the factory keeps the coarse quantizer owned by the index (a hand-built one can be garbage-collected)
        index = faiss.index_factory(dim, f"IVF{resolved['nlist']},Flat", faiss.METRIC_INNER_PRODUCT)
        index.nprobe = resolved["nprobe"]
    else:
        index = faiss.IndexHNSWFlat(dim, resolved["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = resolved["efConstruction"]
        index.hnsw.efSearch = resolved["efSearch"]
    return VectorIndex(kind, resolved, index)


def read_index(path: str | Path) -> VectorIndex:
    """An index written by `VectorIndex.write`; its kind and settings are read back from the file."""
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        # drop the C++ signature and source line FAISS puts before its reason
        reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(err).strip())
        raise RetrievalError(f"{path}: not a readable FAISS index ({reason})") from err
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise RetrievalError(f"{path}: the index does not score by inner product, so it was not written here")
    if isinstance(index, faiss.IndexFlat):
        return VectorIndex("flat", {}, index)
    if isinstance(index, faiss.IndexIVF):
        return VectorIndex("ivf", {"nlist": index.nlist, "nprobe": index.nprobe}, index)
    if isinstance(index, faiss.IndexHNSW):
        hnsw = index.hnsw
        params = {"M": hnsw.nb_neighbors(1), "efConstruction": hnsw.efConstruction, "efSearch": hnsw.efSearch}
        return VectorIndex("hnsw", params, index)
    raise RetrievalError(f"{path}: FAISS index type {type(index).__name__} is not one of flat, ivf, hnsw")
