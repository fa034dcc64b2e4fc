"""Diagnostics: attention maps, gradient flow, activation statistics, LR schedule, text samples.

Every callback writes to each of the trainer's loggers through its sink (`sinks.py`: TensorBoard, CSV, MLflow),
on global rank zero only, at `trainer.global_step`; without such a logger it does nothing. Each one works only on
the steps it logs, with `every_n_steps` (0 or None switches it off). Extra forwards run without gradients in eval
mode (so dropout does not blur what is measured) and the model's train/eval mode is restored afterwards; tensors are
cast to float32 before they leave the device, so bf16 training logs the same way as float32.

Steps: hooks that run after a batch (attention, activations, samples) see the weights after `global_step`
optimizer updates and log when the step count reaches a multiple of `every_n_steps`; gradient and LR hooks run
before the update numbered `global_step` (counting from 0).

The stage contract: `pl_module.model` is a model on the shared backbone (`.transformer`, a `NanoModel`): a `NanoLM`
or a `NanoRewardModel`; `pl_module.tokenizer` a `NanoTokenizer`. Text samples need a `NanoLM` (a reward model does
not generate: that logger says so once and stays off).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn as nn

from neuraflux.callbacks.sinks import diagnostic_sinks, has_sinks
from neuraflux.model import NanoLM, NanoModel, generate

log = logging.getLogger(__name__)

# GELU(x) is within 1e-2 of zero for x in about (-0.02, 0.02) and again below about -3.5, where the unit is
# effectively off; a rising fraction of such outputs is the "dead neuron" signal.
GELU_ZERO_THRESHOLD = 1e-2


# ---- shared plumbing ---------------------------------------------------------------------------------------
def check_every_n_steps(owner: str, every_n_steps: int | None) -> int:
    """A logging period as an int, 0 meaning off; rejects negatives and non-integers."""
    if every_n_steps is None:
        return 0
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
        raise ValueError(f"{owner}.every_n_steps must be a non-negative integer or None, got {every_n_steps!r}")
    return every_n_steps


def crossed_multiple(before: int, after: int, every_n_steps: int) -> bool:
    """Whether the step count moved from `before` to `after` past a multiple of every_n_steps (0 = never).

    A batch that only accumulates gradients leaves the count unchanged, so it never logs; a manually optimized
    stage that steps twice in one batch still logs when it jumps over a multiple.
    """
    return every_n_steps > 0 and after // every_n_steps > before // every_n_steps


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; the previous train/eval mode afterwards, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def stage_model(owner: str, pl_module: pl.LightningModule) -> nn.Module:
    """The stage's model: anything on the shared backbone (a `.transformer` NanoModel), LM or reward model."""
    model = getattr(pl_module, "model", None)
    if not isinstance(getattr(model, "transformer", None), NanoModel):
        raise TypeError(
            f"{owner} needs pl_module.model to be a model on the NanoModel backbone (a NanoLM or a "
            f"NanoRewardModel); {type(pl_module).__name__}.model is {type(model).__name__}"
        )
    return model


def stage_tokenizer(owner: str, pl_module: pl.LightningModule):
    tokenizer = getattr(pl_module, "tokenizer", None)
    if tokenizer is None:
        raise TypeError(f"{owner} needs pl_module.tokenizer; {type(pl_module).__name__} has none")
    return tokenizer


