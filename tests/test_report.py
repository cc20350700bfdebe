"""springfield.report: figures and report.html, written as real files under tmp_path and read
back (Pillow for PNGs); nothing is mocked."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from report_run import (
    CLASSES,
    EVIL,
    FIGURE_NAMES,
    assert_png,
    make_confusion,
    make_history,
    make_images,
    write_run,
)

from springfield.errors import SpringfieldError
from springfield.report import (
    plot_confusion,
    plot_curves,
    plot_image_grid,
    write_report_html,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run")
    path.joinpath("elapsed.json").write_text(json.dumps(write_run(path)))
    return path


# --- figures -------------------------------------------------------------------------------


@pytest.mark.parametrize("epochs", [1, 2, 12])
def test_plot_curves_writes_png(tmp_path: Path, epochs: int) -> None:
    out = plot_curves(make_history(epochs), tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert_png(out, min_w=600, min_h=300)


def test_plot_curves_tolerates_missing_keys_and_empty_history(tmp_path: Path) -> None:
    # No validation set, no lr: the train curves alone still plot.
    history = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5}]
    assert_png(plot_curves(history, tmp_path / "partial.png"))
    assert_png(plot_curves([], tmp_path / "empty.png"))


def test_plot_curves_marks_where_the_training_images_change_size(tmp_path: Path) -> None:
    plain = make_history(12)
    same = [{**r, "image_size": [32, 32]} for r in plain]
    resized = [{**r, "image_size": [16, 16] if r["epoch"] <= 8 else [32, 32]} for r in plain]
    pixels = {
        name: np.asarray(assert_png(plot_curves(h, tmp_path / f"{name}.png")))
        for name, h in (("plain", plain), ("same", same), ("resized", resized))
    }
    np.testing.assert_array_equal(pixels["same"], pixels["plain"])  # no change, no line
    assert not np.array_equal(pixels["resized"], pixels["plain"])


@pytest.mark.parametrize("n", [4, 5])
def test_plot_confusion_writes_png(tmp_path: Path, n: int) -> None:
    classes = ["abraham_grampa_simpson", "bart", "$x$ dollar", "lisa_simpson", "x"][:n]
    cm = make_confusion(n)
    cm[1] = 0  # a class with no validation images must not divide by zero
    out = plot_confusion(cm, classes, tmp_path / "confusion.png")
    assert_png(out, min_w=400, min_h=400)


def test_plot_confusion_many_classes(tmp_path: Path) -> None:
    names = [f"character_name_{i:02d}" for i in range(42)]
    assert_png(plot_confusion(make_confusion(42), names, tmp_path / "c.png"), min_w=1000)


def test_plot_confusion_rejects_mismatched_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 classes"):
        plot_confusion(np.zeros((4, 4), dtype=int), ["a", "b", "c"], tmp_path / "c.png")


@pytest.mark.parametrize("count", [0, 1, 13])
def test_plot_image_grid(tmp_path: Path, count: int) -> None:
    captions = [f"true: bart\npred: homer 0.{50 + i}" for i in range(count)]
    out = plot_image_grid(make_images(count), captions, tmp_path / "grid.png", title="mistakes")
    assert_png(out, min_w=200, min_h=100)


def test_plot_image_grid_converts_other_image_layouts(tmp_path: Path) -> None:
    images = [
        np.linspace(0, 1, 32 * 32).reshape(32, 32),  # grayscale float in [0, 1]
        np.full((32, 32, 4), 200, dtype=np.uint8),  # RGBA
    ]
    assert_png(plot_image_grid(images, ["gray", "rgba"], tmp_path / "g.png"), min_w=200)


def test_plot_image_grid_rejects_mismatched_captions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="captions"):
        plot_image_grid(make_images(2), ["only one"], tmp_path / "g.png")


# --- report.html ---------------------------------------------------------------------------


def test_report_is_self_contained(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert 'src="file' not in page
    # Every src/href attribute is an inline PNG; there is nothing else the page could load.
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"' >]*)""", page, flags=re.IGNORECASE)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs[:3]
    assert "url(" not in page and "@import" not in page
    assert "<script" not in page.lower()


def test_report_embeds_every_figure(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(FIGURE_NAMES)
    on_disk = {(run_dir / name).read_bytes() for name in FIGURE_NAMES}
    assert {base64.b64decode(b) for b in embedded} == on_disk


def test_report_shows_data_and_escapes_it(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    for name in CLASSES[:-1]:
        assert name in page
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # Overall numbers, per-class table, dataset, config, timings, environment.
    for text in (
        "0.4321",
        "precision",
        "recall",
        "F1",
        "support",
        "/data/simpsons",
        "tiny_cnn",
        "model.width",
        "compile_seconds",
        "1508",
        "jax",
        "cpu:0",
        ".DS_Store",
    ):
        assert text in page, text


def test_report_with_some_figures_and_no_eval(tmp_path: Path) -> None:
    plot_curves(make_history(1), tmp_path / "curves.png")
    (tmp_path / "mistakes.png").write_bytes(b"not a png")  # e.g. half-written: left out
    write_report_html(
        tmp_path,
        config={},
        dataset={},
        eval_result=None,
        history=make_history(1),
        timings={},
        environment={},
    )
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("<img ") == 1
    assert "not been evaluated" in page


def test_report_needs_an_existing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(SpringfieldError, match="does not exist"):
        write_report_html(
            tmp_path / "missing",
            config={},
            dataset={},
            eval_result=None,
            history=[],
            timings={},
            environment={},
        )
