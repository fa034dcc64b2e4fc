"""Loading a trained model to use it: weights, config and tokenizer from a model directory, a run directory or a
Lightning checkpoint, and freezing a model that is used but never trained.

This sits beside the model, below every stage, server, evaluation and CLI that loads one (as litgpt's
`load_checkpoint` and nanoGPT's `GPT.from_pretrained` do), and imports neither Lightning nor Hydra. Errors are
exceptions naming the path; only the command line turns them into exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from neuraflux.model.config import NanoConfig
from neuraflux.model.nano import NanoLM, load_state_checked
from neuraflux.tokenizer import NanoTokenizer

# what must agree between two models for weights to move from one to the other
SHAPE_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "max_position_embeddings")


def load_checkpoint_file(path: Path) -> dict:
    """A Lightning checkpoint as plain data; weights_only, so the file can't run code."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "neuraflux" not in ckpt:
        raise ValueError(f"{path}: not a NeuraFlux checkpoint (no model config or tokenizer stored in it)")
    return ckpt


def load_pretrained(source: str | Path) -> tuple[NanoLM, NanoTokenizer]:
    """Model and tokenizer from a model directory (safetensors), a run directory holding `model/`, or a .ckpt file
    (its backbone: stages may hold heads beside it). FileNotFoundError names a path that is not there."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run directory, model directory or checkpoint")
    if source.is_dir():
        model_dir = source / "model" if (source / "model" / "config.json").is_file() else source
        tokenizer = NanoTokenizer.load(model_dir / "tokenizer.json")
        model = NanoLM.from_pretrained(model_dir)
        check_tokenizer_fits(model.config, tokenizer, model_dir / "tokenizer.json", model_dir / "config.json")
        return model, tokenizer
    ckpt = load_checkpoint_file(source)
    extras = ckpt["neuraflux"]
    model = NanoLM(NanoConfig.from_dict(extras["model_config"]))
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.transformer.")}
    load_state_checked(model, state, source=str(source))
    return model, NanoTokenizer.from_json(extras["tokenizer_json"])


def check_tokenizer_fits(config: NanoConfig, tokenizer: NanoTokenizer, tokenizer_path, config_path) -> None:
    """ValueError naming both files when the tokenizer can produce ids the model has no embedding row for (a
    tokenizer from another run beside these weights): generation would otherwise fail later with an IndexError."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{tokenizer_path} has {tokenizer.vocab_size} tokens but {config_path} gives the model "
            f"vocab_size={config.vocab_size}: the tokenizer does not belong to these weights"
        )
    if config.pad_token_id != tokenizer.pad_id:
        raise ValueError(
            f"{tokenizer_path} pads with id {tokenizer.pad_id} but {config_path} says pad_token_id="
            f"{config.pad_token_id}: the tokenizer does not belong to these weights"
        )


def load_for_inference(source: str | Path) -> tuple[NanoLM, NanoTokenizer]:
    """`load_pretrained`, in eval mode."""
    model, tokenizer = load_pretrained(source)
    return model.eval(), tokenizer


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
