"""Files a run writes and reads back: a checkpoint survives a run killed while writing the next one, leftovers of
killed writes are cleaned up (and nothing else), and a damaged checkpoint, weights file, config.json or a tokenizer
that is not the weights' own is refused with one error naming the file, before anything is allocated or trained."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from neuraflux.callbacks.checkpoint import AtomicCheckpointIO, remove_stale_temp_files, write_atomically
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.model.io import load_checkpoint_file, load_for_inference, load_pretrained
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.train import train
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

# Trains like `train(compose_cfg(OUTPUT_DIR, *OVERRIDES))`, but dies by SIGKILL (as under the OOM killer or a
# pre-empted job: no except, no finally) halfway through writing a checkpoint to a file in checkpoints/ while a
# last.ckpt is already there, i.e. while the second last.ckpt is written.
KILLED_MID_WRITE = """
import io, os, signal, sys
from pathlib import Path

import torch

from neuraflux.train import train
from tests.conftest import compose_cfg

real_save = torch.save


def save_then_die(obj, f, *args, **kwargs):
    target = Path(getattr(f, "name", ""))
    if isinstance(f, io.BufferedWriter) and (target.parent / "last.ckpt").exists():
        whole = io.BytesIO()
        real_save(obj, whole, *args, **kwargs)
        f.write(whole.getvalue()[: whole.tell() // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save_then_die
train(compose_cfg(Path(sys.argv[1]), *sys.argv[2:]))
"""

# only `last` writes (no best-N.ckpt), one last.ckpt at step 2 and the killed one at step 4
KILL_RUN = ["trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.checkpoint=null"]


def test_a_run_killed_while_writing_last_ckpt_keeps_the_previous_one_and_resumes_from_it(tiny_cfg, tmp_path):
    killed = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path), *KILL_RUN],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, stderr[-3000:]  # it died mid-write, as arranged
    ckpts = tmp_path / "run" / "checkpoints"
    # the half-written checkpoint sits beside last.ckpt, under the writer's temp name; last.ckpt is step 2, whole
    leftover = ckpts / f".last.ckpt.tmp-{killed.pid}"
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(["last.ckpt", leftover.name])
    assert leftover.stat().st_size > 0
    assert load_checkpoint_file(ckpts / "last.ckpt")["global_step"] == 2

    # the next start removes the leftover and continues from step 2 to step 4
    _, resumed = train(tiny_cfg(*KILL_RUN, f"resume={tmp_path / 'run'}", f"paths.run_dir={tmp_path / 'resumed'}"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert isinstance(resumed["trainer"].strategy.checkpoint_io, AtomicCheckpointIO)
    assert resumed["trainer"].global_step == 4
    assert load_checkpoint_file(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_a_failed_write_leaves_the_previous_file_and_no_temp_file(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}

    def half_then_fail(f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_only_leftovers_of_dead_writers_are_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    keep = [
        "last.ckpt",
        "notes.txt",
        f".last.ckpt.tmp-{os.getpid()}",  # this process: a write that may be going on
        ".last.ckpt.tmp-abc",
        f"last.ckpt.tmp-{gone.pid}",  # not hidden: not a name this package writes
        f".config.json.tmp-{gone.pid}",  # not a checkpoint
    ]
    removed = [f".last.ckpt.tmp-{gone.pid}", f".best-4.ckpt.tmp-{gone.pid}"]
    for name in keep + removed:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in remove_stale_temp_files(tmp_path)) == sorted(removed)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def fake_checkpoint() -> bytes:
    """A whole torch checkpoint's bytes, as train() writes them (a zip archive)."""
    buffer = io.BytesIO()
    torch.save({"neuraflux": {}, "state_dict": {"w": torch.zeros(4096)}}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "the file is empty (0 bytes)"),
        (fake_checkpoint()[:9000], "9,000 bytes without the zip directory that ends every torch checkpoint"),
        (b"not a checkpoint\n" * 100, "1,700 bytes without the zip directory that ends every torch checkpoint"),
    ],
    ids=["empty", "truncated", "text"],
)
@pytest.mark.parametrize("resume", ["last", "PATH"])
def test_resume_from_an_unreadable_checkpoint_names_it_before_anything_is_done(tiny_cfg, tmp_path, content, reason,
                                                                               resume):  # fmt: skip
    ckpt = tmp_path / "pretrain" / "2026-01-01_00-00-00" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(content)
    with pytest.raises(ValueError) as err:
        train(tiny_cfg(f"resume={ckpt if resume == 'PATH' else 'last'}"))
    assert str(err.value) == f"resume: checkpoint {ckpt} is unreadable (truncated or not a checkpoint): {reason}"
    assert not (tmp_path / "run").exists()
    assert ckpt.read_bytes() == content  # never touched


