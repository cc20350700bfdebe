"""Tests for springfield.report: figures, report.html, TensorBoard helpers, and a headless browser.

Everything writes real files under tmp_path and reads them back (Pillow for PNGs, the tfevents
parser for TensorBoard, Chromium for the page); nothing is mocked.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from springfield.errors import SpringfieldError
from springfield.report import (
    log_figures,
    plot_confusion,
    plot_curves,
    plot_image_grid,
    read_scalars,
    write_report_html,
)
from springfield.report.tensorboard import iter_events

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


# --- TensorBoard ---------------------------------------------------------------------------


def test_read_scalars_round_trip(tmp_path: Path) -> None:
    from tensorboardX import SummaryWriter

    logdir = tmp_path / "tb"
    with SummaryWriter(logdir=str(logdir)) as writer:
        for step in (0, 10, 20):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)
            writer.add_scalar("val/accuracy", 0.25 + step / 100, step)
        writer.add_scalar("train/lr", 3e-4, 20)
    scalars = read_scalars(logdir)
    assert set(scalars) == {"train/loss", "val/accuracy", "train/lr"}
    assert [s for s, _ in scalars["train/loss"]] == [0, 10, 20]
    # simple_value is a float32 on disk.
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.0, 1 / 11, 1 / 21], rel=1e-6)
    assert [v for _, v in scalars["val/accuracy"]] == pytest.approx([0.25, 0.35, 0.45], rel=1e-6)
    assert scalars["train/lr"] == [(20, pytest.approx(3e-4, rel=1e-6))]


def test_read_scalars_keeps_sub_writers_apart(tmp_path: Path) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(logdir=str(tmp_path)) as writer:
        writer.add_scalars("loss", {"train": 1.0, "val": 2.0}, 3)
        writer.add_scalar("lr", 0.5, 3)
    scalars = read_scalars(tmp_path)
    assert scalars["lr"] == [(3, 0.5)]
    assert scalars["loss/train/loss"] == [(3, 1.0)]
    assert scalars["loss/val/loss"] == [(3, 2.0)]


def test_read_scalars_tolerates_truncation_and_rejects_corruption(tmp_path: Path) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(logdir=str(tmp_path)) as writer:
        writer.add_scalar("loss", 0.5, 1)
        writer.add_scalar("loss", 0.25, 2)
    (events,) = [p for p in tmp_path.iterdir() if "tfevents" in p.name]
    data = events.read_bytes()

    # A writer killed mid-record leaves a partial record at the end: read what is complete.
    events.write_bytes(data[:-5])
    assert read_scalars(tmp_path) == {"loss": [(1, 0.5)]}
    events.write_bytes(data + data[:7])
    assert read_scalars(tmp_path) == {"loss": [(1, 0.5), (2, 0.25)]}

    # A flipped byte inside the last record's value fails its checksum.
    corrupt = bytearray(data)
    corrupt[-6] ^= 0xFF
    events.write_bytes(bytes(corrupt))
    with pytest.raises(SpringfieldError, match="corrupt"):
        read_scalars(tmp_path)

    with pytest.raises(SpringfieldError, match="does not exist"):
        read_scalars(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert read_scalars(tmp_path / "empty") == {}


def test_log_figures_writes_image_summaries(run_dir: Path, tmp_path: Path) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(logdir=str(tmp_path)) as writer:
        writer.add_scalar("train/loss", 1.5, 7)
        log_figures(writer, run_dir, step=7)
    images = {}
    for path in tmp_path.iterdir():
        for event in iter_events(path):
            for value in event.summary.value:
                if value.HasField("image"):
                    images[value.tag] = (event.step, value.image)
    assert set(images) == {f"figures/{Path(n).stem}" for n in FIGURE_NAMES}
    for name in FIGURE_NAMES:
        step, image = images[f"figures/{Path(name).stem}"]
        assert step == 7
        decoded = Image.open(io.BytesIO(image.encoded_image_string))
        assert decoded.size == Image.open(run_dir / name).size == (image.width, image.height)
    # The scalar next to the images still reads back.
    assert read_scalars(tmp_path) == {"train/loss": [(7, 1.5)]}


# --- headless browser ----------------------------------------------------------------------


def _find(binary: str) -> str | None:
    path = Path("/usr/bin") / binary
    return str(path) if path.is_file() else shutil.which(binary)


CHROMIUM = _find("chromium")
CHROMEDRIVER = _find("chromedriver")


@pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
    reason="chromium/chromedriver not installed (run .ci/chromium.sh); CI never skips this",
)
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    """report.html opens with no failed or external requests and every image loads."""
    render_in_chromium(run_dir / "report.html", tmp_path, len(FIGURE_NAMES))


def render_in_chromium(page: Path, tmp_path: Path, n_images: int) -> None:
    """Open ``page`` in headless Chromium: no failed or external requests, all images load,
    and a full-page screenshot that is not blank."""
    assert CHROMIUM and CHROMEDRIVER, "CI must install chromium + chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # Containers often give /dev/shm only 64 MB, which crashes the renderer on big pages.
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    # Network events show requests that failed or were blocked (e.g. by the page's CSP) even
    # when they never become performance entries; the console shows CSP violations.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})

    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(60)
        url = page.resolve().as_uri()
        driver.get(url)
        state = driver.execute_script(
            """
            return {
              ready: document.readyState,
              images: Array.from(document.images).map(i => ({
                complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                shown: i.getBoundingClientRect().width, src: i.src.slice(0, 30)})),
              resources: performance.getEntriesByType('resource').map(e => e.name.slice(0, 80)),
            };
            """
        )
        assert state["ready"] == "complete"
        assert len(state["images"]) == n_images
        for img in state["images"]:
            assert img["complete"] and img["w"] > 0 and img["h"] > 0 and img["shown"] > 0, img
            assert img["src"].startswith("data:image/png;base64,"), img
        external = [r for r in state["resources"] if not r.startswith("data:")]
        assert external == [], external

        # Only requests made for this page count: at start-up Chromium's own new-tab page
        # tries (and fails) to reach the network, which says nothing about the report.
        ours: dict[str, str] = {}
        failed: list[dict] = []
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message["params"]
            if message["method"] == "Network.requestWillBeSent":
                if params.get("documentURL") == url:
                    ours[params["requestId"]] = params["request"]["url"]
            elif message["method"] == "Network.loadingFailed":
                failed.append(params)
        assert url in ours.values(), "the performance log missed the page load"
        assert [f for f in failed if f["requestId"] in ours] == []
        assert [u[:80] for u in ours.values() if u != url and not u.startswith("data:")] == []
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []

        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(int(height) + 100, 12000))
        shot = tmp_path / "report.png"
        shot.write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.quit()
    img = assert_png(shot, min_w=1000, min_h=900)
    # The figures make the page colourful; a page whose images failed would be grey and white.
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert (saturation > 60).mean() > 0.01


@pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
    reason="chromium/chromedriver not installed (run .ci/chromium.sh); CI never skips this",
)
def test_a_real_training_run_writes_figures_report_and_tensorboard(tiny_folder, tmp_path):
    from springfield.cli import main

    workdir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_folder),
                "--workdir",
                str(workdir),
                "--epochs",
                "2",
                "--image-size",
                "32",
                "32",
                "--batch-size",
                "8",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    for name in (*FIGURE_NAMES, "report.html"):
        assert (workdir / name).is_file(), name
    for name in FIGURE_NAMES:
        assert_png(workdir / name, min_w=100, min_h=100)
    scalars = read_scalars(workdir / "tensorboard")
    assert [s for s, _ in scalars["epoch/val_accuracy"]] == [5, 10]
    assert len(scalars["step/loss"]) >= 1 and "epoch/lr" in scalars
    page = (workdir / "report.html").read_text(encoding="utf-8")
    assert "bart_simpson" in page and "jaxlib" in page
    render_in_chromium(workdir / "report.html", tmp_path, len(FIGURE_NAMES))
    # `springfield report` regenerates the same set from the checkpoint.
    for name in FIGURE_NAMES:
        (workdir / name).unlink()
    assert main(["report", str(workdir)]) == 0
    assert all((workdir / name).is_file() for name in FIGURE_NAMES)
