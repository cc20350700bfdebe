"""Scene-aware splitting: keep near-duplicate frames on the same side of the split.

Video frames of one scene look alike; if one lands in training and its neighbour in
validation, validation accuracy measures memory, not recognition. Images are grouped by a
tiny colour thumbnail (8x8 RGB, decoded cheaply with JPEG draft mode): two images of the same
class whose thumbnails differ by less than ``threshold`` (mean absolute difference, 0-255)
are linked, and groups are the connected components. Whole groups then go to one side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from springfield.data.decode import load_rgb
from springfield.errors import BadImageError

THUMB = 8


def thumbnail(path: Path) -> np.ndarray:
    """8x8 RGB box-filtered thumbnail as a float vector of 192 values."""
    try:
        small = load_rgb(Path(path), size=(4 * THUMB, 4 * THUMB))
    except BadImageError:
        return np.full(3 * THUMB * THUMB, np.nan, np.float32)
    img = Image.fromarray(small).resize((THUMB, THUMB), Image.BOX)
    return np.asarray(img, np.float32).ravel()


def near_duplicate_groups(
    thumbs: np.ndarray, labels: np.ndarray, threshold: float, chunk: int = 256
) -> np.ndarray:
    """Group id per image: connected components of "same class and thumbnail distance <
    ``threshold``"."""
    n = len(thumbs)
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        t = thumbs[rows]
        for start in range(0, len(rows), chunk):
            # Chunked: the full (n, n, 192) difference would not fit in memory.
            d = np.abs(t[start : start + chunk, None, :] - t[None, :, :]).mean(-1)
            ii, jj = np.nonzero(d < threshold)
            for a, b in zip(rows[ii + start], rows[jj], strict=True):
                if a < b:
                    ra, rb = find(a), find(b)
                    if ra != rb:
                        parent[ra] = rb
    return np.array([find(a) for a in range(n)])


def group_split_rows(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int, min_val: int = 1
) -> tuple[list[int], list[int]]:
    """Per class, whole groups in seeded random order go to validation until it holds
    ``max(min_val, round(n_class * val_fraction))`` images (at least one group, never all of
    them)."""
    rng = np.random.default_rng(seed)
    train_rows: list[int] = []
    val_rows: list[int] = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        ids = np.unique(groups[rows])
        ids = ids[rng.permutation(len(ids))]
        target = max(min_val, int(round(len(rows) * val_fraction)))
        chosen: set[int] = set()
        count = 0
        for g in ids[:-1]:
            if count >= target:
                break
            chosen.add(int(g))
            count += int(np.sum(groups[rows] == g))
        for r in rows:
            (val_rows if int(groups[r]) in chosen else train_rows).append(int(r))
    return sorted(train_rows), sorted(val_rows)