def test_save_last_link_is_refused(tiny_cfg, tmp_path):
    # ModelCheckpoint's link mode removes last.ckpt, then links the new one: outside any CheckpointIO
    with pytest.raises(ValueError, match=r"^callbacks.checkpoint.save_last=link replaces last.ckpt .* save_last=true"):
        train(tiny_cfg("callbacks.checkpoint.save_last=link"))
    assert not (tmp_path / "run").exists()


# ---- model directories: the tokenizer beside the weights, damaged files -----------------------------------------


def tiny_lm(vocab_size: int = 64) -> NanoLM:
    torch.manual_seed(0)
    return NanoLM(NanoConfig(vocab_size=vocab_size, block_size=16, max_position_embeddings=32, n_layer=1, n_head=2,
                             n_embd=8))  # fmt: skip


def test_a_tokenizer_other_than_the_one_saved_with_the_weights_is_refused_naming_both_files(tmp_path):
    ours = NanoTokenizer.train(["abcd efgh"], 0, mode="char")
    theirs = NanoTokenizer.train(["wxyz stuv"], 0, mode="char")
    # what the size and special-id checks cannot see: same size, same special ids, another vocabulary
    assert (ours.vocab_size, ours.special_ids) == (theirs.vocab_size, theirs.special_ids)
    model_dir = tmp_path / "model"
    tiny_lm().save_pretrained(model_dir, ours)
    assert json.loads((model_dir / "config.json").read_text())["tokenizer_fingerprint"] == ours.fingerprint()
    model, tokenizer = load_pretrained(model_dir)
    assert tokenizer.fingerprint() == ours.fingerprint()
    torch.testing.assert_close(model.lm_head.weight, tiny_lm().lm_head.weight)

    theirs.save(model_dir / "tokenizer.json")
    expected = (
        f"{model_dir / 'tokenizer.json'} has fingerprint {theirs.fingerprint()} but {model_dir / 'config.json'} was "
        f"saved with the tokenizer of fingerprint {ours.fingerprint()}: the tokenizer does not belong to these weights"
    )
    for load in (load_pretrained, load_for_inference):
        with pytest.raises(ValueError) as err:
            load(model_dir)
        assert str(err.value) == expected
    with pytest.raises(ValueError) as err:  # a run directory holding model/ too
        load_pretrained(tmp_path)
    assert str(err.value) == expected

    # a model saved before fingerprints were recorded: the size and special-id checks only
    old_dir = tmp_path / "old"
    tiny_lm().save_pretrained(old_dir)
    theirs.save(old_dir / "tokenizer.json")
    assert "tokenizer_fingerprint" not in json.loads((old_dir / "config.json").read_text())
    assert load_pretrained(old_dir)[1].fingerprint() == theirs.fingerprint()


def test_train_records_the_tokenizer_in_the_exported_model(tiny_cfg):
    _, objects = train(tiny_cfg("trainer.max_steps=2", "trainer.val_check_interval=2"))
    config = json.loads((objects["run_dir"] / "model" / "config.json").read_text())
    assert config["tokenizer_fingerprint"] == objects["tokenizer"].fingerprint()
    assert load_pretrained(objects["run_dir"])[1].fingerprint() == objects["tokenizer"].fingerprint()


