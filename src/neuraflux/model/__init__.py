"""The transformer backbone, generation, and the reward model built on the backbone."""

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
from neuraflux.model.reward import NanoRewardModel

__all__ = [
    "KVCache",
    "NanoConfig",
    "NanoEmbeddings",
    "NanoLM",
    "NanoLMHead",
    "NanoLayer",
    "NanoModel",
    "NanoRewardModel",
    "NanoSelfAttention",
    "filter_logits",
    "generate",
    "generate_stream",
    "sample_next",
]
