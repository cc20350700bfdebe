"""Assemble a run's figures and report.html from its folder and exact predictions."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from springfield.report.figures import plot_confusion, plot_curves, plot_image_grid
from springfield.report.html import write_report_html

MISTAKES = 18
SAMPLES = 18
_PACKAGES = (
    "springfield",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "grain",
    "orbax-checkpoint",
    "numpy",
    "pillow",
)


def environment() -> dict:
    """Software versions and devices, for the report."""
    import jax

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            pass
    env["devices"] = ", ".join(str(d) for d in jax.devices())
    env["processes"] = jax.process_count()
    return env


def read_history(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (empty before the first epoch ends)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def top_losses(
    images: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    losses: np.ndarray,
    classes: list[str],
    k: int = MISTAKES,
) -> tuple[list[np.ndarray], list[str]]:
    """The ``k`` highest-loss images with "true / predicted probability" captions."""
    order = np.argsort(-losses, kind="stable")[:k]
    captions = []
    for i in order:
        pred = int(np.argmax(probs[i]))
        captions.append(f"true: {classes[labels[i]]}\npred: {classes[pred]} {probs[i, pred]:.2f}")
    return [np.asarray(images[rows[i]]) for i in order], captions


def write_run_report(
    out_dir: Path,
    *,
    run_dir: Path,
    classes: list[str],
    eval_result: dict,
    images: np.ndarray,
    predictions: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    samples: tuple[np.ndarray, np.ndarray] | None,
    config: dict,
    dataset: dict,
    timings: dict | None = None,
) -> Path:
    """Write curves/confusion/mistakes/samples PNGs and report.html into ``out_dir``.

    ``predictions`` is ``(rows, labels, probs, losses)``: prediction ``i`` is of image
    ``images[rows[i]]``. The curves come from ``run_dir``'s ``metrics.jsonl``. ``samples`` is
    one augmented training batch ``(images, labels)``, or None to leave out.
    """
    rows, labels, probs, losses = predictions
    history = read_history(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if history:
        plot_curves(history, out_dir / "curves.png")
    plot_confusion(np.asarray(eval_result["confusion"]), classes, out_dir / "confusion.png")
    mistakes, captions = top_losses(images, rows, labels, probs, losses, classes)
    plot_image_grid(
        mistakes, captions, out_dir / "mistakes.png", title="highest-loss validation images"
    )
    if samples is not None:
        imgs, labs = samples
        plot_image_grid(
            list(imgs[:SAMPLES]),
            [classes[int(y)] for y in labs[:SAMPLES]],
            out_dir / "samples.png",
            title="training inputs after augmentation",
        )
    timings = dict(timings or {})
    if history:
        timings.setdefault("training seconds", round(sum(r["epoch_seconds"] for r in history), 1))
        timings.setdefault("epochs", len(history))
    return write_report_html(
        out_dir,
        config=config,
        dataset=dataset,
        eval_result=eval_result,
        history=history,
        timings=timings,
        environment=environment(),
    )
