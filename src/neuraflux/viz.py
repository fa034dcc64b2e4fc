"""Offline plots written to PNG: training curves from TensorBoard event files, and attention heatmaps.

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing is ever shown and no global figure
state is touched; the PNG is exactly figsize * dpi pixels (no tight bounding box).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["ScalarSeries", "load_scalars", "plot_attention_patterns", "plot_training_metrics"]

log = logging.getLogger(__name__)

EVENT_GLOB = "events.out.tfevents.*"


@dataclass
class ScalarSeries:
    """One scalar tag over training, sorted by step."""

    steps: list[int]
    values: list[float]


def find_event_files(run_dir: str | Path) -> list[Path]:
    """Event files under run_dir (searched recursively), or run_dir itself when it is one."""
    path = Path(run_dir)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    files = sorted(path.rglob(EVENT_GLOB))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files ({EVENT_GLOB}) under {path}")
    return files


def load_scalars(run_dir: str | Path) -> dict[str, ScalarSeries]:
    """Every scalar tag in the event files under run_dir, each file read in full (no subsampling).

    Files are merged; when two files hold the same step of a tag (a resumed run), the later write wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    points: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall_time, value)
    for file in find_event_files(run_dir):
        acc = EventAccumulator(str(file), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()[SCALARS]:
            by_step = points.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                if ev.step not in by_step or ev.wall_time >= by_step[ev.step][0]:
                    by_step[ev.step] = (ev.wall_time, ev.value)
    return {
        tag: ScalarSeries(steps=sorted(by_step), values=[by_step[s][1] for s in sorted(by_step)])
        for tag, by_step in sorted(points.items())
    }


def save_figure(fig: Figure, out_png: str | Path, tight: bool = False) -> Path:
    """Write `fig` as a PNG; `tight`: grown or cropped to what is drawn, so no label is cut at an edge."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    fig.savefig(out, format="png", **({"bbox_inches": "tight", "pad_inches": 0.1} if tight else {}))
    log.info("wrote %s", out)
    return out


# what a stage's curves are read for, in this order; a run plots those it logged
DEFAULT_TAGS = (
    "train/loss", "val/loss", "val/ppl", "objective/reward", "val/reward", "objective/kl", "rewards/accuracies",
    "rewards/margins", "val/accuracies", "train/dpo_loss", "val/violation_rate", "train/lr",
)  # fmt: skip


def plot_training_metrics(
    run_dir_or_event_dir: str | Path,
    out_png: str | Path,
    tags: Sequence[str] | str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Plot scalar tags from a run's TensorBoard event files, one subplot per tag, and write a PNG.

    tags: the tags to plot, in order (e.g. ["train/loss", "val/loss", "val/ppl", "train/lr"]); None plots the
    run's headline curves (`DEFAULT_TAGS` it has: losses, rewards, KL, accuracy, learning rate), "all" every scalar
    tag in sorted order. figsize defaults to 4 x 3 inches per subplot, three subplots a row.
    Returns the PNG path.
    """
    return save_figure(metrics_figure(run_dir_or_event_dir, tags, figsize, dpi), out_png)


def metrics_figure(
    run_dir_or_event_dir: str | Path,
    tags: Sequence[str] | str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Figure:
    """The figure `plot_training_metrics` saves: one titled subplot per tag."""
    series = load_scalars(run_dir_or_event_dir)
    if not series:
        raise ValueError(f"the event files under {run_dir_or_event_dir} hold no scalars")
    if tags == "all":
        chosen = list(series)
    elif tags is None:
        chosen = [t for t in DEFAULT_TAGS if t in series] or list(series)  # a run of other tags: all of them
    else:
        chosen = list(tags)
    missing = [t for t in chosen if t not in series]
    if missing:
        raise ValueError(
            f"scalar tags {missing} are not in the event files under {run_dir_or_event_dir}; "
            f"available: {sorted(series)}"
        )
    if not chosen:
        raise ValueError("tags is empty: name at least one scalar tag, or pass None for all of them")
    ncols = min(3, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = Figure(figsize=figsize or (4.0 * ncols, 3.0 * nrows), dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, tag in zip(axes.flat, chosen, strict=False):
        s = series[tag]
        # markers only when there are few points, where a bare line would hide them
        ax.plot(s.steps, s.values, marker="o" if len(s.steps) <= 20 else None, markersize=3)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.set_ylabel(tag.rsplit("/", 1)[-1])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen) :]:
        fig.delaxes(ax)
    return fig


def attention_stack(attention) -> np.ndarray:
    """(L, H, T, T) float32 from a (H, T, T) or (L, H, T, T) tensor/array or a list of per-layer (H, T, T)."""
    if isinstance(attention, (list, tuple)):
        if not attention:
            raise ValueError("attention is an empty list; expected per-layer (H, T, T) maps")
        layers = [as_array(a) for a in attention]
        for i, a in enumerate(layers):
            if a.ndim != 3 or a.shape[1] != a.shape[2]:
                raise ValueError(f"attention[{i}] must have shape (H, T, T), got {a.shape}")
            if a.shape != layers[0].shape:
                raise ValueError(f"attention[{i}] has shape {a.shape} but attention[0] has {layers[0].shape}")
        return np.stack(layers)
    arr = as_array(attention)
    if arr.ndim not in (3, 4) or arr.shape[-1] != arr.shape[-2]:
        raise ValueError(f"attention must have shape (H, T, T) or (L, H, T, T), got {arr.shape}")
    return arr[None] if arr.ndim == 3 else arr


def as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()  # bf16 has no numpy dtype
    return np.asarray(x, dtype=np.float32)


def display_token(token: str) -> str:
    """Whitespace made visible, so a label for a space or newline is not blank."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423") or "\u2205"


def plot_attention_patterns(
    attention,
    out_png: str | Path,
    tokens: Sequence[str] | None = None,
    layer: int | None = None,
    heads: Sequence[int] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Draw attention maps as a grid of heatmaps (rows: layers, columns: heads) and write a PNG.

    attention: (H, T, T) for one layer, (L, H, T, T), or a list of per-layer (H, T, T) tensors or arrays (what
    `NanoLM.get_attention_maps(text, tokenizer)` returns); rows are queries, columns keys.
    tokens: T labels for the axes. layer: plot only this layer of a stacked input (None: every layer).
    heads: head indices to plot (None: all). Returns the PNG path.
    """
    # an asked size is kept; the default one grows to whatever the labels need
    return save_figure(attention_figure(attention, tokens, layer, heads, figsize, dpi), out_png, tight=figsize is None)


def attention_figure(
    attention,
    tokens: Sequence[str] | None = None,
    layer: int | None = None,
    heads: Sequence[int] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Figure:
    """The figure `plot_attention_patterns` saves: heatmaps titled "layer i head j", then a colorbar."""
    stack = attention_stack(attention)  # (L, H, T, T)
    L, H, T, _ = stack.shape
    if layer is not None:
        if getattr(attention, "ndim", None) == 3:
            raise ValueError(
                f"layer={layer} selects from stacked layers, but attention has shape {stack.shape[1:]} "
                "(one layer); pass the per-layer list or leave layer=None"
            )
        if not 0 <= layer < L:
            raise ValueError(f"layer={layer} is out of range for {L} layers")
    layer_ids = list(range(L)) if layer is None else [layer]
    head_ids = list(range(H)) if heads is None else [int(h) for h in heads]
    bad = [h for h in head_ids if not 0 <= h < H]
    if bad or not head_ids:
        raise ValueError(f"heads {head_ids} must be a non-empty list of indices in 0..{H - 1}")
    if tokens is not None and len(tokens) != T:
        raise ValueError(f"tokens has {len(tokens)} labels but the attention maps are {T}x{T}")

    nrows, ncols = len(layer_ids), len(head_ids)
    cell = max(2.0, 0.16 * T)  # inches per heatmap: room for T tick labels
    labels = [display_token(t) for t in tokens] if tokens is not None else None
    # room for the token labels beside and below the heatmaps (the x labels stand rotated), titles and axis names
    margin = 0.6 + (0.075 * max(len(t) for t in labels) if labels else 0.0)
    size = (cell * ncols + 1.2 + margin, cell * nrows + 0.8 + margin)
    fig = Figure(figsize=figsize or size, dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for r, li in enumerate(layer_ids):
        for c, hi in enumerate(head_ids):
            ax = axes[r, c]
            image = ax.imshow(stack[li, hi], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_title(f"layer {li} head {hi}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == nrows - 1:
                ax.set_xlabel("key", fontsize=8)
            if c == 0:
                ax.set_ylabel("query", fontsize=8)
            if labels is not None and r == nrows - 1:
                # parse_math off: a "$" in a token must not start matplotlib's TeX parser
                ax.set_xticks(range(T), labels, rotation=90, fontsize=7, parse_math=False)
            if labels is not None and c == 0:
                ax.set_yticks(range(T), labels, fontsize=7, parse_math=False)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    return fig
