"""report.html as a browser shows it (headless Chromium), and a real training run's figures,
report and TensorBoard files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from report_run import (
    FIGURE_NAMES,
    assert_png,
    write_run,
)

from springfield.report import (
    read_scalars,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run")
    path.joinpath("elapsed.json").write_text(json.dumps(write_run(path)))
    return path


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
