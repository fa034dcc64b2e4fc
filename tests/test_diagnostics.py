"""TensorBoard diagnostics callbacks: the pure helpers by hand, then short real runs read back from the event files."""

from __future__ import annotations

import io
import logging
import math
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    IMAGES,
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from tensorboard.util import tensor_util

from neuraflux.callbacks import (
    ActivationStatsLogger,
    AttentionMapLogger,
    GradientFlowLogger,
    LearningRateLogger,
    TextSampleLogger,
)
from neuraflux.callbacks.diagnostics import (
    GELU_ZERO_THRESHOLD,
    TextSample,
    activation_stats,
    attention_grid,
    batch_inputs,
    check_every_n_steps,
    crossed_multiple,
    decode_in_vocab,
    gradient_norms,
    learning_rates,
    sample_rows,
    sample_texts,
    to_uint8_image,
)
from neuraflux.callbacks.sinks import fenced, table_markdown
from neuraflux.data.common import LMBatch
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.tokenizer import NanoTokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

TEXT = "the cat sat on the mat. a dog ran to the cat and sat down."
PROBE = "the cat sat"
PIXELS = 2  # pixels_per_token used in the runs


def tiny_model(seed: int = 0, dropout: float = 0.1) -> NanoLM:
    torch.manual_seed(seed)
    return NanoLM(
        NanoConfig(
            vocab_size=64,
            block_size=16,
            max_position_embeddings=32,
            n_layer=2,
            n_head=2,
            n_embd=16,
            dropout=dropout,
        )
    )


def char_tokenizer() -> NanoTokenizer:
    return NanoTokenizer.train([TEXT], 0, mode="char")


def block_params(model: NanoLM) -> dict[str, list[torch.nn.Parameter]]:
    t = model.transformer
    blocks = {"embeddings": list(t.embeddings.parameters()), "final_norm": list(t.ln_f.parameters())}
    blocks.update({f"layer{i}": list(layer.parameters()) for i, layer in enumerate(t.layers)})
    return blocks


class TinyStage(pl.LightningModule):
    """The stage contract (.model, .tokenizer) with a plain next-token loss; records what the tests compare."""

    def __init__(self, model: NanoLM, tokenizer: NanoTokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.grad_norms: dict[int, dict[str, float]] = {}  # step -> tag -> norm, recomputed here

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = {}
        for name, params in block_params(self.model).items():
            norms[f"grad_norm/{name}"] = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in params))
        self.grad_norms[self.global_step] = norms

    def configure_optimizers(self):
        layer_params = list(self.model.transformer.layers.parameters())
        ids = {id(p) for p in layer_params}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        opt = torch.optim.SGD([{"params": layer_params}, {"params": rest, "lr": 0.01}], lr=0.1)
        # the LR halves every step: 0.1, 0.05, 0.025, ... and 0.01, 0.005, ...
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TrainModeProbe(pl.Callback):
    """Placed after the diagnostics: records whether every module is in train mode when they are done."""

    def __init__(self):
        self.seen: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.seen.append(all(m.training for m in pl_module.model.modules()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(all(m.training for m in pl_module.model.modules()))


def loader(tokenizer: NanoTokenizer, batch_size: int = 2) -> torch.utils.data.DataLoader:
    ids = tokenizer.encode(TEXT)
    rows = [torch.tensor(ids[i : i + 17]) for i in range(0, len(ids) - 17, 4)]  # (17,) each: 16 inputs + 1
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False)


def fit(tmp_path, callbacks, max_steps: int, logger: bool = True, **trainer_kwargs) -> TinyStage:
    tokenizer = char_tokenizer()
    module = TinyStage(tiny_model(), tokenizer)
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=TensorBoardLogger(tmp_path, name="tb", version="") if logger else False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        **trainer_kwargs,
    )
    trainer.fit(module, loader(tokenizer))
    return module


def read_events(tmp_path) -> EventAccumulator:
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={SCALARS: 0, IMAGES: 0, HISTOGRAMS: 0, TENSORS: 0})
    acc.Reload()
    return acc


