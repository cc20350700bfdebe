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
