"""The embedded default dataset on disk: ``write_dataset`` draws the portraits of
:mod:`springfield.data.portraits` into ``<root>/<class>/<image>.jpg`` folders, and
``ensure_default_dataset`` keeps one generated copy in the cache.

Every image is drawn from its own ``np.random.Generator`` seeded with ``[seed, class, index]``,
so the output does not depend on generation order and the same seed gives the same JPEG bytes
(for a given Pillow/libjpeg build).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from springfield.data.portraits import CLASSES, draw_character
from springfield.paths import cache_root

__all__ = [
    "CLASSES",
    "default_dataset_dir",
    "draw_character",
    "ensure_default_dataset",
    "write_dataset",
]

# Bump when the drawing changes so old caches are not silently reused for a different dataset.
_VERSION = "v1"
_COMPLETE_MARKER = ".complete"
# A temp dir this old cannot belong to a live generation (which takes seconds), so it is litter.
_STALE_TMP_SECONDS = 3600.0


def write_dataset(
    root: Path,
    per_class: int = 150,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write root/<class>/<class>_<i:04d>.jpg for each class; return root. Same seed -> same bytes.

    Image i of class c is drawn from ``np.random.default_rng([seed, c, i])``, so any subset can
    be regenerated on its own and the order of generation does not matter.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    root = Path(root)
    for class_idx, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = draw_character(name, np.random.default_rng([seed, class_idx, i]), size)
            # Baseline, non-optimised JPEG: no encoder choices left that could vary between runs.
            img.save(
                folder / f"{name}_{i:04d}.jpg",
                format="JPEG",
                quality=quality,
                optimize=False,
                progressive=False,
            )
    return root


def default_dataset_dir(seed: int = 0, per_class: int = 150) -> Path:
    """Cache location of the default synthetic dataset.

    ``$SPRINGFIELD_CACHE`` if set, else the platform cache dir (``$XDG_CACHE_HOME/springfield``
    or ``~/.cache/springfield`` on Linux, ``~/Library/Caches/springfield`` on macOS,
    ``%LOCALAPPDATA%\\springfield\\Cache`` on Windows), joined with
    ``synthetic-v1-seed{seed}-n{per_class}``.
    """
    return cache_root() / f"synthetic-{_VERSION}-seed{seed}-n{per_class}"


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file()


def _remove_stale_tmp_dirs(final: Path) -> None:
    """Delete temp dirs of earlier, interrupted generations of `final` (old enough to be dead)."""
    now = time.time()
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def ensure_default_dataset(seed: int = 0, per_class: int = 150) -> Path:
    """Return default_dataset_dir(...), generating it first if missing or incomplete.

    The images are written into a hidden temporary sibling folder, a ``.complete`` marker is
    added last, and the folder is renamed into place, so an interrupted run never looks finished.
    If two processes race, the loser discards its copy and uses the winner's.
    """
    final = default_dataset_dir(seed, per_class)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(final)

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_dataset(tmp, per_class=per_class, seed=seed)
        (tmp / _COMPLETE_MARKER).write_text(
            f"synthetic {_VERSION} seed={seed} per_class={per_class}\n", encoding="utf-8"
        )
        if final.exists() and not _is_complete(final):
            # Not made by us (we only ever rename complete folders into place): move it aside
            # rather than delete in place, so a racing reader never sees a half-deleted tree.
            trash = final.parent / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
            try:
                final.rename(trash)
            except OSError:
                pass  # someone else moved or replaced it; the rename below sorts it out
            else:
                shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            # Lost the race (the target now exists): use the winner's copy if it is complete.
            if not _is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