def test_a_special_token_id_beyond_the_model_vocabulary_is_refused(tmp_path):
    tokenizer = NanoTokenizer.train(["the cat sat on the mat " * 20], vocab_size=300)
    data = json.loads(tokenizer.to_json())
    # a tokenizer of 275 tokens, fewer than the model's 512 rows, whose <|end|> is id 600: generation would stop on
    # an id the embedding has no row for
    for token in data["added_tokens"]:
        if token["content"] == "<|end|>":
            token["id"] = 600
    data["model"]["vocab"]["<|end|>"] = 600
    model_dir = tmp_path / "m"
    tiny_lm(512).save_pretrained(model_dir)
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    assert NanoTokenizer.load(model_dir).vocab_size < 512
    with pytest.raises(ValueError) as err:
        load_pretrained(model_dir)
    assert str(err.value) == (
        f"{model_dir / 'tokenizer.json'} gives <|end|> the id 600 but {model_dir / 'config.json'} gives the model "
        "vocab_size=512: the tokenizer does not belong to these weights"
    )


def damage(model_dir, name: str, how: str) -> None:
    path = model_dir / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\xff\xfe not what it should be " * 40)
    elif how == "list":
        path.write_text("[1, 2, 3]\n")
    else:  # a config.json key set to a value or removed
        config = json.loads(path.read_text())
        key, _, value = how.partition("=")
        if value:
            config[key] = json.loads(value)
        else:
            del config[key]
        path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "name, how, message",
    [
        ("model.safetensors", "truncated", " is unreadable (truncated or not safetensors): Error while deserializing"),
        ("model.safetensors", "empty", " is unreadable (truncated or not safetensors): Error while deserializing"),
        ("config.json", "truncated", " is unreadable (truncated or not JSON): "),
        ("config.json", "garbage", " is unreadable (truncated or not JSON): "),
        ("config.json", "list", ": a model config is a JSON object, got list"),
        ("config.json", "n_embd", ": model config without ['n_embd']: not a config.json written by save_pretrained"),
        ("config.json", "vocab_size=1000000000000", ": model.vocab_size must be <= 2,097,152, got 1,000,000,000,000"),
        ("config.json", "n_embd=1000000000", ": model.n_embd must be <= 65,536, got 1,000,000,000"),
        ("config.json", 'n_layer="six"', ": model.n_layer must be a positive integer, got 'six'"),
        ("tokenizer.json", "truncated", " is unreadable (truncated or not a tokenizer): "),
    ],
)
def test_a_damaged_model_file_is_one_error_naming_it(tmp_path, name, how, message):
    model_dir = tmp_path / "m"
    tiny_lm().save_pretrained(model_dir, NanoTokenizer.train(["abcd efgh"], 0, mode="char"))
    damage(model_dir, name, how)
    with pytest.raises(ValueError) as err:
        load_pretrained(model_dir)
    assert str(err.value).startswith(f"{model_dir / name}{message}")
    assert "\n" not in str(err.value)


def test_a_damaged_init_from_is_named_before_the_run_starts(tiny_cfg, tmp_path):
    cfg = tiny_cfg("stage=sft")
    model_dir = tmp_path / "m"
    NanoLM(NanoConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))).save_pretrained(
        model_dir, NanoTokenizer.train(["abcd efgh"], 0, mode="char")
    )
    damage(model_dir, "model.safetensors", "truncated")
    with pytest.raises(ValueError) as err:
        train(tiny_cfg("stage=sft", f"stage.init_from={model_dir}"))
    assert str(err.value).startswith(
        f"stage.init_from: {model_dir / 'model.safetensors'} is unreadable (truncated or not safetensors): "
    )
    assert not (tmp_path / "run").exists()
