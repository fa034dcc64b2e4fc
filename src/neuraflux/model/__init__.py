"""The transformer backbone and generation."""

from neuraflux.model.config import NanoConfig
from neuraflux.model.generation import filter_logits, generate, generate_stream, sample_next
from neuraflux.model.nano import (
    KVCache,
    NanoEmbeddings,
    NanoLayer,
    NanoLM,
    NanoLMHead,
    NanoModel,
    NanoSelfAttention,
)

__all__ = [
    "KVCache",
    "NanoConfig",
    "NanoEmbeddings",
    "NanoLM",
    "NanoLMHead",
    "NanoLayer",
    "NanoModel",
    "NanoSelfAttention",
    "filter_logits",
    "generate",
    "generate_stream",
    "sample_next",
]
