"""orbax checkpoints of the train state, the grain iterator and a JSON record, atomically.

orbax writes each step into a temporary folder and renames it when complete, so a crash
during a save leaves the previous steps intact and the half-written one is never listed.
Nothing is pickled: arrays go to tensorstore/OCDBT, the rest is JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from springfield.errors import SpringfieldError


def open_manager(workdir: Path, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Checkpoint manager for ``<workdir>/checkpoints`` (absolute path, as orbax requires)."""
    directory = (Path(workdir) / "checkpoints").absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
    )
    try:
        return ocp.CheckpointManager(directory, options=options)
    except OSError as e:
        raise SpringfieldError(
            f"--workdir {workdir}: cannot create checkpoints there ({e}). Choose a writable folder."
        ) from None


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
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    except OSError as e:
        raise SpringfieldError(
            f"cannot write checkpoint {step} to {manager.directory} ({e}); "
            "the previous checkpoints are intact. Free disk space and "
            "run the same command again to resume."
        ) from None


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
