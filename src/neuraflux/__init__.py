"""NeuraFlux: a small-language-model training framework on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
