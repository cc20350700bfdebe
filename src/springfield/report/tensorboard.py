"""TensorBoard helpers: read back scalars from tfevents files, and log the report figures.

Reading uses only the TFRecord framing and tensorboardX's own protobuf classes, so neither
TensorFlow nor the tensorboard package is needed (tests and the report run without them).

A TFRecord is ``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``
(all little-endian); ``data`` is a serialized ``Event``.
"""

from __future__ import annotations

import struct
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event

from springfield.errors import SpringfieldError

__all__ = ["FIGURE_TAGS", "iter_events", "log_figures", "read_scalars"]

# PNG file in the run folder -> TensorBoard image tag.
FIGURE_TAGS: dict[str, str] = {
    "curves.png": "figures/curves",
    "confusion.png": "figures/confusion",
    "mistakes.png": "figures/mistakes",
    "samples.png": "figures/samples",
}

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _event_files(logdir: Path) -> list[Path]:
    # tensorboardX names files events.out.tfevents.<unix time>.<host>..., so sorting by name
    # puts a resumed run's files in the order they were written.
    return sorted(p for p in logdir.rglob("*") if "tfevents" in p.name and p.is_file())


def _records(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(offset, data, stored masked crc of data)`` for each record in a tfevents file.

    A record cut short at the end of the file (the writer is still running, or was killed
    mid-write) ends the iteration quietly. A bad length checksum means the framing itself is
    broken: everything after it is unreadable, so that raises.
    """
    data = Path(path).read_bytes()
    pos = 0
    end = len(data)
    while pos + _HEADER.size <= end:
        length, length_crc = _HEADER.unpack_from(data, pos)
        if _masked_crc(data[pos : pos + 8]) != length_crc:
            raise SpringfieldError(
                f"{path} is corrupt at byte {pos} (bad record length checksum); "
                "delete or move the file out of the log folder"
            )
        start = pos + _HEADER.size
        stop = start + length
        if stop + _FOOTER.size > end:
            return
        (data_crc,) = _FOOTER.unpack_from(data, stop)
        yield pos, data[start:stop], data_crc
        pos = stop + _FOOTER.size


def _parse(path: Path, pos: int, payload: bytes) -> Event:
    event = Event()
    try:
        event.ParseFromString(payload)
    except Exception as exc:  # protobuf's DecodeError type differs between implementations
        raise SpringfieldError(
            f"{path} is corrupt at byte {pos} ({exc}); delete or move the file out of the "
            "log folder"
        ) from exc
    return event


def _check_crc(path: Path, pos: int, payload: bytes, stored: int) -> None:
    if _masked_crc(payload) != stored:
        raise SpringfieldError(
            f"{path} is corrupt at byte {pos} (bad record checksum); delete or move the file "
            "out of the log folder"
        )


def iter_events(path: Path) -> Iterator[Event]:
    """Yield every ``Event`` in one tfevents file, checksums verified.

    A truncated last record is ignored (see ``_records``).

    Raises:
        SpringfieldError: the file is corrupt.
    """
    for pos, payload, stored in _records(path):
        _check_crc(path, pos, payload, stored)
        yield _parse(path, pos, payload)


def _scalar_value(value: Any) -> float | None:
    """Return the scalar in a ``Summary.Value``, or None if it holds something else."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        # add_scalar(new_style=True) and the tensorboard plugin format store a 0-d tensor.
        tensor = value.tensor
        if tensor.tensor_shape.dim:
            return None
        for field in ("float_val", "double_val", "int_val", "int64_val"):
            vals = getattr(tensor, field)
            if len(vals) == 1:
                return float(vals[0])
    return None


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read the scalar summaries that tensorboardX wrote under ``logdir``.

    Args:
        logdir: the folder passed to ``SummaryWriter``. It is searched recursively; tags
            from files in a sub-folder come back as ``"<sub-folder>/<tag>"``.

    Returns:
        ``{tag: [(step, value), ...]}`` with each list sorted by step (stable, so a step logged
        twice, e.g. after a resume, keeps the order it was written in). Empty when ``logdir``
        holds no event files yet.

    Raises:
        SpringfieldError: ``logdir`` does not exist, or a record holding scalars fails its
            checksum.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise SpringfieldError(
            f"TensorBoard log folder {logdir} does not exist; pass the run's log folder "
            "(the one given to SummaryWriter)"
        )
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in _event_files(logdir):
        # Files in sub-folders belong to other "runs" (add_scalars writes logdir/<tag>/<key>/
        # with the same tag in each); prefixing the folder keeps those series apart.
        sub = path.parent.relative_to(logdir).as_posix()
        prefix = "" if sub == "." else f"{sub}/"
        for pos, payload, stored in _records(path):
            event = _parse(path, pos, payload)
            if not event.HasField("summary"):
                continue
            found = [
                (value.tag, scalar)
                for value in event.summary.value
                if (scalar := _scalar_value(value)) is not None
            ]
            if not found:
                continue
            # Checksummed only now: images make up most of the bytes in these files and the
            # pure-Python CRC costs ~0.1 s per MB, so only records we return are verified.
            _check_crc(path, pos, payload, stored)
            for tag, scalar in found:
                scalars[prefix + tag].append((int(event.step), scalar))
    return {tag: sorted(points, key=lambda p: p[0]) for tag, points in scalars.items()}


def log_figures(writer: Any, run_dir: Path, step: int) -> None:
    """Add the report PNGs in ``run_dir`` to TensorBoard as images at ``step``.

    Looks for ``curves.png``, ``confusion.png``, ``mistakes.png`` and ``samples.png`` and logs
    each one that exists under the tag in ``FIGURE_TAGS``. A figure that cannot be decoded is
    skipped with a warning: losing a picture must not stop training.

    Args:
        writer: a ``tensorboardX.SummaryWriter``.
        run_dir: the run folder holding the PNGs.
        step: the global step to log them at.
    """
    run_dir = Path(run_dir)
    for name, tag in FIGURE_TAGS.items():
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            with Image.open(path) as img:
                # TensorBoard shows RGB; matplotlib writes RGBA with an opaque background.
                array = np.asarray(img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            warnings.warn(f"not logging {path} to TensorBoard: {exc}", stacklevel=2)
            continue
        writer.add_image(tag, array, global_step=step, dataformats="HWC")
