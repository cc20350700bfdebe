"""Figures that show what a run learned: training curves, confusion matrix, image grids.

Every function draws on a bare ``matplotlib.figure.Figure`` with an Agg canvas instead of going
through ``pyplot``: pyplot keeps global state, may pick an interactive backend and open windows,
and is not safe to call from the training loop's helper threads. Files are written atomically
(temporary file + rename) so that a report or TensorBoard reading the run folder at the same time
never sees half a PNG.
"""

from __future__ import annotations

import io
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

__all__ = [
    "figure_to_png_bytes",
    "plot_confusion",
    "plot_curves",
    "plot_image_grid",
    "save_figure",
]

# 100 dpi keeps the PNGs small enough to embed in report.html and TensorBoard; the figure sizes
# below are chosen in inches so that text stays readable at that resolution.
DPI = 100

_TRAIN_COLOUR = "#1f77b4"
_VAL_COLOUR = "#d62728"
_LR_COLOUR = "#7f7f7f"

# Longest class name shown in full on the confusion matrix axes; longer ones are shortened so
# that the matrix, not the labels, gets the space.
_MAX_LABEL_CHARS = 24
# Longest caption line under a grid image: about what fits the 2.3-inch cell at 8.5 pt.
_MAX_CAPTION_CHARS = 36


def plain_text(text: object) -> str:
    """Return ``text`` as a string matplotlib draws literally.

    Class names and file names come from the user's folder names; a pair of ``$`` would otherwise
    switch matplotlib into mathtext, which renders something else or raises while drawing.
    """
    return str(text).replace("$", r"\$")


