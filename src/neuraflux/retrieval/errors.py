"""The one error type of the retrieval package, so callers can catch bad input without catching FAISS bugs."""

from __future__ import annotations


class RetrievalError(ValueError):
    """Bad input to the retriever (a query, ids, k, an index setting) or a store directory that can't be loaded."""
