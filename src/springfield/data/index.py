"""Folder of images -> an index of (path, label) pairs, and the train/validation split.

Layout: ``<root>/<class_name>/<image files>``, or ``<root>/train/<class>/...`` plus
``<root>/val/<class>/...``. Files are recognised by content, not by extension; hidden files and
files that are not images are skipped and reported, never silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from springfield.data.decode import probe_image
from springfield.errors import BadImageError, SpringfieldError
from springfield.paths import printable


@dataclass(frozen=True)
class ImageIndex:
    """Image files of one split with their integer labels.

    ``paths[i]`` has label ``labels[i]``, an index into ``classes``. ``skipped`` lists
    ``(path, reason)`` for every file the scan left out.
    """

    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    skipped: tuple[tuple[str, str], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        """Images per class name."""
        counts = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def subset(self, rows: Sequence[int]) -> ImageIndex:
        """The index restricted to ``rows`` (in that order), keeping classes and skipped."""
        return ImageIndex(
            self.root,
            self.classes,
            tuple(self.paths[i] for i in rows),
            tuple(self.labels[i] for i in rows),
            self.skipped,
        )


def _class_dirs(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def scan_folder(
    root: Path,
    *,
    classes: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
    on_bad_image: str = "skip",
) -> ImageIndex:
    """Index ``root/<class>/*`` by probing each file's header.

    Args:
      root: the folder with one sub-folder per class.
      classes: expected class names in label order (e.g. from a checkpoint). ``None`` takes
        the sorted sub-folder names. A sub-folder that is not in ``classes`` is an error.
      only: use just these class sub-folders (in this label order) and ignore the others.
      on_bad_image: ``"skip"`` records unreadable files in ``skipped``; ``"fail"`` raises on
        the first one.

    Raises:
      SpringfieldError: the folder is missing, has fewer than two classes, or a class has no
        readable image.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise SpringfieldError(
            f"--data {root}: folder not found. Point --data at a folder of "
            "class sub-folders, or leave it out to use the built-in dataset."
        )
    if not root.is_dir():
        raise SpringfieldError(
            f"--data {root}: not a folder. It must hold one sub-folder per "
            "class (e.g. bart_simpson/, homer_simpson/)."
        )
    dirs = _class_dirs(root)
    if not dirs:
        raise SpringfieldError(
            f"--data {root}: no class sub-folders found. Put each class's "
            "images in its own sub-folder: <root>/<class>/<image>."
        )
    found = [d.name for d in dirs]
    if only:
        missing = [c for c in only if c not in found]
        if missing:
            raise SpringfieldError(
                f"--classes: no folder {', '.join(missing)} in {root} (it has {', '.join(found)})."
            )
        dirs = [root / c for c in only]
        found = list(only)
        classes = classes or list(only)
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise SpringfieldError(
                f"--data {root}: only one class folder ({found[0]}); a "
                "classifier needs at least two class sub-folders."
            )
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise SpringfieldError(
                f"--data {root}: class folder(s) {', '.join(extra)} are not "
                f"among the model's classes ({', '.join(classes)})."
            )
    label_of = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    for d in dirs:
        n_good = 0
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise SpringfieldError(
                f"--data {root}: cannot list class folder {printable(d.name)}/ "
                f"({e.strerror}). Fix its permissions or remove it."
            ) from None
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                skipped.append((str(path), "hidden file"))
                continue
            try:
                if entry.is_dir():
                    skipped.append((str(path), "folder inside a class folder"))
                    continue
                probe_image(path)
            except (BadImageError, OSError) as e:
                reason = (
                    str(e) if isinstance(e, BadImageError) else f"unreadable: {e.strerror or e}"
                )
                if on_bad_image == "fail":
                    raise SpringfieldError(
                        f"{printable(str(path))}: {reason}. Remove the file or pass "
                        "--on-bad-image skip."
                    ) from None
                skipped.append((str(path), reason))
                continue
            paths.append(str(path))
            labels.append(label_of[d.name])
            n_good += 1
        if n_good == 0:
            raise SpringfieldError(
                f"--data {root}: class folder {d.name}/ has no readable "
                "image. Add images (JPEG, PNG, ...) or remove the folder."
            )
    return ImageIndex(root, tuple(classes), tuple(paths), tuple(labels), tuple(skipped))


# A class's validation share is never below this many images: one or two images would make
# its recall 0%, 50% or 100% and nothing in between.
MIN_VAL_IMAGES = 2
# ... and at least as many as this are left to train on.
MIN_TRAIN_IMAGES = 3


def check_class_sizes(index: ImageIndex) -> None:
    """Refuse to split a class too small to both train on and validate on.

    Raises:
        SpringfieldError: naming the smallest such class, its size and the ways out.
    """
    need = MIN_VAL_IMAGES + MIN_TRAIN_IMAGES
    counts = index.counts()
    small = sorted((n, c) for c, n in counts.items() if n < need)
    if small:
        n, name = small[0]
        others = f" (and {len(small) - 1} more such class(es))" if len(small) > 1 else ""
        raise SpringfieldError(
            f"class {name}: only {n} image(s){others}; splitting off validation needs at "
            f"least {need} per class ({MIN_VAL_IMAGES} to validate on, {MIN_TRAIN_IMAGES} to "
            "train on). Add images, leave the class out with --classes, or give "
            "<data>/train and <data>/val folders."
        )


def stratified_split(
    index: ImageIndex, val_fraction: float, seed: int
) -> tuple[ImageIndex, ImageIndex]:
    """Seeded split keeping each class's share: ``round(n_c * val_fraction)`` per class go to
    validation (at least ``MIN_VAL_IMAGES``, and at least ``MIN_TRAIN_IMAGES`` left to train)."""
    if not 0.0 < val_fraction < 1.0:
        raise SpringfieldError(
            f"--val-fraction {val_fraction}: must be between 0 and 1 "
            "(e.g. 0.2), or give <data>/train and <data>/val folders."
        )
    check_class_sizes(index)
    rng = np.random.default_rng(seed)
    labels = np.asarray(index.labels)
    train_rows: list[int] = []
    val_rows: list[int] = []
    for c in range(len(index.classes)):
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        n_val = int(round(len(rows) * val_fraction))
        n_val = min(max(n_val, MIN_VAL_IMAGES), len(rows) - MIN_TRAIN_IMAGES)
        val_rows += sorted(rows[:n_val].tolist())
        train_rows += sorted(rows[n_val:].tolist())
    return index.subset(train_rows), index.subset(val_rows)


def group_split(
    index: ImageIndex, val_fraction: float, seed: int, threshold: float
) -> tuple[ImageIndex, ImageIndex]:
    """Seeded, stratified split that keeps near-duplicate images (same scene) together."""
    from springfield.data.groups import group_split_rows, near_duplicate_groups, thumbnail

    if not 0.0 < val_fraction < 1.0:
        raise SpringfieldError(f"--val-fraction {val_fraction}: must be between 0 and 1.")
    check_class_sizes(index)
    thumbs = np.stack([thumbnail(Path(p)) for p in index.paths])
    labels = np.asarray(index.labels)
    groups = near_duplicate_groups(thumbs, labels, threshold)
    train_rows, val_rows = group_split_rows(
        labels, groups, val_fraction, seed, min_val=MIN_VAL_IMAGES
    )
    val_counts = np.bincount(labels[val_rows], minlength=len(index.classes))
    train_counts = np.bincount(labels[train_rows], minlength=len(index.classes))
    for c, name in enumerate(index.classes):
        if val_counts[c] < MIN_VAL_IMAGES or train_counts[c] < MIN_TRAIN_IMAGES:
            n = int(val_counts[c] + train_counts[c])
            raise SpringfieldError(
                f"class {name}: its {n} images look like too few scenes to split "
                f"({int(train_counts[c])} to train, {int(val_counts[c])} to validate after "
                f"keeping near-duplicates together; at least {MIN_TRAIN_IMAGES} and "
                f"{MIN_VAL_IMAGES} needed). Add images from other scenes, or drop "
                "--split-by-group (or lower --group-threshold)."
            )
    return index.subset(train_rows), index.subset(val_rows)


def load_splits(
    root: Path,
    *,
    val_fraction: float,
    seed: int,
    classes: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
    on_bad_image: str = "skip",
    group_threshold: float | None = None,
) -> tuple[ImageIndex, ImageIndex]:
    """Train and validation indexes: ``root/train`` + ``root/val`` when both exist, otherwise a
    stratified split of ``root`` (scene-aware when ``group_threshold`` is given)."""
    root = Path(root).expanduser()
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = scan_folder(root / "train", classes=classes, only=only, on_bad_image=on_bad_image)
        val = scan_folder(root / "val", classes=train.classes, only=only, on_bad_image=on_bad_image)
        merged = train.skipped + val.skipped
        return (
            ImageIndex(root, train.classes, train.paths, train.labels, merged),
            ImageIndex(root, val.classes, val.paths, val.labels, merged),
        )
    full = scan_folder(root, classes=classes, only=only, on_bad_image=on_bad_image)
    if group_threshold is not None:
        return group_split(full, val_fraction, seed, group_threshold)
    return stratified_split(full, val_fraction, seed)
