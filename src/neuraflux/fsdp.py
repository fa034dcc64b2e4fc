"""Fully sharded data parallel (trainer=fsdp, trainer=fsdp_cpu): Lightning's FSDPStrategy and the fixes it needs here.

python train.py trainer=fsdp trainer.devices=4       (GPUs)
python train.py trainer=fsdp_cpu trainer.devices=2   (CPU processes over gloo: sharding tested without GPUs)

- Clipping by norm. `trainer.gradient_clip_val` clips the norm of the whole gradient, but under FSDP each rank holds
  a shard of it, so `torch.nn.utils.clip_grad_norm_` on one rank's shards is wrong, and Lightning's FSDPPrecision
  refuses `gradient_clip_algorithm='norm'` because it has no reference to the root module whose `clip_grad_norm_`
  all-reduces the shards' norms. The precision plugin here is given that reference.
- CPU processes. Lightning's accelerator connector refuses `FSDPStrategy` unless the accelerator is a GPU ("The
  strategy `fsdp` requires a GPU accelerator"; the check is on the exact class, so a subclass is let through), and
  `FSDPStrategy._setup_model` wraps the model with `device_id=root_device.index`, None on a CPU, for which torch's
  `FullyShardedDataParallel` looks for an accelerator and raises "FSDP needs a non-CPU accelerator device"
  (torch/distributed/fsdp/_init_utils.py, `_init_device_handle`). Given `device_id=torch.device("cpu")`, torch 2.13's
  FSDP shards, gathers and reduces over gloo. That is for testing sharding and checkpoints on a machine without GPUs,
  not for speed: on one machine, gloo's collectives cost more than the memory they save a model this size.
- Whole-weight checkpoints on CPU processes. Lightning gathers full state dicts with `offload_to_cpu=True`, and
  torch's FSDP takes the offload's `.cpu()` for the copy that makes the gathered tensors its own: on a CPU it is
  no copy. Weights then point into storage `FlatParamHandle.to_cpu` frees ("setStorage: ... out of bounds for
  storage of size 0", or a segmentation fault), and every optimizer state points into one reused gather buffer
  (`_optim_utils`: exp_avg saved equal to exp_avg_sq, so a resumed run diverges). On CPU processes the strategy's
  state-dict methods gather without the offload, which torch then clones, and which is where the tensors are.
- Weight decay. The optimizer decays parameters of 2 or more dimensions (`optim.OptimizerFactory.param_groups`), but
  a sharded parameter is a 1-D slice: FSDP's flat parameters would put everything in the no-decay group. With
  `use_orig_params` (the config sets it) the optimizer holds the model's own parameters, so they are shown to it
  whole, gathered, while it is built (`setup_optimizers`), and it keeps them as they are sharded after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from unittest import mock

import lightning_fabric.strategies.model_parallel as fabric_model_parallel
import pytorch_lightning.strategies.fsdp as lightning_fsdp
import torch
from pytorch_lightning.plugins.precision import FSDPPrecision
from pytorch_lightning.strategies import FSDPStrategy as LightningFSDPStrategy
from torch import nn


class ShardedNormClipPrecision(FSDPPrecision):
    """FSDPPrecision that clips by the norm of the whole gradient: FSDP's own `clip_grad_norm_` on the root module,
    which every rank calls on its shards and which all-reduces their squared norms."""

    def __init__(self, precision: str, root: Callable[[], nn.Module]):
        super().__init__(precision)  # type: ignore[arg-type]
        self._root = root

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        self._root().clip_grad_norm_(clip_val)


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's FSDPStrategy, clipping by norm, and on CPU processes when the accelerator is the CPU.

    `precision` is the trainer's (`${..precision}` in the config): a strategy that brings its own precision plugin
    is given the whole precision setting, as Lightning would give it to FSDPPrecision."""

    strategy_name = "neuraflux_fsdp"

    def __init__(self, precision: str = "32-true", **kwargs):
        super().__init__(precision_plugin=ShardedNormClipPrecision(precision, root=lambda: self.model), **kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type != "cpu" or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        # the policy is used here, once: Lightning's wrapping, seeing an already wrapped model, would warn and drop it
        policy = self.kwargs.pop("auto_wrap_policy", None)
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            auto_wrap_policy=policy,
            **self.kwargs,
        )
        return super()._setup_model(wrapped)  # torchmetrics to the device, activation checkpointing

    def setup_optimizers(self, trainer) -> None:
        if not self.kwargs.get("use_orig_params"):
            return super().setup_optimizers(trainer)
        from torch.distributed.fsdp import FullyShardedDataParallel

        # every rank gathers (a collective), so the decay groups see each parameter's own shape
        with FullyShardedDataParallel.summon_full_params(self.model, writeback=False):
            super().setup_optimizers(trainer)

    def _on_this_device(self) -> contextlib.AbstractContextManager:
        return full_state_dicts_in_place() if self.root_device.type == "cpu" else contextlib.nullcontext()

    def lightning_module_state_dict(self) -> dict:
        with self._on_this_device():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        with self._on_this_device():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        with self._on_this_device():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def full_state_dict_in_place(module: nn.Module, world_size: int, rank0_only: bool = True):
    """FSDP's full state dicts of weights and optimizer, gathered where the shards are (no offload to the CPU)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


@contextlib.contextmanager
def full_state_dicts_in_place() -> Iterator[None]:
    """Within it, Lightning's FSDP saving and loading gather full state dicts without offloading them to the CPU
    (see the module docstring): its one context factory, under the two names its modules call it by."""
    with (
        mock.patch.object(lightning_fsdp, "_get_full_state_dict_context", full_state_dict_in_place),
        mock.patch.object(fabric_model_parallel, "_get_full_state_dict_context", full_state_dict_in_place),
    ):
        yield
