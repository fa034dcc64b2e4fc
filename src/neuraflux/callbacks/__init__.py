"""Lightning callbacks: training throughput and the TensorBoard diagnostics."""

from neuraflux.callbacks.diagnostics import (
    ActivationStatsLogger,
    AttentionMapLogger,
    GradientFlowLogger,
    LearningRateLogger,
    TextSampleLogger,
)
from neuraflux.callbacks.throughput import ThroughputMonitor

__all__ = [
    "ActivationStatsLogger",
    "AttentionMapLogger",
    "GradientFlowLogger",
    "LearningRateLogger",
    "TextSampleLogger",
    "ThroughputMonitor",
]
