"""A run's data: the folder, its train/validation split decoded once, and the train iterator."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
from rich.console import Console

from springfield import parallel
from springfield.config import TrainConfig
from springfield.data.pipeline import to_iterator, train_dataset
from springfield.data.prepare import Split, decode_split, prepare_splits, resolve_data_root


@dataclass(frozen=True)
class RunData:
    """The decoded splits of a run; ``early_val`` is the validation split at ``--early-size``."""

    root: Path
    train: Split
    val: Split
    early_val: Split | None

    @property
    def classes(self) -> list[str]:
        return list(self.train.index.classes)


def load_data(cfg: TrainConfig, console: Console | None) -> RunData:
    """Folder -> index -> split -> decoded once (cached), the same on every process.

    ``cfg.image_size`` must be resolved. ``console`` is None on processes that stay quiet.
    """
    root = resolve_data_root(cfg.data, per_class=cfg.synthetic_per_class, console=console)
    train_split, val_split = prepare_splits(
        root,
        image_size=tuple(cfg.image_size),
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        on_bad_image=cfg.on_bad_image,
        group_threshold=cfg.group_threshold if cfg.split_by_group else None,
        only=list(cfg.classes) if cfg.classes else None,
        console=console,
    )
    # The early epochs are evaluated at their own size: the numbers a 64 px model earns on
    # 64 px images, at a third of the cost of evaluating at full size.
    early_val = (
        decode_split(val_split.index, tuple(cfg.early_size), console, "validation (early size)")
        if cfg.early_epochs
        else None
    )
    parallel.check_same(
        data_fingerprint(train_split, val_split),
        "the data: --data must hold the same images on every host",
    )
    return RunData(root, train_split, val_split, early_val)


def data_fingerprint(*splits: Split) -> str:
    """What the splits hold, independent of where the folder is mounted."""
    # Relative paths and labels: hosts may mount the data at different places.
    return json.dumps(
        [
            [
                s.index.classes,
                s.index.labels,
                [os.path.relpath(p, s.index.root) for p in s.index.paths],
            ]
            for s in splits
        ]
    )


def train_iterator(
    cfg: TrainConfig,
    split: Split,
    local_batch: int,
    steps_per_epoch: int,
    steps: int,
) -> grain.DatasetIterator:
    """The run's first ``steps`` training batches (of ``--epochs`` passes): this process's
    shard, augmented in ``--workers`` processes. Its state goes into every checkpoint."""
    return to_iterator(
        train_dataset(
            split.npy,
            split.labels,
            batch_size=local_batch,
            epochs=cfg.epochs,
            seed=cfg.seed,
            augment=cfg.augment,
            erase=cfg.erase,
            gray=cfg.grayscale,
            style=cfg.style,
            balanced=cfg.balance == "sampler",
            early_steps=cfg.early_epochs * steps_per_epoch,
            early_size=cfg.early_size,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            steps=steps,
        ),
        workers=cfg.workers,
    )


def augmented_samples(cfg: TrainConfig, split: Split) -> tuple:
    """The first training batch exactly as the model sees it (after augmentation):
    ``(images, labels)``, for the report's ``samples.png``."""
    ds = train_dataset(
        split.npy,
        split.labels,
        batch_size=min(cfg.batch_size, len(split.index)),
        epochs=1,
        seed=cfg.seed,
        augment=cfg.augment,
        erase=cfg.erase,
        gray=cfg.grayscale,
        style=cfg.style,
        balanced=cfg.balance == "sampler",
    )
    it = to_iterator(ds, workers=0)
    batch = next(it)
    it.close()
    return batch["image"], batch["label"]
