"""Data modules: causal-LM text, chat-format SFT, preferences and RL prompts, from local files, `datasets` or the
built-in world."""

from neuraflux.data.common import LMBatch, StreamSampler
from neuraflux.data.lm import LMDataModule
from neuraflux.data.preference import PreferenceDataset, PreferenceExample
from neuraflux.data.preference_batches import PreferenceBatch, PreferenceDataModule
from neuraflux.data.prompts import PromptBatch, PromptDataModule
from neuraflux.data.sft import SFTDataModule

__all__ = [
    "LMBatch",
    "LMDataModule",
    "PreferenceBatch",
    "PreferenceDataModule",
    "PreferenceDataset",
    "PreferenceExample",
    "PromptBatch",
    "PromptDataModule",
    "SFTDataModule",
    "StreamSampler",
]
