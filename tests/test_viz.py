"""Offline plots: scalars read back from event files, PNG sizes from figsize * dpi, shape errors."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from neuraflux.model import NanoConfig, NanoLM
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.viz import (
    ScalarSeries,
    attention_figure,
    load_scalars,
    metrics_figure,
    plot_attention_patterns,
    plot_training_metrics,
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def run_dir(tmp_path):
    """A run with train/loss at steps 0..9, val/loss at 4 and 9, and lr; a resumed file rewrites step 9."""
    writer = SummaryWriter(tmp_path / "tensorboard")
    for step in range(10):
        writer.add_scalar("train/loss", 4.0 - 0.25 * step, step, walltime=100.0 + step)
        writer.add_scalar("lr", 1e-3, step, walltime=100.0 + step)
    writer.add_scalar("val/loss", 3.5, 4, walltime=104.5)
    writer.add_scalar("val/loss", 3.0, 9, walltime=109.5)
    writer.close()
    resumed = SummaryWriter(tmp_path / "tensorboard" / "resumed")
    resumed.add_scalar("train/loss", 1.5, 9, walltime=200.0)  # later write of step 9 wins
    resumed.add_scalar("train/loss", 1.25, 10, walltime=201.0)
    resumed.close()
    return tmp_path


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size  # (width, height)


def test_load_scalars_merges_files(run_dir):
    series = load_scalars(run_dir)
    assert sorted(series) == ["lr", "train/loss", "val/loss"]
    assert series["val/loss"] == ScalarSeries(steps=[4, 9], values=[3.5, 3.0])
    loss = series["train/loss"]
    assert loss.steps == list(range(11))
    assert loss.values[:9] == pytest.approx([4.0 - 0.25 * s for s in range(9)])
    assert loss.values[9:] == [1.5, 1.25]


def test_plot_training_metrics_writes_png_of_the_asked_size(run_dir, tmp_path):
    out = plot_training_metrics(
        run_dir, tmp_path / "plots" / "metrics.png", tags=["train/loss", "val/loss"], figsize=(6, 3), dpi=50
    )
    assert out == tmp_path / "plots" / "metrics.png"
    assert out.stat().st_size > 1000
    assert png_size(out) == (300, 150)
    # default: the headline curves it has (train/loss, val/loss; not the bare `lr`), 4 x 3 inches each
    out = plot_training_metrics(run_dir / "tensorboard", tmp_path / "default.png", dpi=20)
    assert png_size(out) == (160, 60)
    # "all": every tag, three to a row
    out = plot_training_metrics(run_dir / "tensorboard", tmp_path / "all.png", tags="all", dpi=20)
    assert png_size(out) == (240, 60)


def test_metrics_figure_has_one_titled_subplot_per_tag(run_dir):
    fig = metrics_figure(run_dir, tags=["val/loss", "lr", "train/loss", "val/loss"])
    # a 2 x 3 grid with the two unused axes removed
    assert [ax.get_title() for ax in fig.axes] == ["val/loss", "lr", "train/loss", "val/loss"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "lr", "loss", "loss"] and fig.axes[0].get_xlabel() == "step"
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [4, 9] and list(line.get_ydata()) == [3.5, 3.0]


def test_metric_errors_name_the_problem(run_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=r"no TensorBoard event files \(events.out.tfevents.\*\) under " + re.escape(str(empty)),
    ):
        plot_training_metrics(empty, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match=re.escape(f"run directory {tmp_path / 'missing'} does not exist")):
        plot_training_metrics(tmp_path / "missing", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"scalar tags \['val/ppl'\] are not in .*available: \['lr', 'train/loss'"):
        plot_training_metrics(run_dir, tmp_path / "x.png", tags=["train/loss", "val/ppl"])
    assert not (tmp_path / "x.png").exists()


def tiny_maps() -> tuple[list[torch.Tensor], list[str]]:
    torch.manual_seed(0)
    model = NanoLM(NanoConfig(vocab_size=64, block_size=16, max_position_embeddings=32, n_layer=2, n_head=2, n_embd=16))
    tokenizer = NanoTokenizer.train(["the cat sat on $5 mats\n"], 0, mode="char")
    text = "the cat $5\n"
    return model.get_attention_maps(text, tokenizer), list(text)


def test_plot_attention_patterns_from_get_attention_maps(tmp_path):
    maps, tokens = tiny_maps()  # 2 layers of (2, 11, 11); tokens include "$" and "\n"
    out = plot_attention_patterns(maps, tmp_path / "attn.png", tokens=tokens, figsize=(5, 4), dpi=40)
    assert out.stat().st_size > 1000
    assert png_size(out) == (200, 160)
    fig = attention_figure(maps, tokens=tokens)
    titles = [ax.get_title() for ax in fig.axes[:-1]]  # the last axes is the colorbar
    assert titles == ["layer 0 head 0", "layer 0 head 1", "layer 1 head 0", "layer 1 head 1"]
    bottom_left = fig.axes[2]
    labels = [t.get_text() for t in bottom_left.get_xticklabels()]
    assert labels == [*"the\u2423cat\u2423$5", "\\n"]  # whitespace made visible, "$" kept literally
    np.testing.assert_allclose(bottom_left.get_images()[0].get_array(), maps[1][0].numpy())


def test_attention_input_forms_and_selection(tmp_path):
    maps, _ = tiny_maps()
    stacked = torch.stack(maps)  # (L, H, T, T)
    fig = attention_figure(stacked.numpy(), layer=1, heads=[1])
    assert [ax.get_title() for ax in fig.axes[:-1]] == ["layer 1 head 1"]
    np.testing.assert_allclose(fig.axes[0].get_images()[0].get_array(), maps[1][1].numpy())
    fig = attention_figure(maps[0].to(torch.bfloat16))  # one layer (H, T, T), bf16 cast for numpy
    assert [ax.get_title() for ax in fig.axes[:-1]] == ["layer 0 head 0", "layer 0 head 1"]
    out = plot_attention_patterns(stacked, tmp_path / "a.png", figsize=(3, 2), dpi=30)
    assert png_size(out) == (90, 60)


def test_attention_shape_errors(tmp_path):
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=r"\(H, T, T\) or \(L, H, T, T\), got \(2, 3, 4\)"):
        plot_attention_patterns(np.zeros((2, 3, 4)), out)
    with pytest.raises(ValueError, match=r"got \(4, 4\)"):
        plot_attention_patterns(torch.zeros(4, 4), out)
    with pytest.raises(ValueError, match=r"attention\[1\] has shape \(2, 5, 5\) but attention\[0\] has \(2, 4, 4\)"):
        plot_attention_patterns([torch.zeros(2, 4, 4), torch.zeros(2, 5, 5)], out)
    with pytest.raises(ValueError, match=r"attention\[0\] must have shape \(H, T, T\), got \(4, 4\)"):
        plot_attention_patterns([torch.zeros(4, 4)], out)
    with pytest.raises(ValueError, match="tokens has 3 labels but the attention maps are 4x4"):
        plot_attention_patterns(torch.zeros(2, 4, 4), out, tokens=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"heads \[0, 2\] must be a non-empty list of indices in 0..1"):
        plot_attention_patterns(torch.zeros(2, 4, 4), out, heads=[0, 2])
    with pytest.raises(ValueError, match="layer=3 is out of range for 2 layers"):
        plot_attention_patterns(torch.zeros(2, 2, 4, 4), out, layer=3)
    with pytest.raises(ValueError, match=r"layer=1 selects from stacked layers, but attention has shape \(2, 4, 4\)"):
        plot_attention_patterns(torch.zeros(2, 4, 4), out, layer=1)
    assert not out.exists()
