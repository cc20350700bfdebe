"""orbax checkpoints of the train state, the grain iterator and a JSON record, atomically.

orbax writes each step into a temporary folder and renames it when complete, so a crash
during a save leaves the previous steps intact and the half-written one is never listed.
Nothing is pickled: arrays go to tensorstore/OCDBT, the rest is JSON.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from springfield.errors import SpringfieldError

_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")
# Errors that only a write can cause: the disk (or quota, or file size limit) is full, or
# the file system is read-only.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def open_manager(workdir: Path, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Checkpoint manager for ``<workdir>/checkpoints`` (absolute path, as orbax requires)."""
    directory = (Path(workdir) / "checkpoints").absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
    )
    try:
        manager = ocp.CheckpointManager(directory, options=options)
    except OSError as e:
        raise SpringfieldError(
            f"--workdir {workdir}: cannot create checkpoints there ({e}). Choose a writable folder."
        ) from None
    # The removal of unfinished saves (left by a kill) runs in a background thread; a process
    # that stops on an error soon after would kill it mid-way, with a traceback. It is quick.
    cleanup = getattr(manager, "_cleanup_tmp_directory_future", None)
    if cleanup is not None:
        cleanup.result()
    return manager


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: dict,
    data_iter: grain.DatasetIterator | None = None,
) -> None:
    """Start an async save of ``state``, ``meta`` and (when given) the data iterator."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
        # Also where orbax reports that the previous, asynchronous save failed.
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
        error = write_error(manager, e)
        if error is e:
            raise
        raise error from None


def wait(manager: ocp.CheckpointManager) -> None:
    """Wait for the save in flight to complete; a failed write becomes a
    :class:`SpringfieldError`."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        error = write_error(manager, e)
        if error is e:
            raise
        raise error from None


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for the save in flight to complete, then close ``manager``.

    Call it on every way out of training: a process that exits with a save in flight loses
    that checkpoint. A failed write becomes a :class:`SpringfieldError`.
    """
    try:
        wait(manager)
    finally:
        with contextlib.suppress(Exception):  # already reported above
            manager.close()


@contextlib.contextmanager
def disk_errors() -> Iterator[None]:
    """Turn a failed write of a run file (metrics, config, ...) for lack of space or a
    read-only disk into a :class:`SpringfieldError`; checkpoints are handled by :func:`save`
    and :func:`finish`."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        raise SpringfieldError(
            f"cannot write {e.filename or 'to the run folder'} ({e.strerror}); checkpoints "
            "saved so far are intact. Free disk space (or make the folder writable) and run the "
            "same command again to resume."
        ) from None


def complete_steps(manager: ocp.CheckpointManager) -> list[int]:
    """Steps with a complete checkpoint on disk (an unfinished save has a suffixed name)."""
    directory = Path(str(manager.directory))
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def write_error(manager: ocp.CheckpointManager, e: BaseException) -> BaseException:
    """A SpringfieldError for a checkpoint write that failed for lack of space or
    permission; any other error (a bug, not the disk) is returned unchanged."""
    code = _errno_of(e)
    if code is None:
        return e
    steps = complete_steps(manager)
    kept = (
        f"the complete checkpoints (steps {', '.join(map(str, steps))}) are intact"
        if steps
        else "no checkpoint was complete yet"
    )
    return SpringfieldError(
        f"cannot write a checkpoint to {manager.directory} ({os.strerror(code)}); {kept}. "
        "Free disk space (or make the folder writable) and run the same command again to "
        "resume."
    )


def _errno_of(e: BaseException) -> int | None:
    # tensorstore reports I/O errors as ValueError("... [os_error_code='28']"); Python ones
    # are OSError. Look through the chain of causes for either.
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = _OS_ERROR_CODE.search(str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The JSON record saved with ``step``."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    target: Any,
    data_iter: grain.DatasetIterator | None = None,
) -> Any:
    """Restore the state saved at ``step`` into the structure, shapes and shardings of
    ``target``; also restores ``data_iter`` in place when given."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]
