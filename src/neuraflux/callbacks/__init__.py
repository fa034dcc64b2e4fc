"""Lightning callbacks: training throughput and the diagnostics (written to every logger in use: sinks.py)."""

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
