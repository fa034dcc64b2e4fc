"""Loading a trained model to use it: weights, config and tokenizer from a model directory, a run directory or a
Lightning checkpoint, and freezing a model that is used but never trained.

This sits beside the model, below every stage, server, evaluation and CLI that loads one (as litgpt's
`load_checkpoint` and nanoGPT's `GPT.from_pretrained` do), and imports neither Lightning nor Hydra. Errors are
exceptions naming the path; only the command line turns them into exit codes.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from neuraflux.chat import BOS, END, EOS, PAD
from neuraflux.model.config import NanoConfig, recorded_tokenizer_fingerprint
from neuraflux.model.nano import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    NanoLM,
    check_weights_file,
    load_state_checked,
)
from neuraflux.model.quantize import QUANT_FILE
from neuraflux.tokenizer import NanoTokenizer

# what must agree between two models for weights to move from one to the other
SHAPE_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "max_position_embeddings")


def load_checkpoint_file(path: str | Path, mmap: bool = False) -> dict:
    """A Lightning checkpoint as plain data; weights_only, so the file can't run code. ValueError naming the file
    when it is empty, truncated or not a NeuraFlux checkpoint. `mmap` maps the tensors instead of reading them: a
    cheap check that the whole file is there."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    size = path.stat().st_size
    reason = None
    if size == 0:
        reason = "the file is empty (0 bytes)"
    elif not zipfile.is_zipfile(path):  # torch.save writes a zip whose directory is the last thing written
        reason = f"{size:,} bytes without the zip directory that ends every torch checkpoint"
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as err:  # what a damaged archive raises depends on where it is damaged
            reason = first_line(err)
    if reason is not None:
        raise ValueError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {reason}")
    if not isinstance(ckpt, dict) or "neuraflux" not in ckpt:
        raise ValueError(f"{path}: not a NeuraFlux checkpoint (no model config or tokenizer stored in it)")
    return ckpt


def model_directory(source: Path) -> Path:
    """A run directory's `model/`, or the model directory itself."""
    return source / "model" if (source / "model" / CONFIG_FILE).is_file() else source


def inspect_pretrained(source: str | Path) -> tuple[NanoConfig, NanoTokenizer]:
    """The config and tokenizer `load_pretrained(source)` would return, every file it reads checked (config.json
    sane, tokenizer.json belonging to the weights, the weights file or checkpoint whole) but no weights read: what
    a run validates before it starts. Errors name the file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run directory, model directory or checkpoint")
    if source.is_dir():
        model_dir = model_directory(source)
        config_path, tokenizer_path = model_dir / CONFIG_FILE, model_dir / TOKENIZER_FILE
        if (model_dir / QUANT_FILE).is_file():  # model/quantize.py's directory: int8, inference only
            raise ValueError(
                f"{model_dir} holds an int8-quantized model, which is for inference (generate, chat, serve, eval): "
                "train from the float model it was quantized from"
            )
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a model directory written by save_pretrained")
        from neuraflux.model.hf import inspect_transformers, is_transformers_directory

        if is_transformers_directory(model_dir):  # a GPT-2 / GPT-NeoX checkpoint, e.g. from `neuraflux export`
            config, tokenizer, recorded = inspect_transformers(model_dir)
            check_tokenizer_fits(config, tokenizer, tokenizer_path, config_path, recorded)
            return config, tokenizer
        config, tokenizer = read_model_directory(model_dir)
        check_weights_file(model_dir / WEIGHTS_FILE)
        return config, tokenizer
    extras = load_checkpoint_file(source, mmap=True)["neuraflux"]
    try:
        config = NanoConfig.from_dict(extras["model_config"])
        tokenizer = NanoTokenizer.from_json(extras["tokenizer_json"])
    except Exception as err:  # a checkpoint whose stored config or tokenizer is damaged or from another program
        reason = first_line(err)
        raise ValueError(f"{source}: the model config or tokenizer stored in it is unusable: {reason}") from None
    check_tokenizer_fits(config, tokenizer, f"{source} (its tokenizer)", f"{source} (its model config)")
    return config, tokenizer


def load_pretrained(source: str | Path) -> tuple[NanoLM, NanoTokenizer]:
    """Model and tokenizer from a model directory (safetensors), a run directory holding `model/`, or a .ckpt file
    (its backbone: stages may hold heads beside it). FileNotFoundError names a path that is not there, ValueError a
    file that is damaged or a tokenizer that does not belong to the weights; both before the model is allocated."""
    source = Path(source)
    config, tokenizer = inspect_pretrained(source)
    if source.is_dir():
        from neuraflux.model.hf import is_transformers_directory, load_transformers

        if is_transformers_directory(model_directory(source)):
            return load_transformers(model_directory(source), config), tokenizer
        return NanoLM.from_pretrained(model_directory(source)), tokenizer
    ckpt = load_checkpoint_file(source)
    model = NanoLM(config)
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.transformer.")}
    load_state_checked(model, state, source=str(source))
    return model, tokenizer


def read_model_directory(model_dir: Path) -> tuple[NanoConfig, NanoTokenizer]:
    """config.json and tokenizer.json of a model directory, the tokenizer checked against the weights' config
    (fingerprint, vocabulary, special ids). Errors name the file."""
    config_path, tokenizer_path = model_dir / CONFIG_FILE, model_dir / TOKENIZER_FILE
    config, tokenizer = NanoConfig.load(config_path), read_tokenizer(tokenizer_path)
    check_tokenizer_fits(config, tokenizer, tokenizer_path, config_path, recorded_tokenizer_fingerprint(config_path))
    return config, tokenizer


def read_tokenizer(path: Path) -> NanoTokenizer:
    """`NanoTokenizer.load`, with a damaged file a ValueError naming it."""
    try:
        return NanoTokenizer.load(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # JSON, the tokenizers library's own parse errors, a missing special token
        raise ValueError(f"{path} is unreadable (truncated or not a tokenizer): {first_line(err)}") from None


def check_tokenizer_fits(
    config: NanoConfig, tokenizer: NanoTokenizer, tokenizer_path, config_path, recorded_fingerprint: str | None = None
) -> None:
    """ValueError naming both files when the tokenizer is not the one the weights were trained with (fingerprint
    recorded in config.json; files saved before it was recorded skip this) or can produce ids the model has no
    embedding row for (a tokenizer from another run beside these weights): generation would otherwise fail later
    with an IndexError, or worse, run on the wrong vocabulary."""
    not_theirs = "the tokenizer does not belong to these weights"
    if recorded_fingerprint is not None and tokenizer.fingerprint() != recorded_fingerprint:
        raise ValueError(
            f"{tokenizer_path} has fingerprint {tokenizer.fingerprint()} but {config_path} was saved with the "
            f"tokenizer of fingerprint {recorded_fingerprint}: {not_theirs}"
        )
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{tokenizer_path} has {tokenizer.vocab_size} tokens but {config_path} gives the model "
            f"vocab_size={config.vocab_size}: {not_theirs}"
        )
    specials = {PAD: tokenizer.pad_id, BOS: tokenizer.bos_id, EOS: tokenizer.eos_id, END: tokenizer.end_id}
    for token, token_id in specials.items():
        if not 0 <= token_id < config.vocab_size:
            raise ValueError(
                f"{tokenizer_path} gives {token} the id {token_id} but {config_path} gives the model "
                f"vocab_size={config.vocab_size}: {not_theirs}"
            )
    if config.pad_token_id != tokenizer.pad_id:
        raise ValueError(
            f"{tokenizer_path} pads with id {tokenizer.pad_id} but {config_path} says pad_token_id="
            f"{config.pad_token_id}: {not_theirs}"
        )


def first_line(err: BaseException) -> str:
    """An exception's message without the advice some libraries append on further lines."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0]
    if len(line) > 160 and ". " in line:  # torch's archive errors go on to say whom to report them to
        line = line[: line.index(". ") + 1]
    return f"{type(err).__name__}: {line}"