def png_pixels(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("L"), dtype=np.float64) / 255.0


# ---- pure helpers ------------------------------------------------------------------------------------------
def test_crossed_multiple_logs_once_per_multiple():
    assert crossed_multiple(0, 1, 1)
    assert not crossed_multiple(1, 1, 1)  # an accumulating batch leaves the step unchanged
    assert crossed_multiple(1, 2, 2) and not crossed_multiple(2, 3, 2)
    assert crossed_multiple(1, 3, 2)  # jumped over 2 (two optimizer steps in one batch)
    assert not crossed_multiple(0, 5, 0)  # 0 = off


def test_every_n_steps_validation():
    assert check_every_n_steps("X", None) == 0
    assert check_every_n_steps("X", 5) == 5
    with pytest.raises(ValueError, match=r"GradientFlowLogger.every_n_steps must be a non-negative integer.*-1"):
        GradientFlowLogger(every_n_steps=-1)
    with pytest.raises(ValueError, match="every_n_steps"):
        LearningRateLogger(every_n_steps=True)


def test_attention_grid_by_hand():
    maps = torch.tensor([[[1.0, 0.0], [0.25, 0.75]], [[1.0, 0.0], [0.5, 0.5]]])  # (H=2, T=2, T=2)
    expected = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [0.25, 0.75, 1.0, 0.5, 0.5]])  # gap column of 1.0
    assert torch.equal(attention_grid(maps), expected)
    big = attention_grid(maps, pixels_per_token=3)
    assert big.shape == (6, 15)
    assert torch.equal(big[::3, ::3], expected)
    with pytest.raises(ValueError, match=r"\(H, T, T\), got \(2, 2, 3\)"):
        attention_grid(torch.zeros(2, 2, 3))


def test_uint8_image_rounds_instead_of_truncating():
    img = to_uint8_image(torch.tensor([[0.0, 0.2, 1.0, 1.5]]))
    # 0.2 * 255 = 51.0 exactly -> 51; 1.5 is clamped to 255
    assert img.tolist() == [[0, 51, 255, 255]]
    assert to_uint8_image(torch.tensor([[0.1]])).item() == 26  # 25.5 rounds up, truncation would give 25


def test_gradient_norms_by_hand():
    model = tiny_model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for p in model.transformer.layers[0].parameters():
        p.grad = None  # a frozen block has no norm
    norms = gradient_norms(model)
    # all-ones gradients: the norm is sqrt(number of parameters in the block)
    # embeddings: token 64*16 + position 32*16 = 1536; ln_f: 16 + 16 = 32
    # a layer: ln_1 32 + qkv 16*48+48 + proj 16*16+16 + ln_2 32 + fc 16*64+64 + proj 64*16+16 = 3280
    assert norms.embeddings == pytest.approx(math.sqrt(1536))
    assert norms.final_norm == pytest.approx(math.sqrt(32))
    assert norms.layers == [None, pytest.approx(math.sqrt(3280))]
    assert set(norms.scalars()) == {"grad_norm/embeddings", "grad_norm/final_norm", "grad_norm/layer1"}


def test_activation_stats_match_a_manual_forward_and_remove_hooks():
    model = tiny_model()
    model.train()
    ids = torch.tensor([[5, 9, 12, 7, 3, 20]])
    stats = activation_stats(model, ids)
    t = model.transformer
    assert model.training and all(m.training for m in model.modules())
    assert all(not layer._forward_hooks and not layer.mlp.act._forward_hooks for layer in t.layers)
    model.eval()  # the stats come from an eval-mode forward: no dropout
    with torch.no_grad():
        x = t.embeddings(ids, torch.arange(6)[None])
        for i, layer in enumerate(t.layers):
            x_attn = x + layer.attn(layer.ln_1(x), None)[0]
            gelu = layer.mlp.act(layer.mlp.fc(layer.ln_2(x_attn)))
            x, _ = layer(x)
            assert stats[i].mean == pytest.approx(float(x.mean()), abs=1e-6)
            assert stats[i].std == pytest.approx(float(x.std(correction=0)), rel=1e-5)
            assert stats[i].gelu_zero_frac == pytest.approx(float((gelu.abs() < GELU_ZERO_THRESHOLD).float().mean()))