def _shorten(text: str, limit: int = _MAX_LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_png_bytes(fig: Figure) -> bytes:
    """Render ``fig`` with Agg and return the PNG file's bytes (used for files and TensorBoard)."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No metadata: the default "Software" text chunk would make identical figures differ
    # between matplotlib versions for no benefit.
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically, creating parent folders; return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = figure_to_png_bytes(fig)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _series(history: Sequence[Mapping[str, object]], key: str) -> tuple[list[int], list[float]]:
    """Return (epochs, values) for the epochs that have a numeric ``key``.

    Epochs without the key (say, no validation set) are left out instead of failing, so that
    partial histories still plot.
    """
    xs: list[int] = []
    ys: list[float] = []
    for i, row in enumerate(history):
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            epoch = row.get("epoch")
            xs.append(int(epoch) if isinstance(epoch, int | float) else i + 1)
            ys.append(float(value))
    return xs, ys


def _message_figure(message: str, *, title: str | None = None) -> Figure:
    fig = new_figure(6, 2.5)
    if title:
        fig.suptitle(plain_text(title), fontsize=13, fontweight="bold")
    fig.text(0.5, 0.45, message, ha="center", va="center", fontsize=14, color="#555555")
    return fig


def plot_curves(history: Sequence[Mapping[str, object]], path: Path) -> Path:
    """Plot train/val loss and accuracy per epoch with the learning rate on a second y-axis.

    Args:
        history: the rows of ``metrics.jsonl`` in order, one dict per epoch with keys
            ``epoch``, ``train_loss``, ``val_loss``, ``train_accuracy``, ``val_accuracy``,
            ``lr``; missing keys are skipped. One epoch is enough (points get markers).
        path: where to write the PNG (usually ``run_dir / "curves.png"``).

    Returns:
        ``path``.
    """
    if not history:
        return save_figure(_message_figure("no epochs finished yet", title="training curves"), path)

    fig = new_figure(11, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    n_epochs = len(history)
    # Markers help a handful of epochs (one epoch would otherwise be invisible) and only
    # clutter long runs.
    marker = "o" if n_epochs <= 30 else None

    for ax, metric, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        for split, colour in (("train", _TRAIN_COLOUR), ("val", _VAL_COLOUR)):
            xs, ys = _series(history, f"{split}_{metric}")
            if xs:
                ax.plot(xs, ys, color=colour, marker=marker, markersize=4, lw=1.8, label=split)
        ax.set_title(label, fontsize=12)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    ax_acc.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    acc = [y for line in ax_acc.lines for y in line.get_ydata()]
    if acc and max(acc) - min(acc) < 0.1:
        # A flat or single-epoch accuracy would zoom in on a sliver of a percent (ticks all
        # reading "20%"); show at least ten points of range instead.
        mid = (max(acc) + min(acc)) / 2
        lo = min(max(mid - 0.05, 0.0), 0.9)
        ax_acc.set_ylim(lo - 0.005, lo + 0.105)
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy")

    lr_x, lr_y = _series(history, "lr")
    lr_handles = []
    if lr_x:
        # The learning rate goes on the loss panel: that is where a schedule's effect shows.
        ax_lr = ax_loss.twinx()
        lr_handles = ax_lr.plot(
            lr_x, lr_y, color=_LR_COLOUR, ls="--", lw=1.2, marker=marker, markersize=3, label="lr"
        )
        positive = [v for v in lr_y if v > 0]
        # Log scale once the schedule spans more than a decade, or warmup/decay is a flat line.
        if positive and len(positive) == len(lr_y) and max(positive) / min(positive) > 10:
            ax_lr.set_yscale("log")
        else:
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
        ax_lr.set_ylabel("learning rate", color=_LR_COLOUR)
        ax_lr.tick_params(axis="y", which="both", colors=_LR_COLOUR, labelsize=8)

    handles, labels = ax_loss.get_legend_handles_labels()
    handles += lr_handles
    labels += [h.get_label() for h in lr_handles]
    if handles:
        ax_loss.legend(handles, labels, loc="best", fontsize=9, framealpha=0.8)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(loc="best", fontsize=9, framealpha=0.8)

    # Progressive resizing: a dotted line where the training images change size, so the jump
    # in the validation curves there reads as the model meeting its new input size.
    for prev, row in itertools.pairwise(history):
        size, before = row.get("image_size"), prev.get("image_size")
        if size and before and size != before:
            x = (float(prev["epoch"]) + float(row["epoch"])) / 2
            for ax in (ax_loss, ax_acc):
                ax.axvline(x, color="0.45", ls=":", lw=1.2)
            ax_acc.annotate(
                f"{size[0]}x{size[1]} px",
                (x, 0.03),
                xycoords=("data", "axes fraction"),
                xytext=(4, 0),
                textcoords="offset points",
                fontsize=8,
                color="0.35",
            )

    # A single epoch gives the x-axis zero width; pad it so the point sits in the middle.
    epochs = {x for line in ax_loss.lines + ax_acc.lines for x in line.get_xdata()}
    if len(epochs) == 1:
        (only,) = epochs
        for ax in (ax_loss, ax_acc):
            ax.set_xlim(only - 1, only + 1)

    last = history[-1]
    summary = [f"{n_epochs} epoch{'s' if n_epochs != 1 else ''}"]
    val_acc = last.get("val_accuracy")
    if isinstance(val_acc, int | float):
        summary.append(f"last val accuracy {val_acc:.1%}")
    fig.suptitle("training curves \u2014 " + ", ".join(summary), fontsize=13)
    return save_figure(fig, path)


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Plot a confusion matrix: counts in the cells, colours normalised per true class.

    Args:
        confusion: square integer array, rows = true class, columns = predicted class.
        classes: class names in the order of the rows/columns.
        path: where to write the PNG (usually ``run_dir / "confusion.png"``).

    Returns:
        ``path``.

    Raises:
        ValueError: ``confusion`` is not square or does not match ``len(classes)``.
    """
    cm = np.asarray(confusion)
    n = len(classes)
    if cm.ndim != 2 or cm.shape != (n, n):
        raise ValueError(
            f"confusion matrix has shape {cm.shape} but there are {n} classes; expected ({n}, {n})"
        )
    if n == 0:
        return save_figure(_message_figure("no classes", title="confusion matrix"), path)

    row_sums = cm.sum(axis=1, keepdims=True).astype(np.float64)
    # Row-normalised so that small classes are as visible as large ones; empty rows stay white.
    norm = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=np.float64), where=row_sums > 0)

    labels = [plain_text(_shorten(str(c))) for c in classes]
    longest = max(len(lbl) for lbl in labels)
    cell = 0.42 if n <= 20 else 0.32
    label_room = min(longest, _MAX_LABEL_CHARS) * 0.075 + 0.8
    side = max(4.5, n * cell) + label_room
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    cbar = fig.colorbar(image, ax=ax, shrink=0.8, format=PercentFormatter(xmax=1.0, decimals=0))
    cbar.set_label("share of the true class", fontsize=10)

    ticks = np.arange(n)
    rotate = n > 4 or longest > 6
    ax.set_xticks(ticks, labels, fontsize=9 if n <= 20 else 7)
    ax.set_yticks(ticks, labels, fontsize=9 if n <= 20 else 7)
    if rotate:
        for lbl in ax.get_xticklabels():
            lbl.set_rotation(45 if n <= 20 else 90)
            lbl.set_ha("right" if n <= 20 else "center")
            lbl.set_rotation_mode("anchor" if n <= 20 else "default")
    ax.set_xlabel("predicted", fontsize=11)
    ax.set_ylabel("true", fontsize=11)
    ax.tick_params(length=0)
    # Cell borders as two line collections: minor ticks + grid would build 4n tick artists.
    edges = np.arange(n + 1) - 0.5
    ax.hlines(edges, -0.5, n - 0.5, colors="white", lw=0.8)
    ax.vlines(edges, -0.5, n - 0.5, colors="white", lw=0.8)
    for spine in ax.spines.values():
        spine.set_visible(False)

    count_size = 10 if n <= 10 else 8 if n <= 20 else 6
    for i in range(n):
        for j in range(n):
            count = int(cm[i, j])
            if count == 0 and i != j:
                # Zeros off the diagonal are the common case: grey keeps the eye on mistakes,
                # and past 20 classes leaving them out keeps the matrix legible (and fast).
                if n > 20:
                    continue
                colour = "#b0b0b0"
            else:
                colour = "white" if norm[i, j] > 0.55 else "#1a1a1a"
            text = ax.text(
                j, i, str(count), ha="center", va="center", fontsize=count_size, color=colour
            )
            # The counts sit inside the axes; leaving them out of the layout computation saves
            # most of the drawing time for large matrices.
            text.set_in_layout(False)

    total = int(cm.sum())
    title = f"confusion matrix \u2014 {total} images"
    if total:
        title += f", accuracy {np.trace(cm) / total:.1%}"
    ax.set_title(title, fontsize=12)
    return save_figure(fig, path)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Coerce an image to uint8 RGB so grayscale, RGBA and [0, 1] float arrays also display."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        # Floats in [0, 1] are the other common convention; anything larger is taken as 0..255.
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got an array of shape {np.shape(image)}")
    return arr


