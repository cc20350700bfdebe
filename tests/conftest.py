"""Shared fixtures: real image folders on disk, a private cache, absl flags parsed."""

from __future__ import annotations

from pathlib import Path

import pytest

from springfield.runtime import setup_runtime

setup_runtime()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # Decoded arrays and the synthetic set go to a per-session folder, never ~/.cache.
    monkeypatch.setenv("SPRINGFIELD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes x 14 synthetic portraits, 48x48 JPEG: a real folder, fast to train on."""
    from springfield.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("tiny"), per_class=14, size=(48, 48), seed=1)


# The recipe of test_cli.py's `trained_run`: 2 epochs of the default resnet at 32x32.
SMALL_RUN = [
    "--epochs",
    "2",
    "--image-size",
    "32",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--no-tensorboard",
    "--no-report",
]


@pytest.fixture(scope="session")
def small_run(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained on ``tiny_folder`` for the serving and export tests (shared by
    the whole session: copy it before changing it)."""
    from springfield.cli import main

    workdir = tmp_path_factory.mktemp("small-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        # Session fixtures run before the per-test cache fixture: set it here too.
        mp.setenv("SPRINGFIELD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        argv = ["train", "--data", str(tiny_folder), "--workdir", str(workdir), *SMALL_RUN]
        assert main(argv) == 0
    return workdir
