"""Data parallelism with jax.sharding, on one device, many devices or many processes.

One mesh axis, ``data``, spans every device of every process. Batches are sharded along it;
parameters and optimizer state are replicated. Each process feeds only its local share of
the global batch, and ``jax.make_array_from_process_local_data`` stitches the shares into
one global array, so the jitted steps are the same code for 1 device, N devices or N hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from springfield.errors import SpringfieldError


def set_cpu_devices(n: int | None) -> None:
    """Expose ``n`` virtual CPU devices (must run before JAX's backend starts)."""
    if n:
        jax.config.update("jax_num_cpu_devices", int(n))


def init_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """``jax.distributed.initialize``: explicit arguments, or auto-detection (SLURM, Open MPI,
    TPU pods) when they are left out."""
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
        )
    except (ValueError, RuntimeError) as e:
        raise SpringfieldError(
            f"--distributed: could not join the cluster ({e}). Outside SLURM/Open MPI/TPU "
            "pods pass --coordinator HOST:PORT --num-processes N --process-id I."
        ) from None


def make_mesh() -> Mesh:
    """A 1-D mesh named ``data`` over all devices of all processes."""
    return jax.make_mesh((jax.device_count(),), ("data",))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of ``global_batch``; errors clearly when it does not divide."""
    devices = mesh.devices.size
    if global_batch % devices:
        raise SpringfieldError(
            f"--batch-size {global_batch}: must be a multiple of the {devices} devices "
            f"(e.g. {max(devices, global_batch // devices * devices)})."
        )
    return global_batch // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place ``tree`` on every device (parameters, optimizer state)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Assemble this process's local batch into a global array sharded along ``data``."""
    sharding = NamedSharding(mesh, P("data"))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) global array on this host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
