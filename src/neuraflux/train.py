"""One training run from a composed Hydra config: `train(cfg) -> (metrics, objects)`, called by train.py and tests."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from neuraflux.callbacks.checkpoint import (
    AtomicCheckpointIO,
    CheckpointExtras,
    is_stale_temp_file,
    remove_stale_temp_files,
)
from neuraflux.callbacks.grad_norm import GradNormLogger
from neuraflux.loggers import build_loggers, check_loggers
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.model.io import check_same_shape, inspect_pretrained, load_pretrained
from neuraflux.tokenizer import NanoTokenizer

log = logging.getLogger(__name__)

PRECISIONS = ("32", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true")
# trainer settings that are counts, and those that are a count of batches or a fraction of the epoch; checked here
# because Lightning compares them with numbers somewhere deep inside and fails with a TypeError naming neither
TRAINER_INTEGERS = ("max_steps", "accumulate_grad_batches", "log_every_n_steps", "num_sanity_val_steps")
TRAINER_NUMBERS = ("val_check_interval", "limit_val_batches", "gradient_clip_val")


@dataclass
class Settings:
    """What validation produced: the config objects built before any work starts."""

    model_config: NanoConfig
    run_dir: Path
    resume_ckpt: Path | None
    init_from: Path | None


UNKNOWN_ARGUMENT = re.compile(r"unexpected keyword argument '(\w+)'")


def build(spec, key: str | None = None, **kwargs):
    """hydra.utils.instantiate, with a config error raised as itself: one line naming the key, not a wrapper. A
    setting the target does not take (`+data.bogus=1`) is a ValueError naming `key.setting`."""
    from hydra.errors import InstantiationException
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        return instantiate(spec, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        unknown = UNKNOWN_ARGUMENT.search(str(cause)) if isinstance(cause, TypeError) else None
        if unknown and key is not None:
            raise ValueError(f"{key}.{unknown[1]} is not a setting of {spec.get('_target_')}") from None
        if isinstance(cause, (ValueError, FileNotFoundError, TypeError, MisconfigurationException)):
            raise cause from None
        raise


def _model_config(cfg: DictConfig) -> NanoConfig:
    return NanoConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def check_settings(cfg: DictConfig):
    """The checks of `validate` that read only the config (no file, no directory): a curriculum runs them for
    every stage before it writes anything. Returns the model config."""
    model_config = _model_config(cfg)
    optim = build(cfg.optim, key="optim")  # OptimizerFactory validates lr, betas, ...
    check_trainer_settings(cfg.trainer)
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} is not one of {list(PRECISIONS)}")
    optim.check_precision(precision if precision.endswith("-mixed") else None)
    block_size = cfg.data.get("block_size", model_config.block_size)
    if not is_int(block_size):
        raise ValueError(f"data.block_size must be an integer, got {block_size!r}")
    if block_size > model_config.max_position_embeddings:
        raise ValueError(
            f"data.block_size ({block_size}) must be <= model.max_position_embeddings "
            f"({model_config.max_position_embeddings})"
        )
    max_steps = cfg.trainer.get("max_steps", -1)
    if not is_int(max_steps) or max_steps <= 0:
        raise ValueError(f"trainer.max_steps must be a positive integer (training length), got {max_steps!r}")
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    interval = cfg.trainer.get("val_check_interval")
    if isinstance(interval, int) and interval % accumulate:
        # checkpoints written after validation must sit on an optimizer-step boundary to resume exactly
        raise ValueError(
            f"trainer.val_check_interval ({interval}) must be a multiple of "
            f"trainer.accumulate_grad_batches ({accumulate})"
        )
    if cfg.tokenizer.mode not in ("bpe", "char"):
        raise ValueError(f"tokenizer.mode={cfg.tokenizer.mode!r} is not one of ['bpe', 'char']")
    check_loggers(cfg.get("logger"))
    return model_config


def validate(cfg: DictConfig) -> Settings:
    """Reject a nonsensical config with one message naming the key, before anything is written."""
    model_config = check_settings(cfg)
    check_checkpoint_callbacks(cfg.get("callbacks") or {})
    run_dir = Path(cfg.paths.run_dir)
    resume = resolve_resume(cfg.get("resume"), Path(cfg.paths.output_dir), cfg.stage.name)
    checkpoints = run_dir / "checkpoints"
    if resume is None and checkpoints.is_dir() and any(not is_stale_temp_file(p) for p in checkpoints.iterdir()):
        raise FileExistsError(
            f"{run_dir}/checkpoints already holds checkpoints; refusing to overwrite them. "
            "Pass resume=last (or resume=PATH) to continue, or choose another paths.run_dir"
        )
    init_from = cfg.stage.get("init_from")
    if init_from is not None:
        init_from = Path(init_from)
        if not init_from.exists():
            raise FileNotFoundError(f"stage.init_from: {init_from} does not exist")
    # every file a run starts from is read (all but its tensors) now, not after the data is built
    for key, source in (("resume", resume), ("stage.init_from", init_from)):
        if source is not None:
            try:
                loaded, _ = inspect_pretrained(source)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            check_same_shape(model_config, loaded, source)
    return Settings(model_config, run_dir, resume, init_from)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer_settings(trainer: DictConfig) -> None:
    """ValueError naming a trainer setting Lightning does not have (`+trainer.max_step=10`), or a count given as
    something other than a number (`trainer.max_steps=abc`)."""
    import inspect

    from hydra.utils import get_class

    target = trainer.get("_target_", "pytorch_lightning.Trainer")
    try:
        known = inspect.signature(get_class(target)).parameters
    except (ImportError, ValueError):  # instantiating it names the target that does not import
        known = None
    if known is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in known.values()):
        unknown = sorted(k for k in trainer if not str(k).startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"trainer.{unknown[0]} is not a setting of {target}")
    for key in TRAINER_INTEGERS:
        value = trainer.get(key)
        if value is not None and not is_int(value):
            raise ValueError(f"trainer.{key} must be an integer, got {value!r}")
    devices = trainer.get("devices")
    listed = isinstance(devices, list | ListConfig) and all(is_int(d) for d in devices)
    text = isinstance(devices, str) and (devices == "auto" or re.fullmatch(r"-?\d+|(\d+\s*,\s*)*\d+,?", devices))
    if devices is not None and not (is_int(devices) or listed or text):
        raise ValueError(f"trainer.devices must be a count, a list of device indices or 'auto', got {devices!r}")
    for key in TRAINER_NUMBERS:
        value = trainer.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"trainer.{key} must be a number, got {value!r}")


def check_checkpoint_callbacks(callbacks: DictConfig) -> None:
    """Every last.ckpt goes through AtomicCheckpointIO, except ModelCheckpoint's `save_last=link`: it removes
    last.ckpt, then links the new one, and a run killed in between has none."""
    for name, spec in callbacks.items():
        if spec is not None and str(spec.get("_target_", "")).endswith("ModelCheckpoint"):
            if spec.get("save_last") == "link":
                raise ValueError(
                    f"callbacks.{name}.save_last=link replaces last.ckpt by removing it and linking the new one, "
                    "which a killed run can leave without any last.ckpt: use save_last=true"
                )


def resolve_resume(resume: str | None, output_dir: Path, stage_name: str) -> Path | None:
    """`last` = newest checkpoints/last.ckpt of this stage under output_dir; a run dir = its last.ckpt."""
    if resume in (None, "", False):
        return None
    if resume == "last":
        candidates = sorted((output_dir / stage_name).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"resume=last: no {output_dir}/{stage_name}/*/checkpoints/last.ckpt to resume from")
        return candidates[-1]
    p = Path(resume)
    if p.is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.is_file():
        raise FileNotFoundError(f"resume: checkpoint {p} not found")
    return p


def build_tokenizer(cfg: DictConfig, datamodule) -> NanoTokenizer:
    if cfg.tokenizer.get("path"):
        return NanoTokenizer.load(cfg.tokenizer.path)
    return NanoTokenizer.train(
        datamodule.texts(),
        vocab_size=cfg.tokenizer.vocab_size,
        mode=cfg.tokenizer.mode,
        split_digits=cfg.tokenizer.get("split_digits", False),
    )


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    callbacks = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec is None:
            continue
        if "every_n_steps" in spec and not spec.every_n_steps:
            continue  # a diagnostic switched off
        if spec.get("enabled") is False:
            continue  # switched off (callbacks.compile): Lightning would still call each of its hooks every step
        callbacks.append(instantiate(spec))
        log.debug("callback %s", name)
    return callbacks


class QuietLightning(logging.Filter):
    """Drops Lightning's lines that tell a CPU or GPU user nothing (which accelerators exist, an advert), printed by
    every stage of a curriculum; what Lightning says about the run itself stays."""

    NOISE = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_lightning() -> None:
    """Install `QuietLightning` on Lightning's rank-zero logger (once), and silence a deprecation warning Lightning
    raises about its own code (utilities/_pytree.py), which no user of ours can act on."""
    import warnings

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietLightning) for f in logger.filters):
            logger.addFilter(QuietLightning())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated", module=r".*_pytree")


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Run the configured stage; returns (metrics, {"model", "tokenizer", "trainer", "module", "run_dir"})."""
    settings = validate(cfg)
    quiet_lightning()
    # what checkpoint writes killed in earlier runs left, here or beside the checkpoint this run resumes from
    remove_stale_temp_files(settings.run_dir / "checkpoints")
    if settings.resume_ckpt is not None:
        remove_stale_temp_files(settings.resume_ckpt.parent)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data, key="data")  # a missing or empty data file fails here, before anything is written

    model_config = settings.model_config
    if settings.resume_ckpt is not None:  # shapes checked by validate
        model, tokenizer = load_pretrained(settings.resume_ckpt)
    elif settings.init_from is not None:
        model, tokenizer = load_pretrained(settings.init_from)
    else:
        tokenizer = build_tokenizer(cfg, datamodule)
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {model_config.vocab_size}; "
                "raise model.vocab_size or lower tokenizer.vocab_size"
            )
        model = NanoLM(model_config)
    model.set_dropout(model_config.dropout)  # dropout may change between stages; shapes may not
    datamodule.tokenizer = tokenizer

    # Built objects go in through a partial: Hydra would turn dataclass kwargs back into configs.
    module = instantiate(cfg.stage.module, _partial_=True)(model=model, tokenizer=tokenizer, optim=build(cfg.optim))
    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # the run's own config, from its start: what resume=... continues with
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    logger = build_loggers(cfg.get("logger"), build)  # logger=tensorboard|csv|mlflow|many (conf/logger)
    callbacks = [CheckpointExtras(), GradNormLogger(), *build_callbacks(cfg)]
    # every checkpoint written atomically beside its target: a run killed mid-write keeps the previous last.ckpt
    plugins = [AtomicCheckpointIO()]
    trainer: pl.Trainer = build(cfg.trainer, logger=logger, callbacks=callbacks, plugins=plugins)
    trainer.fit(module, datamodule=datamodule, ckpt_path=settings.resume_ckpt, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    exported = getattr(module, "model", model)  # what the stage trains: the LM, or e.g. a reward model
    with whole_weights(trainer):
        metrics["params"] = sum(p.numel() for p in {id(p): p for p in exported.parameters()}.values())
        metrics["global_step"] = trainer.global_step
        throughput = next((c for c in callbacks if hasattr(c, "tokens_per_sec")), None)
        if throughput is not None:
            metrics["train/tokens_per_sec_mean"] = throughput.tokens_per_sec
        if trainer.world_size > 1 and not is_sharded(trainer):  # sharded weights exist once: nothing to compare
            metrics["ranks_in_sync"] = ranks_in_sync(trainer, model)
        if trainer.is_global_zero:
            export_dir = run_dir / "model"
            exported.save_pretrained(export_dir, tokenizer)  # tokenizer.json, its fingerprint in config.json
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    objects = {"model": model, "tokenizer": tokenizer, "trainer": trainer, "module": module, "run_dir": run_dir}
    return metrics, objects


def objective(metrics: dict, stage: DictConfig) -> float:
    """The value of the stage's `optimized_metric` in a run's final metrics: what `python train.py` returns for a
    Hydra sweeper (lightning-hydra-template's `get_metric_value`); a ValueError naming the metrics that exist when
    the run did not log it."""
    key = stage.get("optimized_metric")
    if not key:
        raise ValueError(f"stage.optimized_metric is not set in conf/stage/{stage.get('name')}.yaml")
    if key not in metrics:
        raise ValueError(
            f"stage.optimized_metric={key!r} is not among the run's final metrics: {', '.join(sorted(metrics))}"
        )
    return float(metrics[key])


def is_sharded(trainer: pl.Trainer) -> bool:
    """Each rank holds a shard of every weight (trainer=fsdp), not a whole copy."""
    from pytorch_lightning.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def whole_weights(trainer: pl.Trainer) -> contextlib.AbstractContextManager:
    """Where the weights are sharded (trainer=fsdp), gather them whole on rank 0, in CPU memory, for counting and
    exporting after training (every rank must enter it); elsewhere nothing to do."""
    if not is_sharded(trainer):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    # weights already on the CPU (trainer=fsdp_cpu) stay where they are: torch's offload would free what it gathered
    offload = trainer.strategy.root_device.type != "cpu"
    return FullyShardedDataParallel.summon_full_params(
        trainer.strategy.model, writeback=False, rank0_only=True, offload_to_cpu=offload
    )


def ranks_in_sync(trainer: pl.Trainer, model: NanoLM) -> bool:
    """Every rank holds the same weights: compare a checksum of all parameters across ranks."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    gathered = trainer.strategy.all_gather(checksum.to(trainer.strategy.root_device))
    same = bool(torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=1e-9))
    if not same:
        raise RuntimeError(f"DDP ranks diverged: parameter checksums {gathered.tolist()}")
    return same