def load_for_inference(source: str | Path, quantize: str | None = None) -> tuple[NanoLM, NanoTokenizer]:
    """`load_pretrained`, in eval mode; a directory written by `neuraflux quantize` loads as it was saved, and
    `quantize` ("int8" or "int8-dynamic", model/quantize.py) quantizes a float model after loading it. Asking a
    quantized directory for another mode is a ValueError: its float weights are gone."""
    from neuraflux.model import quantize as q

    directory = model_directory(Path(source))
    if (directory / QUANT_FILE).is_file():
        config, tokenizer = read_model_directory(directory)
        model = q.load_quantized(directory, config)
        model.tokenizer = tokenizer
        if quantize is not None and quantize != model.quantization:
            raise q.QuantizationError(
                f"{source} is already quantized to {model.quantization}; quantize the float model to get {quantize}"
            )
        return model, tokenizer
    if quantize is not None:
        q.check_mode(quantize)
        q.torchao_quantization()  # a missing torchao is said before the weights are read
    model, tokenizer = load_pretrained(source)
    model.eval()
    if quantize is not None:
        q.quantize_model(model, quantize)
    return model, tokenizer


def check_same_shape(
    expected: NanoConfig, loaded: NanoConfig, source: str | Path, loaded_is: str = "the checkpoint",
    expected_is: str = "the config asks for",
) -> None:  # fmt: skip
    """ValueError naming the first shape key on which a loaded model differs from the one expected."""
    for key in SHAPE_KEYS:
        a, b = getattr(expected, key), getattr(loaded, key)
        if a != b:
            raise ValueError(f"{source}: {loaded_is} has model.{key}={b} but {expected_is} model.{key}={a}")


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode (no dropout) for a model that is used but never trained."""
    model.requires_grad_(False)
    return model.eval()


@dataclass
class FrozenModels:
    """Models a stage uses but never trains: the reference policy (None once a stage has no more use for it, e.g.
    DPO after precomputing its log-probs) and a reward model. Held in a plain dataclass, not as nn.Module
    attributes, so they stay out of the stage's state_dict (the checkpoint), its parameters (the optimizer), DDP's
    wrapper and Lightning's precision casting."""

    reference: NanoLM | None
    reward_model: nn.Module | None = None

    def to(self, device: torch.device) -> FrozenModels:
        for model in self.modules():
            model.to(device)
        return self

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.reference, self.reward_model) if m is not None]
