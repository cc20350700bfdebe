"""Decode every image once, at the training resolution, into one uint8 array on disk.

An epoch then costs only augmentation: on two cores the training step and the input pipeline
share the same CPUs, so decoding JPEGs every epoch would starve the step. The array is a
``.npy`` file that grain worker processes open as a memory map, so nothing large is pickled
to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from springfield.data.decode import load_rgb
from springfield.data.index import ImageIndex
from springfield.errors import BadImageError
from springfield.paths import cache_root


def _fingerprint(index: ImageIndex, size: tuple[int, int]) -> str:
    # Path, byte size and mtime of every file: a changed or replaced image invalidates the cache.
    h = hashlib.sha256(json.dumps(list(size)).encode())
    for p in index.paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:  # gone since the scan: decoding reports it as a skipped file
            stamp = "missing"
        # fsencode: a non-UTF-8 file name is a str with surrogates, which .encode() rejects.
        h.update(os.fsencode(p) + f"\0{stamp}\n".encode())
    return h.hexdigest()[:20]


def decode_index(
    index: ImageIndex,
    size: tuple[int, int],
    *,
    cache_dir: Path | None = None,
    threads: int = 2,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[Path, ImageIndex]:
    """Decode ``index`` to ``(N, H, W, 3)`` uint8 at ``size`` = (height, width).

    Returns the ``.npy`` path and the index of the images it holds, in the same order: a file
    that passes the header probe but fails to decode is moved to ``skipped`` with its reason.
    Reuses an existing cache file with the same fingerprint.
    """
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "decoded"
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _fingerprint(index, size)
    npy = cache_dir / f"{key}.npy"
    meta_path = cache_dir / f"{key}.json"
    if npy.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        keep = meta["keep"]
        failed = [tuple(x) for x in meta["failed"]]
        if on_progress:
            on_progress(len(index))
        return npy, _kept(index, keep, failed)

    h, w = size
    # Processes of one multi-process run on one machine decode the same split at the same
    # time: private temporary names and atomic renames let them all finish with one good
    # file (their contents are identical), and a reader sees the .json only when both exist.
    tmp = f"{npy}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(index), h, w, 3))
    errors: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            out[i] = load_rgb(Path(index.paths[i]), size=size)
        except BadImageError as e:
            errors[i] = str(e)

    # Pillow releases the GIL while decoding, so threads use both cores without pickling.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in pool.map(work, range(len(index))):
            if on_progress:
                on_progress(1)
    keep = [i for i in range(len(index)) if i not in errors]
    failed = [(index.paths[i], errors[i]) for i in sorted(errors)]
    if errors:
        compact = np.lib.format.open_memmap(
            tmp + "c", mode="w+", dtype=np.uint8, shape=(len(keep), h, w, 3)
        )
        compact[:] = out[keep]
        compact.flush()
        del out, compact
        os.replace(tmp + "c", tmp)
    else:
        out.flush()
        del out
    os.replace(tmp, npy)
    meta_tmp = Path(f"{meta_path}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    meta_tmp.write_text(json.dumps({"keep": keep, "failed": failed}))
    os.replace(meta_tmp, meta_path)
    return npy, _kept(index, keep, failed)


def _kept(index: ImageIndex, keep: list[int], failed: list[tuple[str, str]]) -> ImageIndex:
    sub = index.subset(keep)
    return ImageIndex(sub.root, sub.classes, sub.paths, sub.labels, sub.skipped + tuple(failed))
