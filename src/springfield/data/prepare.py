"""From a config to decoded, split data: folder -> index -> split -> decoded cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from springfield.data.cache import decode_index
from springfield.data.index import ImageIndex, load_splits, scan_folder
from springfield.data.synthetic import ensure_default_dataset
from springfield.errors import SpringfieldError
from springfield.paths import printable


@dataclass(frozen=True)
class Split:
    """One split, decoded: the ``.npy`` of images and the index of what it holds."""

    index: ImageIndex
    npy: Path

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.index.labels, dtype=np.int32)


def resolve_data_root(data: Path | None, *, per_class: int, console: Console | None) -> Path:
    """``data`` itself, or the built-in synthetic dataset (generated on first use)."""
    if data is not None:
        return Path(data).expanduser()
    root = ensure_default_dataset(seed=0, per_class=per_class)
    if console is not None:
        console.print(f"No --data given: using the built-in synthetic Simpsons set, --data {root}")
    return root


def decode_split(
    index: ImageIndex, image_size: tuple[int, int], console: Console | None, label: str
) -> Split:
    """Decode ``index`` once (cached on disk) with a progress bar."""
    with Progress(
        TextColumn(f"decoding {label} images"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=console is None,
    ) as bar:
        task = bar.add_task(label, total=len(index))
        npy, kept = decode_index(index, image_size, on_progress=lambda k: bar.advance(task, k))
    return Split(kept, npy)


def prepare_splits(
    root: Path,
    *,
    image_size: tuple[int, int],
    val_fraction: float,
    seed: int,
    classes: list[str] | None = None,
    only: list[str] | None = None,
    on_bad_image: str = "skip",
    group_threshold: float | None = None,
    console: Console | None = None,
) -> tuple[Split, Split]:
    """Train and validation splits of ``root``, decoded at ``image_size``."""
    train_idx, val_idx = load_splits(
        root,
        val_fraction=val_fraction,
        seed=seed,
        classes=classes,
        only=only,
        on_bad_image=on_bad_image,
        group_threshold=group_threshold,
    )
    splits = []
    for idx, label in ((train_idx, "train"), (val_idx, "validation")):
        split = decode_split(idx, image_size, console, label)
        if on_bad_image == "fail":
            _fail_on_decode_errors(idx, split)
        splits.append(split)
    return splits[0], splits[1]


def _fail_on_decode_errors(scanned: ImageIndex, decoded: Split) -> None:
    # The scan reads headers only; a file broken further in (truncated, corrupt data) fails
    # at decoding, and --on-bad-image fail must refuse it just the same.
    failed = decoded.index.skipped[len(scanned.skipped) :]
    if failed:
        path, reason = failed[0]
        more = f" ({len(failed) - 1} more such file(s))" if len(failed) > 1 else ""
        raise SpringfieldError(
            f"{printable(path)}: {reason}{more}. Remove the file or pass --on-bad-image skip."
        )


def prepare_folder(
    root: Path,
    *,
    image_size: tuple[int, int],
    classes: list[str],
    console: Console | None = None,
) -> Split:
    """All images of ``root`` (an evaluation folder), labelled with the model's classes."""
    return decode_split(scan_folder(root, classes=classes), image_size, console, "evaluation")
