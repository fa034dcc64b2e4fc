"""`torch.compile` for the model a stage trains: `python train.py callbacks.compile.enabled=true` (GPU runs)."""

from __future__ import annotations

import pytorch_lightning as pl


class CompileModel(pl.Callback):
    """Compiles `pl_module.model`'s forward in place (`nn.Module.compile`) when fitting starts, so its parameters
    keep their names: checkpoints, `model/` exports and `resume=` read the same keys as an eager run's (wrapping it
    in `torch.compile(model)` would prefix every key with `_orig_mod.`). Compilation itself happens on the first
    batch; what the model computes is unchanged. `backend="eager"` runs the capture without generating code (the
    CPU tests' plumbing check)."""

    def __init__(self, enabled: bool = False, mode: str | None = None, backend: str = "inductor"):
        self.enabled, self.mode, self.backend = enabled, mode, backend

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.enabled and stage == "fit":
            pl_module.model.compile(mode=self.mode, backend=self.backend)
