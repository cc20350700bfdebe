"""Tests for the embedded synthetic Simpsons dataset (real files on disk, no mocks)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from springfield.data import synthetic
from springfield.data.synthetic import (
    CLASSES,
    default_dataset_dir,
    draw_character,
    ensure_default_dataset,
    write_dataset,
)

# Small and few, so the whole module runs in about a second on a shared 2-core machine.
SIZE = (48, 64)  # (height, width), deliberately not square
PER_CLASS = 3


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg"))
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_classes() -> None:
    assert CLASSES == ("bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson")


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", per_class=PER_CLASS, size=SIZE, seed=7)
    b = write_dataset(tmp_path / "b", per_class=PER_CLASS, size=SIZE, seed=7)
    assert a == tmp_path / "a"
    da, db = _digests(a), _digests(b)
    assert len(da) == len(CLASSES) * PER_CLASS
    assert da == db


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    da = _digests(write_dataset(tmp_path / "a", per_class=PER_CLASS, size=SIZE, seed=1))
    db = _digests(write_dataset(tmp_path / "b", per_class=PER_CLASS, size=SIZE, seed=2))
    assert da.keys() == db.keys()
    assert all(da[k] != db[k] for k in da)


def test_images_within_a_class_differ(tmp_path: Path) -> None:
    digests = _digests(write_dataset(tmp_path, per_class=PER_CLASS, size=SIZE, seed=0))
    assert len(set(digests.values())) == len(digests)


def test_layout_counts_and_valid_jpegs(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", per_class=PER_CLASS, size=SIZE, seed=0, quality=80)
    assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES)
    height, width = SIZE
    for name in CLASSES:
        files = sorted((root / name).iterdir())
        assert [f.name for f in files] == [f"{name}_{i:04d}.jpg" for i in range(PER_CLASS)]
        for f in files:
            with Image.open(f) as img:
                assert img.format == "JPEG"
                assert img.size == (width, height)
                img.load()  # full decode, not just the header
                assert img.mode == "RGB"


def test_generation_is_order_independent(tmp_path: Path) -> None:
    # Image i of a class must not depend on how many images were drawn before it.
    small = _digests(write_dataset(tmp_path / "small", per_class=2, size=SIZE, seed=3))
    big = _digests(write_dataset(tmp_path / "big", per_class=PER_CLASS, size=SIZE, seed=3))
    assert all(big[k] == v for k, v in small.items())


@pytest.mark.parametrize("name", CLASSES)
def test_draw_character_returns_rgb_of_requested_size(name: str) -> None:
    img = draw_character(name, np.random.default_rng(0), size=(40, 56))
    assert img.mode == "RGB"
    assert img.size == (56, 40)
    assert np.asarray(img).std() > 5  # drew something, not a blank canvas


@pytest.mark.parametrize("size", [(1, 1), (9, 5), (24, 40), (32, 32), (70, 50)])
def test_draw_character_never_fails(size: tuple[int, int]) -> None:
    # Many random draws at odd sizes shake out rare drawing errors (degenerate shapes).
    for class_idx, name in enumerate(CLASSES):
        for i in range(40):
            img = draw_character(name, np.random.default_rng([11, class_idx, i]), size)
            assert img.size == (size[1], size[0])


def test_draw_character_is_deterministic_per_generator() -> None:
    a = draw_character("lisa_simpson", np.random.default_rng([4, 2, 9]))
    b = draw_character("lisa_simpson", np.random.default_rng([4, 2, 9]))
    assert a.size == (128, 128)
    assert a.tobytes() == b.tobytes()


def test_draw_character_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="maggie"):
        draw_character("maggie_simpson", np.random.default_rng(0))


def test_default_dataset_dir_uses_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPRINGFIELD_CACHE", str(tmp_path))
    assert default_dataset_dir() == tmp_path / "synthetic-v1-seed0-n150"
    assert default_dataset_dir(seed=3, per_class=20) == tmp_path / "synthetic-v1-seed3-n20"


def test_default_dataset_dir_platform_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPRINGFIELD_CACHE", raising=False)
    path = default_dataset_dir()
    assert path.name == "synthetic-v1-seed0-n150"
    assert path.parent.name.lower() in {"springfield", "cache"}
    assert path.is_absolute()


def test_ensure_default_dataset_creates_once_then_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPRINGFIELD_CACHE", str(tmp_path))
    root = ensure_default_dataset(seed=0, per_class=2)
    assert root == default_dataset_dir(seed=0, per_class=2)
    assert (root / ".complete").is_file()
    assert sum(1 for _ in root.rglob("*.jpg")) == len(CLASSES) * 2
    for name in CLASSES:
        assert (root / name / f"{name}_0001.jpg").is_file()
    # No temp folders left next to the finished dataset.
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]

    before = _mtimes(root)
    assert ensure_default_dataset(seed=0, per_class=2) == root
    assert _mtimes(root) == before


def test_ensure_default_dataset_matches_write_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPRINGFIELD_CACHE", str(tmp_path / "cache"))
    cached = _digests(ensure_default_dataset(seed=5, per_class=1))
    direct = _digests(write_dataset(tmp_path / "direct", per_class=1, seed=5))
    assert cached == direct


def test_leftover_temp_dir_does_not_break_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPRINGFIELD_CACHE", str(tmp_path))
    final = default_dataset_dir(seed=0, per_class=1)
    # What an interrupted run leaves behind: a temp sibling with a few images, no marker.
    partial = write_dataset(tmp_path / f".{final.name}.tmp-999-deadbeef", per_class=1, size=SIZE)
    root = ensure_default_dataset(seed=0, per_class=1)
    assert root == final
    assert (root / ".complete").is_file()
    assert sum(1 for _ in root.rglob("*.jpg")) == len(CLASSES)
    # A recent leftover might belong to a live process, so it is left alone...
    assert partial.is_dir()


def test_stale_temp_dir_is_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPRINGFIELD_CACHE", str(tmp_path))
    final = default_dataset_dir(seed=0, per_class=1)
    stale = write_dataset(tmp_path / f".{final.name}.tmp-1-00000000", per_class=1, size=SIZE)
    old = stale.stat().st_mtime - 2 * synthetic._STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    ensure_default_dataset(seed=0, per_class=1)
    assert not stale.exists()


def test_incomplete_final_dir_is_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPRINGFIELD_CACHE", str(tmp_path))
    final = default_dataset_dir(seed=0, per_class=1)
    # A dataset folder without the marker (e.g. copied by hand, or by an older version).
    (final / CLASSES[0]).mkdir(parents=True)
    (final / CLASSES[0] / "junk.jpg").write_bytes(b"not a jpeg")
    root = ensure_default_dataset(seed=0, per_class=1)
    assert (root / ".complete").is_file()
    assert not (root / CLASSES[0] / "junk.jpg").exists()
    assert sum(1 for _ in root.rglob("*.jpg")) == len(CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_concurrent_generation_is_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real threads racing through the real code: all start before any finishes (the barrier and
    # the GIL interleave them), so all but one lose the final rename and must use the winner's.
    monkeypatch.setenv("SPRINGFIELD_CACHE", str(tmp_path))
    n = 3
    barrier = threading.Barrier(n)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(ensure_default_dataset(seed=0, per_class=2))
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = default_dataset_dir(seed=0, per_class=2)
    assert results == [final] * n
    assert (final / ".complete").is_file()
    assert sum(1 for _ in final.rglob("*.jpg")) == len(CLASSES) * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]
