"""Int8 quantization for inference, built on torchao, and the quantized model directory.

Two modes (`--quantize` on generate, chat, serve and eval; `neuraflux quantize MODEL OUT`):

- `int8`: weight-only. Every linear layer's weight, the output head included, is stored as int8 with one float
  scale per output row (symmetric); activations stay in the model's float dtype.
- `int8-dynamic`: int8 weights as above, and each activation row quantized to int8 on the fly before the matmul.

The head is tied to the token embedding in training; here it gets its own int8 copy, and the embedding table is
stored as int8 rows too (a lookup dequantizes the rows it reads), so a quantized directory holds no float copy of
the vocabulary matrix. Layer norms, biases and position tables stay in float: they are a few kilobytes.

A quantized directory is config.json, tokenizer.json, model.safetensors (int8 data and float scales as plain
tensors: no pickle) and quantization.json (the mode and, per quantized tensor, how to rebuild it). Loading it puts
the stored int8 data back into torchao's tensors; nothing is quantized again. It is for inference only: training
refuses it (`model.io.load_pretrained`).

Nothing falls back to float silently: a mode torchao cannot apply here, a tensor it did not convert, or a forward
pass that fails on this machine's kernels raises QuantizationError naming the reason.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from neuraflux.model.config import NanoConfig
from neuraflux.model.nano import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, NanoLM

MODES = ("int8", "int8-dynamic")
QUANT_FILE = "quantization.json"
FORMAT_VERSION = 1


class QuantizationError(ValueError):
    """A model that cannot be quantized as asked, or a quantized directory that cannot be loaded."""


@contextmanager
def _quiet_torchao_import():
    """torchao's import tries to load its CUDA kernels and logs one warning per library it cannot load, and
    registers enums with torch's pytree (a deprecation notice from torch): noise on every CPU. Only those two
    loggers, only while importing."""
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torchao_quantization():
    """torchao.quantization, or QuantizationError naming the extra to install."""
    try:
        with _quiet_torchao_import():
            import torchao.quantization as tq
    except ImportError:
        raise QuantizationError(
            "quantization needs torchao: pip install 'neuraflux[quantize]' (or pip install torchao)"
        ) from None
    return tq


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def torchao_config(mode: str):
    """torchao's config object for one of MODES (applied to every linear layer)."""
    tq = torchao_quantization()
    return tq.Int8WeightOnlyConfig() if mode == "int8" else tq.Int8DynamicActivationInt8WeightConfig()


def _embedding_config():
    tq = torchao_quantization()
    from torchao.quantization.granularity import PerAxis

    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


def quantize_model(model: NanoLM, mode: str) -> NanoLM:
    """Quantize a float NanoLM in place for inference (see the module docstring) and return it, in eval mode.

    The head is untied from the embedding first: each becomes its own int8 tensor. QuantizationError when torchao
    is missing, the model is already quantized or not on the CPU, a weight was left in float, or the quantized model
    cannot run a forward pass here."""
    check_mode(mode)
    if getattr(model, "quantization", None) is not None:
        raise QuantizationError(f"the model is already quantized ({model.quantization})")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise QuantizationError(f"int8 quantization runs on the CPU; the model is on {device}")
    tq = torchao_quantization()
    model.eval().requires_grad_(False)
    embedding = model.transformer.embeddings.token
    head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False, dtype=embedding.weight.dtype)
    head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    model.lm_head = head  # untied: the head's int8 copy is laid out for matmuls, the table's for lookups
    try:
        tq.quantize_(model, torchao_config(mode), filter_fn=lambda m, _: isinstance(m, nn.Linear))
        tq.quantize_(model, _embedding_config(), filter_fn=lambda m, _: m is embedding)
    except Exception as err:  # torchao's own refusals: a shape or dtype its kernels do not take
        raise QuantizationError(f"torchao could not quantize the model to {mode}: {err}") from None
    model.quantization = mode
    check_quantized(model)
    return model


def quantized_tensors(model: NanoLM) -> dict[str, nn.Module]:
    """The modules whose weight quantize_model turns into int8: every linear layer and the token embedding."""
    embedding = model.transformer.embeddings.token
    return {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) or module is embedding
    }


