"""Retrieval: embed texts, index them with FAISS, search by cosine similarity, save and load stores.

`Retriever()` works on any text (hashed lexical features, exact search); `BackboneEmbedder` uses the
project's own transformer. Only `neuraflux.retrieval.index` imports faiss.
"""

from neuraflux.retrieval.embedders import (
    EMBEDDER_TYPES,
    BackboneEmbedder,
    Embedder,
    LexicalEmbedder,
    build_embedder,
    l2_normalize,
)
from neuraflux.retrieval.errors import RetrievalError
from neuraflux.retrieval.index import INDEX_DEFAULTS, SearchResult, VectorIndex, build_index, read_index
from neuraflux.retrieval.retriever import FORMAT_VERSION, Hit, Retriever, recall_at_k

__all__ = [
    "EMBEDDER_TYPES",
    "FORMAT_VERSION",
    "INDEX_DEFAULTS",
    "BackboneEmbedder",
    "Embedder",
    "Hit",
    "LexicalEmbedder",
    "RetrievalError",
    "Retriever",
    "SearchResult",
    "VectorIndex",
    "build_embedder",
    "build_index",
    "l2_normalize",
    "read_index",
    "recall_at_k",
]
