"""Data modules: causal-LM text and chat-format SFT, from local files, `datasets` or the built-in world."""

from neuraflux.data.common import LMBatch, StreamSampler
from neuraflux.data.lm import LMDataModule
from neuraflux.data.sft import SFTDataModule

__all__ = ["LMBatch", "LMDataModule", "SFTDataModule", "StreamSampler"]
