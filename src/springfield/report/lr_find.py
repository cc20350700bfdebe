"""``lr_find.png``: the learning-rate finder's smoothed loss against the rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from springfield.report.figures import new_figure, save_figure


def plot_lr_find(result: Any, path: Path) -> Path:
    """Raw (faint) and smoothed loss vs learning rate on a log axis; the suggestion marked.

    ``result``: a :class:`springfield.training.lr_find.LrFind` (or anything with its fields).
    """
    fig = new_figure(7.5, 4.5)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="#1f77b4", alpha=0.25, lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="#1f77b4", lw=2, label="smoothed loss")
    i = min(range(len(result.lrs)), key=lambda k: abs(result.lrs[k] - result.suggestion))
    ax.axvline(result.suggestion, color="#d62728", ls="--", lw=1.2)
    ax.plot(
        [result.suggestion],
        [result.smoothed[i]],
        "o",
        color="#d62728",
        label=f"suggestion {result.suggestion:.2e} (valley)",
    )
    if result.diverged_at:
        ax.axvline(result.diverged_at, color="0.4", ls=":", lw=1.2, label="stopped: diverged")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    lo = min(result.smoothed)
    # The divergence would squash the useful part of the curve: cap the y-axis.
    ax.set_ylim(lo - 0.05 * abs(lo), max(result.smoothed[0], lo) * 1.6 + 0.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax.set_title(f"learning-rate finder ({len(result.lrs)} steps)", fontsize=12)
    return save_figure(fig, path)
