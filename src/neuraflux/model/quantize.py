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

Which kernels compute with the int8 weights (`kernel`): torchao stores them either way, but torchao 0.18's own CPU
path converts the whole weight to float on every call (and the whole token table on every lookup), which made int8
decoding 3x slower than float32. `kernel="fused"` (the default) swaps in small modules over the same tensors:
`Int8Linear`, torch's fused int8-weight matmul (`aten._weight_int8pack_mm`, the kernel inductor's weight-only-int8
pattern lowers to), and `Int8Embedding`, which converts only the rows it reads. The fused matmul is vectorized for
bfloat16 activations only, so each layer's input row is rounded to bfloat16 on the way in (the residual stream,
norms, attention and the KV cache stay in the model's float dtype). `int8-dynamic` layers become
`Int8DynamicLinear`: torchao's arithmetic op for op (the same logits, bit for bit) without its per-call tensor
subclass dispatch, the int8 x int8 product on `torch._int_mm` (AMX or VNNI). `kernel="torchao"` is torchao's path
throughout: the reference the fused one is tested against.

Nothing falls back to float silently: a mode torchao cannot apply here, a tensor it did not convert, or a forward
pass that fails on this machine's kernels raises QuantizationError naming the reason. A layer the fused kernel cannot
take (input width not a multiple of 16, where torch 2.13's kernel crashes) keeps torchao's int8 path, and a torch
without the kernel leaves every layer on it, with a warning.
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
KERNELS = ("fused", "torchao")
QUANT_FILE = "quantization.json"
FORMAT_VERSION = 1
# torch 2.13's CPU _weight_int8pack_mm reads the input width in blocks of 16 and crashes (SIGSEGV) on other widths
FUSED_WIDTH_MULTIPLE = 16

log = logging.getLogger(__name__)


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


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise QuantizationError(f"unknown int8 kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    return kernel


def quantize_model(model: NanoLM, mode: str, kernel: str = "fused") -> NanoLM:
    """Quantize a float NanoLM in place for inference (see the module docstring) and return it, in eval mode.

    The head is untied from the embedding first: each becomes its own int8 tensor. `kernel`: "fused" or "torchao",
    what computes with the int8 weights (the module docstring). QuantizationError when torchao is missing, the model
    is already quantized or not on the CPU, a weight was left in float, or the quantized model cannot run a forward
    pass here."""
    check_mode(mode)
    check_kernel(kernel)
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
    use_kernel(model, kernel)
    check_quantized(model)
    return model


# ---- the fused kernels -----------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """A linear layer over torchao's int8 weight (per-row symmetric), computed by `aten._weight_int8pack_mm`, which
    converts int8 to float in registers instead of writing a float copy of the weight. `weight` stays torchao's
    tensor (what is saved, hashed and counted); the kernel reads plain views of its int8 data and scales."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("qdata", linear.weight.qdata, persistent=False)  # (N, K) int8, torchao's storage
        self.register_buffer("scale", linear.weight.scale.reshape(-1), persistent=False)  # (N,) float
        # the kernel multiplies by its scales in bfloat16; ones there, and the float scales applied after, keep the
        # scales exact (a per-row rounding would be the same relative error on every token)
        self.register_buffer("ones", torch.ones(self.qdata.shape[0], dtype=torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N): x rounded to bfloat16, times the int8 rows (float32 accumulation), the product
        rounded to bfloat16, then scaled and biased in x's dtype."""
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, K)
        ones = self.ones.to(torch.bfloat16)  # itself, unless a model.to(dtype) converted the buffer
        y = torch.ops.aten._weight_int8pack_mm(rows, self.qdata, ones).to(x.dtype) * self.scale  # (M, N)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int8DynamicLinear(nn.Module):
    """An int8-dynamic linear layer in three steps instead of torchao's tensor-subclass dispatch: each input row
    quantized to int8 (symmetric, scale = max |x| / 127.5, torchao's formula), an int8 x int8 matmul with int32
    sums (`torch._int_mm`: AMX or VNNI tiles), then the row and weight scales. The arithmetic is torchao's own, op
    for op, so the outputs are its numbers; `weight` stays torchao's tensor."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("qdata", linear.weight.qdata, persistent=False)  # (N, K) int8
        self.register_buffer("scale", linear.weight.scale.reshape(-1), persistent=False)  # (N,) float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (M, K)
        # torchao's choose_qparams_affine (symmetric): max(-min(x, 0), max(x, 0)) is max |x|; float32 eps floor
        x_scale = (rows.abs().amax(dim=-1, keepdim=True).float() / 127.5).clamp_(min=torch.finfo(torch.float32).eps)
        q = torch.clamp(torch.round(rows * (1.0 / x_scale)), -128, 127).to(torch.int8)  # quantize_affine
        y = (torch._int_mm(q, self.qdata.t()).to(torch.float32) * x_scale).to(x.dtype) * self.scale  # (M, N)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """A lookup in torchao's int8 token table that converts only the rows it reads: (q - zero point) * scale, the
    arithmetic of torchao's whole-table dequantization, so the rows are the same numbers."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.weight = embedding.weight
        self.register_buffer("qdata", embedding.weight.qdata, persistent=False)  # (V, C) int8
        self.register_buffer("scale", embedding.weight.scale.reshape(-1, 1), persistent=False)  # (V, 1)
        self.register_buffer("zero_point", embedding.weight.zero_point.reshape(-1, 1), persistent=False)  # (V, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        scale = self.scale.to(torch.float32)
        rows = self.qdata[input_ids].to(torch.float32) - self.zero_point[input_ids].to(torch.float32)
        return (rows * scale[input_ids]).to(self.weight.dtype)


_fused_kernel_error: str | None = None


def fused_kernel_missing() -> str | None:
    """Why torch's fused int8-weight matmul cannot run here (checked once, on a tiny product against the float
    one), or None when it can."""
    global _fused_kernel_error
    if _fused_kernel_error is None:
        try:
            x = torch.arange(32, dtype=torch.bfloat16).reshape(2, 16) / 8
            w = torch.arange(48 * 16).reshape(48, 16).remainder(255).sub(127).to(torch.int8)
            got = torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(48, dtype=torch.bfloat16)).float()
            want = x.float() @ w.float().t()
            _fused_kernel_error = "" if torch.allclose(got, want, rtol=1e-2) else "it computes wrong products"
        except (AttributeError, RuntimeError, NotImplementedError) as err:
            _fused_kernel_error = str(err).splitlines()[0] or type(err).__name__
    return _fused_kernel_error or None


def fused_eligible(module: nn.Module) -> bool:
    """A linear layer the fused kernel takes: weight-only int8, symmetric, input width a multiple of 16."""
    weight = getattr(module, "weight", None)
    return (
        _stored_as(weight) == "Int8Tensor"
        and getattr(weight, "act_quant_kwargs", None) is None
        and weight.qdata.shape[1] % FUSED_WIDTH_MULTIPLE == 0
        and not bool(weight.zero_point.any())
    )


def dynamic_eligible(module: nn.Module) -> bool:
    """A linear layer Int8DynamicLinear takes: int8 weights with per-row symmetric int8 activations."""
    weight = getattr(module, "weight", None)
    kwargs = getattr(weight, "act_quant_kwargs", None)
    return (
        _stored_as(weight) == "Int8Tensor"
        and kwargs is not None
        and getattr(weight, "act_pre_scale", None) is None
        and getattr(weight, "act_quant_scale", None) is None
        and type(kwargs.granularity).__name__ == "PerRow"
        and kwargs.mapping_type.name == "SYMMETRIC"
        and not bool(weight.zero_point.any())
    )


def use_kernel(model: NanoLM, kernel: str) -> NanoLM:
    """Swap the int8 modules of a quantized model to `kernel`'s ("fused": Int8Linear or Int8DynamicLinear, and
    Int8Embedding; "torchao": torchao's own modules are kept). Called by quantize_model and load_quantized."""
    if check_kernel(kernel) == "torchao":
        return model
    missing = fused_kernel_missing()
    if missing:
        log.warning("torch's fused int8 matmul is unavailable (%s): int8 layers use torchao's kernels", missing)
    embeddings = model.transformer.embeddings
    embeddings.token = Int8Embedding(embeddings.token)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if dynamic_eligible(child):
                setattr(parent, name, Int8DynamicLinear(child))
            elif not missing and fused_eligible(child):
                setattr(parent, name, Int8Linear(child))
    return model


def quantized_tensors(model: NanoLM) -> dict[str, nn.Module]:
    """The modules whose weight quantize_model turns into int8: every linear layer and the token embedding."""
    embedding = model.transformer.embeddings.token
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Int8Linear, Int8DynamicLinear)) or module is embedding
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


def load_quantized(directory: Path, config: NanoConfig, kernel: str = "fused") -> NanoLM:
    """The model of a directory written by save_quantized, in eval mode, its int8 tensors rebuilt from the stored
    data and computed by `kernel` (`model.io.load_for_inference` checks config.json and tokenizer.json first).
    Errors name the file."""
    from neuraflux.model.nano import load_weights_file

    check_kernel(kernel)
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
    use_kernel(model, kernel)
    check_quantized(model)
    return model


def quantized_size(directory: str | Path) -> int:
    """Bytes of a quantized directory's weights file."""
    return (Path(directory) / WEIGHTS_FILE).stat().st_size