def test_gelu_zero_fraction_extremes():
    model = tiny_model(dropout=0.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        model.transformer.layers[0].mlp.fc.weight.zero_()
        model.transformer.layers[0].mlp.fc.bias.zero_()  # GELU(0) = 0: every output is "zero"
        model.transformer.layers[1].mlp.fc.weight.zero_()
        model.transformer.layers[1].mlp.fc.bias.fill_(3.0)  # GELU(3) ~ 2.996: none is
    stats = activation_stats(model, ids)
    assert stats[0].gelu_zero_frac == 1.0
    assert stats[1].gelu_zero_frac == 0.0


def test_activation_stats_skip_padding():
    model = tiny_model()
    ids = torch.tensor([[5, 9, 12, 7]])
    padded = torch.tensor([[0, 0, 5, 9, 12, 7]])
    mask = torch.tensor([[False, False, True, True, True, True]])
    alone, with_pad = activation_stats(model, ids), activation_stats(model, padded, mask)
    for a, b in zip(alone, with_pad, strict=True):
        assert b.mean == pytest.approx(a.mean, abs=1e-6)
        assert b.std == pytest.approx(a.std, rel=1e-5)
        assert b.gelu_zero_frac == pytest.approx(a.gelu_zero_frac)


def test_batch_inputs_reads_every_batch_kind():
    ids = torch.ones(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert batch_inputs("X", ids) == (ids, None)
    assert batch_inputs("X", {"input_ids": ids, "attention_mask": mask}) == (ids, mask)
    lm = LMBatch(input_ids=ids, targets=ids, loss_mask=mask, attention_mask=mask)
    assert batch_inputs("X", lm) == (ids, mask)
    with pytest.raises(TypeError, match="ActivationStatsLogger found no input_ids in a training batch of type tuple"):
        batch_inputs("ActivationStatsLogger", (ids, ids))


def test_learning_rates_tags():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    one = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=0.1)
    assert learning_rates([one]) == {"train/lr/group0": 0.1, "train/lr/group1": 0.5}
    two = torch.optim.SGD([q], lr=0.2)
    assert learning_rates([one, two]) == {
        "train/lr/optimizer0/group0": 0.1,
        "train/lr/optimizer0/group1": 0.5,
        "train/lr/optimizer1/group0": 0.2,
    }


def test_markdown_fences_hold_backticks():
    assert fenced("a ``` b") == "````\na ``` b\n````"
    # TensorBoard's text tab: per sample the prompt, then the sampled continuation
    md = table_markdown(sample_rows([TextSample("<|bos|>", "hi<|eos|>"), TextSample("x", "y")]))
    assert md == (
        "**Prompt 1**\n\n```\n<|bos|>\n```\n\n**Sample 1**\n\n```\nhi<|eos|>\n```"
        "\n\n---\n\n**Prompt 2**\n\n```\nx\n```\n\n**Sample 2**\n\n```\ny\n```"
    )


def test_sample_texts_stop_at_eos_and_repeat_with_the_seed():
    tokenizer = char_tokenizer()
    model = tiny_model(dropout=0.0)
    with torch.no_grad():
        # a zero final-norm gain makes every hidden state equal its bias b, so logits = E b: point b at eos
        v = torch.zeros(16)
        v[0] = 10.0
        model.transformer.embeddings.token.weight[tokenizer.eos_id] = v
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
    model.train()
    greedy = sample_texts(model, tokenizer, ["the", "a dog"], max_new_tokens=5, temperature=0.0)
    assert greedy == [TextSample("the", "<|eos|>"), TextSample("a dog", "<|eos|>")]
    assert model.training

    other = tiny_model(seed=1, dropout=0.0)
    first = sample_texts(other, tokenizer, ["the"], max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
    again = sample_texts(other, tokenizer, ["the"], max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
    assert first == again


def test_ids_past_the_tokenizer_vocabulary_are_shown_not_fatal():
    tokenizer = char_tokenizer()
    t, h, e = tokenizer.encode("the")
    # the model's vocabulary (64) is larger than this tokenizer's, so an untrained model can sample id 60
    assert decode_in_vocab(tokenizer, [t, h, 60, e, 61]) == "th[id 60]e[id 61]"


def test_settings_are_checked_before_training():
    module = TinyStage(tiny_model(), char_tokenizer())
    with pytest.raises(ValueError, match=r"AttentionMapLogger.layers has \[2\], but the model has layers 0..1"):
        AttentionMapLogger(1, PROBE, layers=[0, 2]).setup(None, module, "fit")
    with pytest.raises(ValueError, match=r"max_new_tokens \(32\) leaves no room for a prompt"):
        TextSampleLogger(1, ["the"], max_new_tokens=32).setup(None, module, "fit")
    with pytest.raises(ValueError, match="TextSampleLogger.prompts must be a non-empty list"):
        TextSampleLogger(1, [])
    with pytest.raises(ValueError, match="AttentionMapLogger.text"):
        AttentionMapLogger(1, "")
    bare = pl.LightningModule()
    with pytest.raises(
        TypeError,
        match="GradientFlowLogger needs pl_module.model to be a model on the NanoModel backbone .*; "
        "LightningModule.model is NoneType",
    ):
        GradientFlowLogger(1).setup(None, bare, "fit")


# ---- real runs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("diag")
    probe = TrainModeProbe()
    callbacks = [
        AttentionMapLogger(every_n_steps=2, text=PROBE, pixels_per_token=PIXELS),
        GradientFlowLogger(every_n_steps=1),
        ActivationStatsLogger(every_n_steps=2),
        LearningRateLogger(),
        TextSampleLogger(every_n_steps=3, prompts=["the", "a dog"], max_new_tokens=8),
        probe,
    ]
    # clipping to 1e-3 would shrink the norms: they must be read before it
    module = fit(tmp_path, callbacks, max_steps=4, gradient_clip_val=1e-3)
    return read_events(tmp_path), module, probe


def test_attention_images_are_row_stochastic(run):
    acc, module, _ = run
    T = len(module.tokenizer.encode(PROBE))  # 11 characters
    for layer in (0, 1):
        # the readable figure, and the exact weights as pixels
        assert [e.step for e in acc.Images(f"attention/layer{layer}")] == [0, 2, 4]
        events = acc.Images(f"attention_raw/layer{layer}")
        assert [e.step for e in events] == [0, 2, 4]  # at the start, then every 2 steps (4 is also the end)
        for e in events:
            assert (e.height, e.width) == (T * PIXELS, (2 * T + 1) * PIXELS)
            grid = png_pixels(e.encoded_image_string)[::PIXELS, ::PIXELS]  # (T, 2T + 1)
            assert np.all(grid[:, T] == 1.0)  # the white gap between the heads
            for head in (grid[:, :T], grid[:, T + 1 :]):
                # each pixel is rounded to 1/255, so a row of T weights is off by at most T * 0.5/255
                np.testing.assert_allclose(head.sum(axis=1), 1.0, atol=T * 0.5 / 255)
                assert np.all(np.triu(head, k=1) == 0.0)  # causal: nothing above the diagonal
    assert len(acc.Tensors("attention/tokens/text_summary")) == 1


def test_gradient_norms_match_a_recomputation_before_clipping(run):
    acc, module, _ = run
    tags = ["grad_norm/embeddings", "grad_norm/final_norm", "grad_norm/layer0", "grad_norm/layer1"]
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1, 2, 3]
        for e in events:
            assert e.value == pytest.approx(module.grad_norms[e.step][tag], rel=1e-5)
            assert e.value > 1e-3  # above the clip value, so a clipped norm would not have matched
    for layer in (0, 1):
        hist = acc.Histograms(f"grad_hist/layer{layer}")
        assert [h.step for h in hist] == [0, 1, 2, 3]
        for h in hist:
            assert h.histogram_value.num == 3280  # every gradient entry of the layer
            # the histogram's sum of squares is the squared norm logged beside it
            norm = module.grad_norms[h.step][f"grad_norm/layer{layer}"]
            assert math.sqrt(h.histogram_value.sum_squares) == pytest.approx(norm, rel=1e-4)


def test_activation_scalars(run):
    acc, _, _ = run
    for layer in (0, 1):
        for name in ("mean", "std", "gelu_zero_frac"):
            events = acc.Scalars(f"activations/layer{layer}/{name}")
            assert [e.step for e in events] == [2, 4]
        assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars(f"activations/layer{layer}/gelu_zero_frac"))
        assert all(e.value > 0.0 for e in acc.Scalars(f"activations/layer{layer}/std"))


def test_learning_rate_schedule(run):
    acc, _, _ = run
    group0 = acc.Scalars("train/lr/group0")
    group1 = acc.Scalars("train/lr/group1")
    assert [e.step for e in group0] == [0, 1, 2, 3]
    assert [e.value for e in group0] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    assert [e.value for e in group1] == pytest.approx([0.01, 0.005, 0.0025, 0.00125])
    assert "train/lr" not in acc.Tags()[SCALARS]  # the stages' own `train/lr` tag is left to them


def test_text_samples(run):
    acc, _, _ = run
    events = acc.Tensors("samples/text_summary")
    assert [e.step for e in events] == [0, 3, 4]  # at the start, every 3 steps, and at the end
    markdown = tensor_util.make_ndarray(events[1].tensor_proto).item().decode()
    assert markdown.startswith("**Prompt 1**\n\n```\nthe\n```\n\n**Sample 1**")
    assert "**Prompt 2**\n\n```\na dog\n```" in markdown


def test_model_stays_in_train_mode(run):
    _, module, probe = run
    assert len(probe.seen) == 8  # 4 optimizer steps + 4 batch ends
    assert all(probe.seen)
    assert module.model.training


def test_bf16_mixed_with_gradient_accumulation(tmp_path):
    callbacks = [
        AttentionMapLogger(every_n_steps=1, text=PROBE, layers=[1], pixels_per_token=1),
        GradientFlowLogger(every_n_steps=1),
        ActivationStatsLogger(every_n_steps=1, text=PROBE),
        LearningRateLogger(),
        TextSampleLogger(every_n_steps=2, prompts=["the"], max_new_tokens=4),
    ]
    fit(tmp_path, callbacks, max_steps=2, precision="bf16-mixed", accumulate_grad_batches=2)
    acc = read_events(tmp_path)
    tags = acc.Tags()
    assert "attention/layer0" not in tags[IMAGES] and "attention_raw/layer0" not in tags[IMAGES]
    # 4 batches, 2 optimizer steps: every callback logs once per step, not once per batch
    assert [e.step for e in acc.Images("attention/layer1")] == [0, 1, 2]
    assert [e.step for e in acc.Scalars("train/lr/group0")] == [0, 1]
    assert [e.step for e in acc.Scalars("grad_norm/layer0")] == [0, 1]
    assert [e.step for e in acc.Scalars("activations/layer1/std")] == [1, 2]
    assert [e.step for e in acc.Tensors("samples/text_summary")] == [0, 2]
    values = [e.value for tag in tags[SCALARS] for e in acc.Scalars(tag)]
    assert values and all(math.isfinite(v) for v in values)


def test_without_tensorboard_nothing_is_logged(tmp_path, caplog):
    probe = TrainModeProbe()
    callbacks = [
        AttentionMapLogger(every_n_steps=1, text=PROBE),
        GradientFlowLogger(every_n_steps=1),
        ActivationStatsLogger(every_n_steps=1),
        LearningRateLogger(),
        TextSampleLogger(every_n_steps=1, prompts=["the"], max_new_tokens=4),
        probe,
    ]
    with caplog.at_level(logging.WARNING, logger="neuraflux.callbacks.diagnostics"):
        fit(tmp_path, callbacks, max_steps=2, logger=False)
    assert "AttentionMapLogger: the trainer has no TensorBoard, CSV or MLflow logger, so it logs nothing" in caplog.text
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert probe.seen == [True] * 4