def encode_probe(owner: str, tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """(1, T) ids of a probe text, cut to its first max_tokens tokens."""
    ids = tokenizer.encode(text)[:max_tokens]
    if not ids:
        raise ValueError(f"{owner}.text {text!r} encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long)


def warn_no_writer(owner: str, trainer: pl.Trainer) -> None:
    if trainer.is_global_zero and not has_sinks(trainer):
        log.warning("%s: the trainer has no TensorBoard, CSV or MLflow logger, so it logs nothing", owner)


# ---- 1. attention maps -------------------------------------------------------------------------------------
def attention_grid(maps: torch.Tensor, pixels_per_token: int = 1) -> torch.Tensor:
    """One layer's heads side by side: (H, T, T) -> (T*p, (H*T + H-1)*p) with p = pixels_per_token.

    Heads are separated by a one-token-wide column of 1.0 (white); values are the attention weights
    themselves, so each head's rows sum to 1 (before the image's 8-bit rounding).
    """
    if maps.dim() != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"attention maps must have shape (H, T, T), got {tuple(maps.shape)}")
    H, T, _ = maps.shape
    gap = maps.new_ones(T, 1)
    tiles: list[torch.Tensor] = []
    for h in range(H):
        if h:
            tiles.append(gap)
        tiles.append(maps[h])
    grid = torch.cat(tiles, dim=1)  # (T, H*T + H-1)
    return grid.repeat_interleave(pixels_per_token, 0).repeat_interleave(pixels_per_token, 1)


def to_uint8_image(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> rounded uint8 (TensorBoard itself would truncate, darkening every pixel)."""
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class AttentionMapLogger(pl.Callback):
    """Every `every_n_steps` steps, the attention of each selected layer on a fixed probe text.

    Per layer, tag `attention/layer{i}`: a figure of heatmaps, one per head, with the probe's tokens on both axes
    (queries down, keys across) and a colour scale (`viz.attention_figure`); and `attention_raw/layer{i}`, the
    exact weights as one grayscale image (heads left to right, brightness = weight, each token `pixels_per_token`
    pixels wide). The tokens are also logged once as text under `attention/tokens`.

    Args:
        text: the probe text; its first `max_tokens` tokens are used (also capped at the model's
            max_position_embeddings).
        layers: layer indices to log; None logs every layer.
    """

    def __init__(
        self,
        every_n_steps: int | None,
        text: str,
        max_tokens: int = 64,
        layers: list[int] | None = None,
        pixels_per_token: int = 4,
    ):
        self.every_n_steps = check_every_n_steps("AttentionMapLogger", every_n_steps)
        if not isinstance(text, str) or not text:
            raise ValueError(f"AttentionMapLogger.text must be a non-empty string, got {text!r}")
        if max_tokens <= 0:
            raise ValueError(f"AttentionMapLogger.max_tokens must be positive, got {max_tokens}")
        if pixels_per_token <= 0:
            raise ValueError(f"AttentionMapLogger.pixels_per_token must be positive, got {pixels_per_token}")
        self.text, self.max_tokens, self.pixels_per_token = text, max_tokens, pixels_per_token
        self.layers = None if layers is None else [int(i) for i in layers]
        self._ids: torch.Tensor | None = None  # (1, T), set in setup
        self._step_before = 0
        self._logged_at: int | None = None
        self._tokens_logged = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.every_n_steps:
            return
        model = stage_model("AttentionMapLogger", pl_module)
        tokenizer = stage_tokenizer("AttentionMapLogger", pl_module)
        n_layer = model.config.n_layer
        bad = [i for i in self.layers or [] if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"AttentionMapLogger.layers has {bad}, but the model has layers 0..{n_layer - 1}")
        cap = min(self.max_tokens, model.config.max_position_embeddings)
        self._ids = encode_probe("AttentionMapLogger", tokenizer, self.text, cap)
        warn_no_writer("AttentionMapLogger", trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if crossed_multiple(self._step_before, trainer.global_step, self.every_n_steps):
            self.log_maps(trainer, pl_module)

    # also when training starts and ends: a stage shorter than every_n_steps (the RL stages) still shows them
    def on_train_start(self, trainer, pl_module) -> None:
        if self.every_n_steps:
            self.log_maps(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps and self._logged_at != trainer.global_step:
            self.log_maps(trainer, pl_module)

    def log_maps(self, trainer, pl_module) -> None:
        step = trainer.global_step
        sinks = diagnostic_sinks(trainer)
        if not sinks:
            return
        self._logged_at = step
        model = pl_module.model
        ids = self._ids.to(pl_module.device)
        with trainer.precision_plugin.forward_context(), eval_mode(model), torch.no_grad():
            _, maps = model.transformer(ids, need_weights=True)  # per layer (1, H, T, T)
        from neuraflux.viz import attention_figure

        tokens = [pl_module.tokenizer.decode([t]) for t in self._ids[0].tolist()]
        stack = [m[0].float().cpu().numpy() for m in maps]  # per layer (H, T, T)
        for i in self.layers if self.layers is not None else range(len(maps)):
            image = to_uint8_image(attention_grid(maps[i][0].float(), self.pixels_per_token))
            figure = attention_figure(stack, tokens, layer=i, dpi=80)
            figure.suptitle(f"step {step}", fontsize=9)
            for sink in sinks:
                sink.log_image(f"attention_raw/layer{i}", image, step)
                sink.log_figure(f"attention/layer{i}", figure, step)
        if not self._tokens_logged:
            for sink in sinks:
                sink.log_text("attention/tokens", " | ".join(f"`{t!r}`" for t in tokens), step)
            self._tokens_logged = True


# ---- 2. gradient flow --------------------------------------------------------------------------------------
@dataclass
class GradientNorms:
    """L2 norms of the gradients by block; None where no parameter of the block has a gradient (frozen)."""

    # token and position tables; the token table is tied to the LM head, so its gradient includes the head's
    embeddings: float | None
    layers: list[float | None]
    final_norm: float | None
    head: float | None = None  # parameters outside the backbone (a reward model's score head); an LM's is tied

    def scalars(self) -> dict[str, float]:
        """TensorBoard tag -> value, blocks without gradients left out."""
        named = {"grad_norm/embeddings": self.embeddings, "grad_norm/final_norm": self.final_norm,
                 "grad_norm/head": self.head}  # fmt: skip
        named.update({f"grad_norm/layer{i}": v for i, v in enumerate(self.layers)})
        return {tag: v for tag, v in named.items() if v is not None}


def flat_gradients(module: nn.Module) -> torch.Tensor | None:
    """Every gradient of the module's parameters as one float32 vector; None when none has a gradient."""
    grads = [p.grad.detach().float().flatten() for p in module.parameters() if p.grad is not None]
    return torch.cat(grads) if grads else None


def gradient_norms(model: nn.Module) -> GradientNorms:
    """Per-block gradient L2 norms of a model on the backbone (`model.transformer`), read with one device sync."""
    t = model.transformer
    in_backbone = {id(p) for p in t.parameters()}
    head = [p for p in model.parameters() if id(p) not in in_backbone]
    blocks = [t.embeddings.parameters(), *(layer.parameters() for layer in t.layers), t.ln_f.parameters(), head]
    norms: list[torch.Tensor | None] = []
    for block in blocks:
        grads = [p.grad.detach() for p in block if p.grad is not None]
        per_tensor = [torch.linalg.vector_norm(g.float()) for g in grads]
        # the norm of the per-tensor norms is the norm of their concatenation, without the copy
        norms.append(torch.linalg.vector_norm(torch.stack(per_tensor)) if per_tensor else None)
    present = [n for n in norms if n is not None]
    values = iter(torch.stack(present).tolist() if present else [])
    floats = [next(values) if n is not None else None for n in norms]
    return GradientNorms(embeddings=floats[0], layers=floats[1:-2], final_norm=floats[-2], head=floats[-1])


class GradientFlowLogger(pl.Callback):
    """Every `every_n_steps` optimizer steps, gradient norms and histograms by block.

    Runs in `on_before_optimizer_step`: the gradients are complete (accumulated, all-reduced, unscaled under
    fp16) and not yet clipped. Scalars `grad_norm/embeddings`, `grad_norm/layer{i}`, `grad_norm/final_norm`;
    histograms `grad_hist/layer{i}`.
    """

    def __init__(self, every_n_steps: int | None):
        self.every_n_steps = check_every_n_steps("GradientFlowLogger", every_n_steps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.every_n_steps:
            stage_model("GradientFlowLogger", pl_module)
            warn_no_writer("GradientFlowLogger", trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps:
            return
        sinks = diagnostic_sinks(trainer)
        if not sinks:
            return
        model = pl_module.model
        norms = gradient_norms(model).scalars()
        hists = {f"grad_hist/layer{i}": flat_gradients(layer) for i, layer in enumerate(model.transformer.layers)}
        hists = {tag: grads.cpu() for tag, grads in hists.items() if grads is not None}
        for sink in sinks:
            sink.log_scalars(norms, step)
            for tag, grads in hists.items():
                sink.log_histogram(tag, grads, step)


# ---- 3. activation statistics ------------------------------------------------------------------------------
@dataclass
class LayerActivationStats:
    """One layer on the probe batch, over real (unpadded) tokens only."""

    mean: float  # of the layer's output (the residual stream), all channels
    std: float  # population std of the same values
    gelu_zero_frac: float  # fraction of MLP GELU outputs with |x| < the zero threshold


def masked_moments(x: torch.Tensor, keep: torch.Tensor, zero_threshold: float) -> torch.Tensor:
    """(mean, population std, fraction with |x| < zero_threshold) of x (B, T, F) at keep (B, T) True."""
    v = x[keep].float()  # (N, F)
    return torch.stack([v.mean(), v.std(correction=0), (v.abs() < zero_threshold).float().mean()])


def activation_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    zero_threshold: float = GELU_ZERO_THRESHOLD,
) -> list[LayerActivationStats]:
    """Per layer, statistics of the layer output and its MLP's GELU output on one no-grad, eval-mode forward.

    input_ids (B, T), attention_mask (B, T) bool or None. Hooks reduce each tensor to three numbers as it is
    produced, so no activation is kept, and are removed before returning.
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    layer_moments: dict[int, torch.Tensor] = {}
    gelu_moments: dict[int, torch.Tensor] = {}

    def on_layer(i: int):
        def hook(module, args, output) -> None:
            # a NanoLayer returns (x, attention weights)
            layer_moments[i] = masked_moments(output[0], keep, zero_threshold)

        return hook

    def on_gelu(i: int):
        def hook(module, args, output) -> None:
            gelu_moments[i] = masked_moments(output, keep, zero_threshold)

        return hook

    layers = model.transformer.layers
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(on_layer(i)))
        handles.append(layer.mlp.act.register_forward_hook(on_gelu(i)))
    try:
        with torch.no_grad(), eval_mode(model):
            model.transformer(input_ids, attention_mask)  # the LM head adds nothing that is reported
    finally:
        for h in handles:
            h.remove()
    rows = torch.stack([torch.cat([layer_moments[i][:2], gelu_moments[i][2:]]) for i in range(len(layers))])
    return [LayerActivationStats(mean, std, frac) for mean, std, frac in rows.tolist()]


def batch_inputs(owner: str, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids (B, T), attention_mask or None) from an LMBatch-like object, a mapping or an id tensor."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(getattr(batch, "input_ids", None), torch.Tensor):
        return batch.input_ids, getattr(batch, "attention_mask", None)
    raise TypeError(
        f"{owner} found no input_ids in a training batch of type {type(batch).__name__}; give it a probe text"
    )


class ActivationStatsLogger(pl.Callback):
    """Every `every_n_steps` steps, per-layer activation statistics from one extra no-grad forward.

    Scalars `activations/layer{i}/mean` and `/std` (layer output) and `activations/layer{i}/gelu_zero_frac`
    (share of the MLP's GELU outputs with |x| < `zero_threshold`, default 1e-2).

    Args:
        text: probe text (cut to the model's block_size); None uses the training batch just seen, padding
            excluded.
        zero_threshold: |x| below which a GELU output counts as zero.
    """

    def __init__(self, every_n_steps: int | None, text: str | None = None, zero_threshold: float = GELU_ZERO_THRESHOLD):
        self.every_n_steps = check_every_n_steps("ActivationStatsLogger", every_n_steps)
        if text is not None and (not isinstance(text, str) or not text):
            raise ValueError(f"ActivationStatsLogger.text must be a non-empty string or None, got {text!r}")
        if zero_threshold <= 0:
            raise ValueError(f"ActivationStatsLogger.zero_threshold must be positive, got {zero_threshold}")
        self.text, self.zero_threshold = text, zero_threshold
        self._ids: torch.Tensor | None = None
        self._step_before = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.every_n_steps:
            return
        model = stage_model("ActivationStatsLogger", pl_module)
        if self.text is not None:
            tokenizer = stage_tokenizer("ActivationStatsLogger", pl_module)
            self._ids = encode_probe("ActivationStatsLogger", tokenizer, self.text, model.config.block_size)
        warn_no_writer("ActivationStatsLogger", trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not crossed_multiple(self._step_before, step, self.every_n_steps):
            return
        sinks = diagnostic_sinks(trainer)
        if not sinks:
            return
        if self._ids is not None:
            ids, mask = self._ids, None
        else:
            ids, mask = batch_inputs("ActivationStatsLogger", batch)
        ids = ids.to(pl_module.device)
        mask = mask.to(pl_module.device) if mask is not None else None
        with trainer.precision_plugin.forward_context():
            stats = activation_stats(pl_module.model, ids, mask, self.zero_threshold)
        scalars = {}
        for i, s in enumerate(stats):
            scalars[f"activations/layer{i}/mean"] = s.mean
            scalars[f"activations/layer{i}/std"] = s.std
            scalars[f"activations/layer{i}/gelu_zero_frac"] = s.gelu_zero_frac
        for sink in sinks:
            sink.log_scalars(scalars, step)


# ---- 4. learning rate --------------------------------------------------------------------------------------
def learning_rates(optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
    """Tag -> LR per param group: `train/lr/group{i}`, or `train/lr/optimizer{k}/group{i}` with several.

    Named apart from the stages' own `train/lr` scalar (group 0's rate) so the two never write the same tag.
    """
    rates: dict[str, float] = {}
    for k, opt in enumerate(optimizers):
        prefix = "train/lr" if len(optimizers) == 1 else f"train/lr/optimizer{k}"
        for i, group in enumerate(opt.param_groups):
            rates[f"{prefix}/group{i}"] = float(group["lr"])
    return rates


class LearningRateLogger(pl.Callback):
    """Every `every_n_steps` steps, the LR of each param group, logged before the optimizer step using it."""

    def __init__(self, every_n_steps: int | None = 1):
        self.every_n_steps = check_every_n_steps("LearningRateLogger", every_n_steps)
        self._last_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.every_n_steps:
            warn_no_writer("LearningRateLogger", trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        # with gradient accumulation several batches share a step: log it once
        if not self.every_n_steps or step % self.every_n_steps or step == self._last_step:
            return
        sinks = diagnostic_sinks(trainer)
        if not sinks:
            return
        self._last_step = step
        rates = learning_rates(trainer.optimizers)
        for sink in sinks:
            sink.log_scalars(rates, step)


# ---- 5. text samples ---------------------------------------------------------------------------------------
@dataclass
class TextSample:
    prompt: str
    completion: str  # decoded new tokens, up to and including the first eos


def sample_texts(
    model: NanoLM,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 20,
    seed: int = 0,
) -> list[TextSample]:
    """Sample one continuation per prompt with `neuraflux.model.generate`, batched with left padding.

    Prompts longer than max_position_embeddings - max_new_tokens keep their last tokens. The generator is
    seeded with `seed` on every call, so samples from different steps differ only because the model did.
    """
    device = model.lm_head.weight.device
    room = model.config.max_position_embeddings - max_new_tokens
    ids, mask = tokenizer.pad_batch(tokenizer.encode_batch(prompts), padding_side="left", max_length=room)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model,
        ids.to(device),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        eos_token_id=tokenizer.eos_id,
        attention_mask=mask.to(device),
        generator=generator,
    )
    samples = []
    for prompt, row in zip(prompts, out[:, ids.shape[1] :].tolist(), strict=True):
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id) + 1]  # what follows eos is padding
        samples.append(TextSample(prompt, decode_in_vocab(tokenizer, row)))
    return samples


def decode_in_vocab(tokenizer, ids: list[int]) -> str:
    """Decode ids, writing `[id N]` for ids past the tokenizer's vocabulary.

    The model's vocab_size may exceed the tokenizer's (rounded up), and an early model samples those ids too.
    """
    pieces: list[str] = []
    run: list[int] = []
    for i in ids:
        if i < tokenizer.vocab_size:
            run.append(i)
            continue
        pieces.append(tokenizer.decode(run))
        pieces.append(f"[id {i}]")
        run = []
    pieces.append(tokenizer.decode(run))
    return "".join(pieces)


def sample_rows(samples: list[TextSample]) -> list[dict[str, str]]:
    """The samples as a table (one row per prompt), what sinks other than TensorBoard's text tab keep."""
    return [{"prompt": s.prompt, "sample": s.completion} for s in samples]


class TextSampleLogger(pl.Callback):
    """Every `every_n_steps` steps, one sampled continuation per prompt under `samples` (TensorBoard: markdown
    text; CSV: rows of samples.csv; MLflow: a table artifact).

    Args:
        prompts: raw prompt strings (special tokens included as text, e.g. "<|bos|>").
        max_new_tokens: tokens to sample at most; a sample ends early at the tokenizer's eos.
        temperature, top_k: sampling settings (temperature 0 is greedy; top_k None keeps every token).
        seed: the sampling seed, the same at every logging step.
    """

    def __init__(
        self,
        every_n_steps: int | None,
        prompts: list[str],
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 20,
        seed: int = 0,
    ):
        self.every_n_steps = check_every_n_steps("TextSampleLogger", every_n_steps)
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"TextSampleLogger.prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        if max_new_tokens <= 0:
            raise ValueError(f"TextSampleLogger.max_new_tokens must be positive, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"TextSampleLogger.temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"TextSampleLogger.top_k must be a positive integer or None, got {top_k}")
        self.prompts, self.max_new_tokens = prompts, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self._step_before = 0
        self._logged_at: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.every_n_steps:
            return
        model = stage_model("TextSampleLogger", pl_module)
        stage_tokenizer("TextSampleLogger", pl_module)
        if not isinstance(model, NanoLM):
            log.info("TextSampleLogger: %s does not generate text; no samples", type(model).__name__)
            self.every_n_steps = 0
            return
        limit = model.config.max_position_embeddings
        if self.max_new_tokens >= limit:
            raise ValueError(
                f"TextSampleLogger.max_new_tokens ({self.max_new_tokens}) leaves no room for a prompt within "
                f"model.max_position_embeddings ({limit})"
            )
        warn_no_writer("TextSampleLogger", trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if crossed_multiple(self._step_before, trainer.global_step, self.every_n_steps):
            self.log_samples(trainer, pl_module)

    # also when training starts and ends: a stage shorter than every_n_steps (the RL stages) still shows them
    def on_train_start(self, trainer, pl_module) -> None:
        if self.every_n_steps:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps and self._logged_at != trainer.global_step:
            self.log_samples(trainer, pl_module)

    def log_samples(self, trainer, pl_module) -> None:
        step = trainer.global_step
        sinks = diagnostic_sinks(trainer)
        if not sinks:
            return
        self._logged_at = step
        samples = sample_texts(
            pl_module.model,
            pl_module.tokenizer,
            self.prompts,
            self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed,
        )
        for sink in sinks:
            sink.log_table("samples", sample_rows(samples), step)