def plot_image_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: Path,
    *,
    title: str | None = None,
    ncols: int = 6,
) -> Path:
    """Draw images in a grid with a caption under each (``mistakes.png``, ``samples.png``).

    Args:
        images: uint8 ``HxWx3`` arrays (grayscale, RGBA and float in [0, 1] are converted);
            sizes may differ.
        captions: one per image; may hold a newline, e.g. ``"true: bart\\npred: homer 0.87"``.
        path: where to write the PNG.
        title: drawn above the grid.
        ncols: images per row at most.

    Returns:
        ``path``. With no images the figure says "no images" instead of failing.

    Raises:
        ValueError: ``images`` and ``captions`` differ in length, or ``ncols`` < 1.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    if len(images) == 0:
        return save_figure(_message_figure("no images", title=title), path)

    n = len(images)
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    lines = [
        "\n".join(_shorten(line, _MAX_CAPTION_CHARS) for line in str(c).split("\n"))
        for c in captions
    ]
    caption_lines = max(c.count("\n") + 1 for c in lines)
    cell_w = 2.3
    cell_h = 2.0 + 0.19 * caption_lines + 0.15
    title_h = 0.45 if title else 0.0
    fig = new_figure(max(cols * cell_w, 4.0), rows * cell_h + title_h)
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, caption in zip(axes, images, lines, strict=False):
        ax.imshow(_as_rgb_uint8(image), interpolation="antialiased")
        # Anchored to the bottom of its cell, every image ends at the same height whatever its
        # aspect ratio, so the captions below line up in rows.
        ax.set_anchor("S")
        ax.text(
            0.5,
            -0.03,
            plain_text(caption),
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=8.5,
            linespacing=1.2,
        )
    if title:
        fig.suptitle(plain_text(title), fontsize=13, fontweight="bold")
    return save_figure(fig, path)
