"""What every stage's checkpoint carries besides Lightning's own state, and how it reaches the disk: written once for
all stages."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

# `temp_path`'s names for checkpoints: the only files `remove_stale_temp_files` ever deletes
TEMP_NAME = re.compile(r"^\.(?P<target>[^/]+\.ckpt)\.tmp-(?P<pid>\d+)$")


class CheckpointExtras(pl.Callback):
    """Adds `checkpoint["neuraflux"]` (the model config, the tokenizer's JSON and the stage's name: the file alone
    rebuilds model and tokenizer, weights_only-safe) and the RNG state, which Lightning does not restore (dropout
    needs it for an exact resume); the RNG comes back when training starts, after what Lightning draws while it
    loads. `train()` adds it to every run; a stage adds its own extras to `checkpoint["neuraflux"]` in its
    `on_save_checkpoint`, which Lightning calls after this."""

    def __init__(self):
        self._rng: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        model = pl_module.model
        checkpoint["neuraflux"] = {
            "model_config": model.config.to_dict(),
            "tokenizer_json": pl_module.tokenizer.to_json(),
            "stage": pl_module.name,
        }
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._rng = checkpoint.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._rng is None:
            return
        torch.set_rng_state(self._rng["torch"])
        if "cuda" in self._rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._rng["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoints, written so that a process killed mid-write never costs the previous
    checkpoint: the new one goes to a temp file beside the target, is flushed and fsynced, then renamed over it.

    Lightning's own writer commits through a temp file from `tempfile.mkstemp()`, in /tmp: on another file system
    (tmpfs) the commit is a copy onto `last.ckpt`, so a SIGKILL during it left `last.ckpt` truncated (0 bytes) and
    the temp file behind, and `resume=last` failed with a bare EOFError. `train()` installs this for every run; every
    save goes through it, including ModelCheckpoint's `save_last=True` (`validate` refuses `save_last="link"`,
    which replaces last.ckpt by a remove and a symlink, outside any CheckpointIO). Remote paths (s3://...) keep
    Lightning's writer: object stores have no rename, and an upload there is whole or absent."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        from fsspec.implementations.local import LocalFileSystem

        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomically(Path(path), lambda f: torch.save(checkpoint, f))


def temp_path(target: Path) -> Path:
    """Where `target` is written before it replaces the old one: in its own directory, so that the replace is a
    rename within one file system and never a copy; hidden; named after the writing process, so that a leftover can
    be told from a write still going on."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(file)` into `temp_path(path)`, fsync, `os.replace` onto `path`, fsync the directory (so the rename
    itself survives a power cut). Until the replace, `path` is the previous file, whole; after it, the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # an exception, not a kill: nothing to leave behind
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory; its renames are journaled by NTFS
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_stale_temp_file(path: Path) -> bool:
    """A checkpoint temp file (`temp_path`'s name) whose writing process no longer runs: what a killed write left."""
    match = TEMP_NAME.match(path.name)
    return match is not None and path.is_file() and not process_running(int(match["pid"]))


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files killed checkpoint writes left in `directory`, and return them. Nothing else is
    touched: not a file of another name, not the temp file of a process still writing."""
    if not directory.is_dir():
        return []
    stale = [p for p in sorted(directory.iterdir()) if is_stale_temp_file(p)]
    for p in stale:
        p.unlink(missing_ok=True)
        log.warning("removed %s, left behind by a checkpoint write that was killed", p)
    return stale


def process_running(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end it there; never delete what might be in use
        return True
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to someone else
        return True
    except OverflowError:
        return False
    return True