def check_quantized(model: NanoLM) -> None:
    """QuantizationError unless every weight meant to be int8 is, and a forward pass runs (the kernels exist on this
    machine and take these shapes): a float fallback would look like a working quantized model."""
    left = [name for name, m in quantized_tensors(model).items() if _stored_as(m.weight) is None]
    if left:
        raise QuantizationError(f"weights left in float after quantizing to {model.quantization}: {left[:4]}")
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))
    except Exception as err:
        raise QuantizationError(f"the {model.quantization} model cannot run on this machine: {err}") from None


def _stored_as(weight: torch.Tensor) -> str | None:
    """Which of torchao's int8 tensor types a weight is, or None for a plain tensor."""
    name = type(weight).__name__
    return name if name in ("Int8Tensor", "IntxUnpackedToInt8Tensor") else None


# ---- the quantized directory ----------------------------------------------------------------------------------


def save_quantized(model: NanoLM, tokenizer, directory: str | Path) -> Path:
    """Write a quantized model directory (config.json, tokenizer.json, model.safetensors, quantization.json)."""
    from safetensors.torch import save_file

    mode = getattr(model, "quantization", None)
    if mode is None:
        raise QuantizationError("save_quantized needs a model quantized by quantize_model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_FILE, tokenizer.fingerprint())
    tokenizer.save(directory / TOKENIZER_FILE)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for key, value in model.state_dict().items():
        kind = _stored_as(value)
        if kind is None:
            tensors[key] = value.detach().contiguous()
            continue
        tensors[f"{key}.qdata"] = value.qdata.contiguous()
        tensors[f"{key}.scale"] = value.scale.contiguous()
        tensors[f"{key}.zero_point"] = value.zero_point.contiguous()
        layout[key] = {"type": kind, "block_size": list(value.block_size), "dtype": str(value.dtype)[6:]}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "quantization": mode})
    record = {"format_version": FORMAT_VERSION, "mode": mode, "tensors": layout}
    (directory / QUANT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def load_quantized(directory: Path, config: NanoConfig) -> NanoLM:
    """The model of a directory written by save_quantized, in eval mode, its int8 tensors rebuilt from the stored
    data (`model.io.load_for_inference` checks config.json and tokenizer.json first). Errors name the file."""
    from neuraflux.model.nano import load_weights_file

    record_path = directory / QUANT_FILE
    try:
        record = json.loads(record_path.read_text())
        mode, layout = check_mode(record["mode"]), record["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise QuantizationError(f"{record_path} is unreadable: {err}") from None
    if record.get("format_version") != FORMAT_VERSION:
        raise QuantizationError(f"{record_path}: format_version {record.get('format_version')} is not {FORMAT_VERSION}")
    stored = load_weights_file(directory / WEIGHTS_FILE)
    torchao_quantization()
    from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    act_kwargs = None
    if mode == "int8-dynamic":  # what Int8DynamicActivationInt8WeightConfig attaches: per-row symmetric int8
        act_kwargs = QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
    with torch.device("meta"):
        model = NanoLM(config)
    model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")
    state = {}
    try:
        for key, spec in layout.items():
            parts = [stored.pop(f"{key}.{p}") for p in ("qdata", "scale", "zero_point")]
            dtype = getattr(torch, spec["dtype"])
            if spec["type"] == "Int8Tensor":
                state[key] = Int8Tensor(*parts[:2], spec["block_size"], dtype, parts[2], act_quant_kwargs=act_kwargs)
            elif spec["type"] == "IntxUnpackedToInt8Tensor":
                state[key] = IntxUnpackedToInt8Tensor(*parts, torch.int8, spec["block_size"], dtype, None)
            else:
                raise KeyError(f"unknown tensor type {spec['type']!r}")
    except KeyError as err:
        raise QuantizationError(f"{directory / WEIGHTS_FILE} does not match {record_path}: {err}") from None
    state.update(stored)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise QuantizationError(
            f"{directory / WEIGHTS_FILE}: weights do not match the model: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    model.load_state_dict(state, assign=True)  # the model has no buffers: rotary angles are computed per call
    model.requires_grad_(False).eval()
    model.quantization = mode
    check_quantized(model)
    return model


def quantized_size(directory: str | Path) -> int:
    """Bytes of a quantized directory's weights file."""
    return (Path(directory) / WEIGHTS_FILE).stat().st_size
