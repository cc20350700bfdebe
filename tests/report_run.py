"""A small run folder for the report tests: its figures and report.html written from made-up
history, evaluation and images (real files, nothing mocked)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from springfield.report import (
    plot_confusion,
    plot_curves,
    plot_image_grid,
    write_report_html,
)

EVIL = "<script>alert(1)</script>"
CLASSES = ["bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson", EVIL]
FIGURE_NAMES = ("curves.png", "confusion.png", "mistakes.png", "samples.png")


def assert_png(path: Path, *, min_w: int = 200, min_h: int = 150) -> Image.Image:
    """Assert ``path`` is a real, non-blank PNG of at least the given size."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    assert img.width >= min_w and img.height >= min_h, img.size
    assert np.asarray(img.convert("L"), dtype=np.float64).std() > 0, f"{path} is blank"
    return img


def make_history(epochs: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "step": e * 50,
            "lr": 1e-3 * (0.7 ** (e - 1)),
            "train_loss": 2.0 / e,
            "train_accuracy": 1 - 0.8 / e,
            "val_loss": 2.2 / e + 0.1,
            "val_accuracy": 0.9 - 0.7 / e,
            "train_img_s": 1500.0 + e,
            "epoch_seconds": 12.5,
            "input_wait_fraction": 0.03,
        }
        for e in range(1, epochs + 1)
    ]


def make_confusion(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, 4, size=(n, n))
    cm[np.arange(n), np.arange(n)] = rng.integers(10, 30, size=n)
    return cm


def make_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Mixed sizes and aspect ratios, as real crops are.
    return [
        rng.integers(0, 256, size=(48 + 8 * (i % 3), 40 + 6 * (i % 4), 3), dtype=np.uint8)
        for i in range(count)
    ]


def make_eval(classes: list[str]) -> dict:
    cm = make_confusion(len(classes))
    tp = np.diag(cm)
    precision = tp / cm.sum(axis=0)
    recall = tp / cm.sum(axis=1)
    f1 = 2 * precision * recall / (precision + recall)
    return {
        "accuracy": float(tp.sum() / cm.sum()),
        "loss": 0.4321,
        "num_images": int(cm.sum()),
        "classes": classes,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
            }
            for i, name in enumerate(classes)
        },
        "confusion": cm.tolist(),
    }


def make_dataset(classes: list[str]) -> dict:
    return {
        "root": "/data/simpsons",
        "classes": classes,
        "train_counts": {c: 100 + i for i, c in enumerate(classes)},
        "val_counts": {c: 10 + i for i, c in enumerate(classes)},
        "skipped": [
            {"path": f"/data/simpsons/bart/{EVIL}.jpg", "reason": "cannot identify image file"},
            {"path": "/data/simpsons/.DS_Store", "reason": "not an image"},
        ],
    }


def write_run(run_dir: Path, *, figures: tuple[str, ...] = FIGURE_NAMES) -> float:
    """Write the figures and report.html for a small run; return the seconds it took."""
    run_dir.mkdir(parents=True, exist_ok=True)
    history = make_history(8)
    ev = make_eval(CLASSES)
    images = make_images(13)
    start = time.perf_counter()
    if "curves.png" in figures:
        plot_curves(history, run_dir / "curves.png")
    if "confusion.png" in figures:
        plot_confusion(np.asarray(ev["confusion"]), CLASSES, run_dir / "confusion.png")
    if "mistakes.png" in figures:
        captions = [f"true: {CLASSES[i % 5]}\npred: homer_simpson 0.{80 + i}" for i in range(13)]
        plot_image_grid(images, captions, run_dir / "mistakes.png", title="mistakes")
    if "samples.png" in figures:
        plot_image_grid(images[:6], CLASSES + ["bart_simpson"], run_dir / "samples.png")
    write_report_html(
        run_dir,
        config={"model": {"name": "tiny_cnn", "width": 32}, "epochs": 8, "lr": 1e-3},
        dataset=make_dataset(CLASSES),
        eval_result=ev,
        history=history,
        timings={"total_seconds": 101.5, "compile_seconds": 9.25},
        environment={"python": "3.11", "jax": "0.10.2", "devices": ["cpu:0"]},
    )
    return time.perf_counter() - start
