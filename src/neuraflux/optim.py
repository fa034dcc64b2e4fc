"""AdamW with weight-decay groups and a warmup + cosine schedule, built from the `optim` config group."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine down to min_lr_ratio at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# trainer precisions whose loss is scaled (a GradScaler): a fused step would unscale after Lightning clips
SCALED_PRECISIONS = ("16-mixed",)


@dataclass
class OptimizerFactory:
    """Builds (optimizer, scheduler) for a module's trainable parameters; the stage calls it."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = field(default=(0.9, 0.95))
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # or "constant" (after warmup)
    fused: bool | None = None  # None: fused when every parameter is on a device with a fused kernel
    total_steps: int | None = None  # schedule length; None = trainer.max_steps

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"optim.total_steps must be a positive integer or null, got {self.total_steps}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be one of ['cosine', 'constant'], got {self.schedule!r}")

    def check_precision(self, mixed_precision: str | None) -> None:
        """ValueError for optim.fused=true under a loss-scaled precision, 16-mixed (see __call__)."""
        if self.fused and mixed_precision in SCALED_PRECISIONS:
            raise ValueError(
                f"optim.fused=true cannot train with trainer.precision={mixed_precision}: its gradient scaler would "
                "leave the unscaling to the fused step, after Lightning clips; leave optim.fused null (the foreach "
                "kernel is used)"
            )

    def param_groups(self, named_parameters) -> list[dict]:
        """Decay matrices (linear and embedding weights); never decay biases and LayerNorm gains (1-D tensors)."""
        decay, no_decay, seen = [], [], set()
        for _, p in named_parameters:
            if not p.requires_grad or id(p) in seen:  # tied weights appear twice
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def __call__(self, named_parameters, total_steps: int, mixed_precision: str | None = None):
        """(AdamW, per-step LambdaLR). `mixed_precision`: the trainer's precision when it is a `*-mixed` one.

        The fused kernel is the default wherever it runs (on CPU several times faster than PyTorch's per-tensor
        loop; `bench/train_throughput.py --profile` shows its share of a step). Under 16-mixed a gradient scaler
        hands a fused step the unscaling, which would come after Lightning clips, so there the update is the
        multi-tensor (foreach) kernel and `optim.fused: true` is refused by name. bf16-mixed has no scaler: the fused
        step's "I unscale" flag, which only a scaler reads, is cleared so that Lightning clips its gradients as any
        optimizer's."""
        total_steps = self.total_steps or total_steps
        groups = self.param_groups(named_parameters)
        self.check_precision(mixed_precision)
        fused = self.fused
        if fused is None:
            # PyTorch's default on CPU is a per-tensor Python loop; the fused kernel is several times faster.
            devices = {p.device.type for g in groups for p in g["params"]}
            dtypes = {p.dtype for g in groups for p in g["params"]}
            fusable = devices <= {"cpu", "cuda"} and dtypes <= {torch.float32, torch.bfloat16, torch.float16}
            fused = fusable and mixed_precision not in SCALED_PRECISIONS
        optimizer = torch.optim.AdamW(
            groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused, foreach=None if fused else True
        )
        if fused and mixed_precision is not None:
            # Lightning's mixed-precision plugin refuses to clip when this is set (pytorch_lightning
            # plugins/precision/amp.py, `_optimizer_handles_unscaling`); with no scaler nothing is left to unscale
            optimizer._step_supports_amp_scaling = False
        min_ratio = self.min_lr_ratio if self.schedule == "cosine" else 1.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total_steps, min_ratio)
        )
        return optimizer, scheduler
