"""grain pipelines: decoded images -> shuffle -> augment -> batch -> prefetch (worker processes).

Every element is a dict ``{"image": uint8 (H, W, 3), "label": int32, "mask": float32,
"index": int32}`` (``index`` is the row in the decoded array, -1 for padding). Images
stay uint8 until they reach the device: four times fewer bytes to copy, and the jitted step
normalises them for free.

Training order depends only on the seed (grain's dataset API gives the same batches for any
worker count). Evaluation pads the last batch with masked dummies, so every image is counted
exactly once at one fixed batch shape and nothing recompiles.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
import time
from pathlib import Path

import grain
import numpy as np

from springfield.data.augment import Augment, EarlySize, make_augment

# Batches travel from the workers through grain's pipe, never through shared memory. A batch
# a worker had put in shared memory when the iterator closed (the end of training, Ctrl-C)
# was never unlinked: Python's resource tracker warned of leaked shared_memory at every exit
# and cleaned up after grain. Through the pipe, input wait and img/s of a default run on real
# frames stayed as they were (docs/performance.md), and a small /dev/shm no longer matters.
_NO_SHM = 1 << 62

# Tells the augmentation's random stream apart from the shuffle's (both come from --seed).
_AUGMENT_STREAM = 0x5A
# ... and the class-balanced sampler's.
_BALANCE_STREAM = 0xBA


class ArraySource:
    """Random-access grain source over a decoded ``(N, H, W, 3)`` ``.npy`` file.

    The memory map is opened lazily in each process, so pickling the source to grain's
    spawned workers sends only the path. ``length`` above ``N`` pads with masked zeros.
    """

    def __init__(self, npy: Path, labels: np.ndarray, length: int | None = None) -> None:
        self.npy = str(npy)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.n = len(self.labels)
        self.length = self.n if length is None else length
        self._images: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"ArraySource({self.npy!r}, n={self.n}, length={self.length})"

    def __getitem__(self, i: int) -> dict:
        if self._images is None:
            self._images = np.load(self.npy, mmap_mode="r")
        if i < self.n:
            return {
                "image": np.asarray(self._images[i]),
                "label": self.labels[i],
                "mask": np.float32(1.0),
                "index": np.int32(i),
            }
        shape = self._images.shape[1:]
        return {
            "image": np.zeros(shape, np.uint8),
            "label": np.int32(0),
            "mask": np.float32(0.0),
            "index": np.int32(-1),
        }


class RowsSource:
    """A grain source that reads ``base`` in a precomputed order of rows (with repeats)."""

    def __init__(self, base: ArraySource, rows: np.ndarray) -> None:
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"RowsSource({self.base!r}, rows={len(self.rows)})"

    def __getitem__(self, i: int) -> dict:
        return self.base[int(self.rows[i])]


def balanced_rows(labels: np.ndarray, epochs: int, seed: int) -> np.ndarray:
    """Row order of ``epochs`` class-balanced epochs: every class drawn equally often.

    An epoch keeps its length (``len(labels)`` draws, so steps per epoch do not change) and
    gives each class an equal share of it (the remainder to classes in a seeded order). A
    class's draws walk through seeded permutations of its images back to back, so a small
    class repeats each image before any image repeats twice, and a large class's images are
    all seen over consecutive epochs. Each epoch is then shuffled. The order depends only on
    ``labels`` and ``seed``: a resumed run reads the same stream.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _BALANCE_STREAM]))
    classes = np.unique(labels)
    members = {int(c): np.flatnonzero(labels == c) for c in classes}
    queues: dict[int, list[int]] = {int(c): [] for c in classes}
    n, k = len(labels), len(classes)
    out = []
    for _ in range(epochs):
        quota = np.full(k, n // k)
        quota[rng.permutation(k)[: n % k]] += 1
        epoch: list[int] = []
        for c, q in zip(classes, quota, strict=True):
            queue = queues[int(c)]
            while len(queue) < q:
                queue.extend(members[int(c)][rng.permutation(len(members[int(c)]))].tolist())
            epoch += queue[:q]
            del queue[:q]
        out.append(np.asarray(epoch)[rng.permutation(len(epoch))])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Loss weight per class, ``n / (num_classes * n_c)`` (scikit-learn's "balanced"):
    every class then carries the same total weight, and the mean weight over images is 1."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = np.divide(
        len(labels), num_classes * counts, out=np.zeros_like(counts), where=counts > 0
    )
    return weights.astype(np.float32)


def loss_weights(labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """:func:`class_weights` for ``--balance loss``, or ``None`` when every class has as many
    images: the weights would all be exactly 1 and the weighted mean the plain one, so a
    balanced folder trains with the unweighted loss, bit for bit as without the option."""
    weights = class_weights(labels, num_classes)
    return None if np.all(weights == weights[0]) else weights


def train_dataset(
    npy: Path,
    labels: np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    augment: str,
    erase: float = 0.0,
    gray: float = 0.0,
    style: float = 0.0,
    early_steps: int = 0,
    early_size: tuple[int, int] | None = None,
    balanced: bool = False,
    shard_index: int = 0,
    shard_count: int = 1,
    steps: int | None = None,
) -> grain.MapDataset:
    """Shuffled, augmented, batched training stream of ``epochs`` passes.

    Each epoch is a new permutation of the training images (grain reshuffles per repeat),
    or with ``balanced`` a class-balanced draw of the same length (:func:`balanced_rows`).
    ``augment`` names a preset of :mod:`springfield.data.augment`; ``erase``, ``gray`` and
    ``style`` add random erasing, random greyscale and drawing-style changes to it with
    those chances per image. The first
    ``early_steps`` batches come out at ``early_size`` (scaled within the crop's resample;
    progressive resizing).
    With ``shard_count > 1`` (multi-host) each process reads the disjoint slice
    ``shard_index::shard_count`` of the data (of the balanced stream, with ``balanced``)
    and ``batch_size`` is its local batch. ``steps`` ends the stream after that many
    batches: the ones the trainer will take.
    """
    source = ArraySource(npy, labels)
    if balanced:
        ds = grain.MapDataset.source(RowsSource(source, balanced_rows(labels, epochs, seed)))
        if shard_count > 1:
            ds = ds[shard_index::shard_count]
    else:
        ds = grain.MapDataset.source(source)
        if shard_count > 1:
            ds = ds[shard_index::shard_count]
        ds = ds.seed(seed).shuffle().repeat(epochs)
    aug = make_augment(augment, erase=erase, gray=gray, style=style)
    if early_steps and early_size is not None:
        ds = ds.map_with_index(EarlySize(early_steps * batch_size, tuple(early_size)))
        aug = aug or Augment(flip=False)  # resizes the tagged images and nothing else
    if aug is not None:
        # An explicit seed: grain's default one depends on how many stages sit before this
        # one, and the draws for an image should not change with --early-size.
        aug_seed = int(np.random.SeedSequence([seed, _AUGMENT_STREAM]).generate_state(1)[0])
        ds = ds.random_map(aug, seed=aug_seed)
    ds = ds.batch(batch_size, drop_remainder=True)
    # Batches run across epoch boundaries, so the stream holds more batches than
    # epochs * steps per epoch. A worker still making those when training ends blocks in
    # grain's pipe, and closing the iterator waited grain's 25 s before killing it (the end
    # of every long run); a stream that ends with the last step leaves it idle.
    return ds if steps is None else ds[:steps]


def eval_dataset(
    npy: Path,
    labels: np.ndarray,
    *,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """Every image exactly once, in order, padded to whole batches with ``mask == 0``.

    With several processes the padded set is cut into ``shard_count`` equal contiguous parts,
    so every process runs the same number of batches (collectives stay in step).
    """
    n = len(labels)
    per_step = batch_size * shard_count
    padded = max(1, math.ceil(n / per_step)) * per_step
    ds = grain.MapDataset.source(ArraySource(npy, labels, length=padded))
    if shard_count > 1:
        part = padded // shard_count
        ds = ds[shard_index * part : (shard_index + 1) * part]
    return ds.batch(batch_size, drop_remainder=True)


def to_iterator(ds: grain.MapDataset, *, workers: int, threads: int = 2) -> grain.DatasetIterator:
    """Prefetching iterator; ``workers > 0`` moves augmentation into worker processes."""
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 4))
    )
    if workers > 0:
        it_ds = grain.experimental.WithOptionsIterDataset(
            it_ds, grain.experimental.DatasetOptions(min_shm_size=_NO_SHM)
        )
        # Four finished batches per worker ride out the moments when training takes both
        # cores: with one, input wait after epoch 1 was 2.6-5.7% of a default run; with
        # four, 0.3-1.5% (docs/performance.md). The order of batches does not change.
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=4),
            worker_init_fn=functools.partial(init_worker, parent=os.getpid()),
        )
    return iter(it_ds)


def init_worker(index: int, count: int, *, parent: int) -> None:
    """Set up a grain worker process: deaf to Ctrl-C, and gone when its trainer is gone.

    Ctrl-C in a terminal signals the whole process group. The trainer turns it into a clean
    stop (checkpoint, then exit) and needs its workers alive until then, so workers ignore
    SIGINT. They keep SIGTERM: grain stops its workers with it when the iterator is closed,
    and a worker that ignored it would be killed later without freeing its shared memory.
    A trainer killed outright (SIGKILL, the OOM killer) cannot stop them, so each worker
    also exits once its parent is gone.
    """
    del index, count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # `parent` comes from the trainer: it may have died while this worker was starting up.
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int, interval: float = 0.5) -> None:
    # An orphan is re-parented (to init or a subreaper), so its parent id changes.
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(0)
