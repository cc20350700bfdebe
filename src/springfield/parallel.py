"""Data parallelism with jax.sharding, on one device, many devices or many processes.

One mesh axis, ``data``, spans every device of every process. Batches are sharded along it;
parameters and optimizer state are replicated. Each process feeds only its local share of
the global batch, and ``jax.make_array_from_process_local_data`` stitches the shares into
one global array, so the jitted steps are the same code for 1 device, N devices or N hosts.

Several processes (``--distributed``) are JAX's own multi-controller runtime: every process
runs the same program, ``jax.distributed.initialize`` connects them, and collectives (gloo on
CPU, NCCL on GPU, ICI on TPU) keep them in step. This module adds the checks that turn the
usual multi-host mistakes (processes that see different data or different run folders, a
process that died) into one clear message instead of a hang or a silent divergence.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from springfield import runtime
from springfield.errors import SpringfieldError

# Words in the runtime errors raised when a collective or barrier loses a peer process.
_PEER_FAILURE_MARKERS = (
    "Gloo",
    "NCCL",
    "heartbeat",
    "Barrier",
    "barrier",
    "coordination service",
    "Connection reset",
    "Connection closed",
    "Socket closed",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
)
# After losing a peer, ``jax.distributed.shutdown`` (run at exit) waits for the dead process
# and then aborts with a C++ stack trace; processes skip it and exit with this status.
_LOST_PEER_EXIT_STATUS = 2


def setup(
    *,
    cpu_devices: int | None,
    distributed: bool,
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    workdir: Path | None,
    timeout: int = 300,
) -> None:
    """Configure devices and processes; must run before anything starts JAX's backend.

    ``timeout`` (seconds) bounds how long processes wait for each other to join and how
    long a silent process is waited for before the others stop.
    """
    explicit = {
        "--coordinator": coordinator,
        "--num-processes": num_processes,
        "--process-id": process_id,
    }
    given = [flag for flag, v in explicit.items() if v is not None]
    if given and not distributed:
        raise SpringfieldError(
            f"{', '.join(given)}: only used by multi-process runs; add --distributed."
        )
    if distributed and workdir is None:
        raise SpringfieldError(
            "--distributed needs --workdir: every process must write to the same run folder "
            "(on storage all hosts share), and the default runs/<timestamp> differs per process."
        )
    if timeout < 1:
        raise SpringfieldError(f"--distributed-timeout {timeout}: must be at least 1 second.")
    runtime.use_compilation_cache()
    set_cpu_devices(cpu_devices)
    if distributed:
        init_distributed(coordinator, num_processes, process_id, timeout=timeout)


def set_cpu_devices(n: int | None) -> None:
    """Expose ``n`` virtual CPU devices (must run before JAX's backend starts)."""
    if n is None:
        return
    if n < 1:
        raise SpringfieldError(f"--cpu-devices {n}: must be at least 1.")
    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError:
        # The backend already runs (e.g. train() called twice in one Python process).
        raise SpringfieldError(
            f"--cpu-devices {n}: JAX has already started in this process with "
            f"{jax.local_device_count()} device(s); the device count can only be chosen "
            "before JAX starts. Run springfield train in a fresh process."
        ) from None


def init_distributed(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    timeout: int = 300,
) -> None:
    """``jax.distributed.initialize``: explicit arguments, or auto-detection (SLURM, Open MPI,
    TPU pods) when they are left out."""
    if jax.distributed.is_initialized():
        return  # a second train() in the same processes reuses the connection
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=timeout,
            # The shutdown barrier at exit waits while process 0 still writes the report.
            shutdown_timeout_seconds=max(timeout, 900),
        )
    except (ValueError, RuntimeError, TypeError) as e:
        raise SpringfieldError(
            f"--distributed: could not join the cluster ({_first_line(e)}). Outside SLURM, "
            "Open MPI and TPU pods pass --coordinator HOST:PORT --num-processes N "
            "--process-id I (the same HOST:PORT, process 0's, on every process), and start "
            "all N processes within --distributed-timeout seconds."
        ) from None


def make_mesh() -> Mesh:
    """A 1-D mesh named ``data`` over all devices of all processes."""
    return jax.make_mesh((jax.device_count(),), ("data",))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of ``global_batch``; errors clearly when it does not divide."""
    devices = mesh.devices.size
    if global_batch < 1 or global_batch % devices:
        lower = global_batch // devices * devices
        options = [str(b) for b in (lower, lower + devices) if b > 0]
        raise SpringfieldError(
            f"--batch-size {global_batch}: the global batch is split evenly over the "
            f"{devices} device(s), so it must be a multiple of {devices} "
            f"(e.g. {' or '.join(options)})."
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


def take_rows(a: jax.Array, rows: jax.Array) -> jax.Array:
    """``a[rows]``, sharded as ``a`` is: with the batch sharded over a mesh a gather must be
    told its output's sharding (jax raises a ShardingTypeError otherwise)."""
    return a.at[rows].get(out_sharding=jax.typeof(a).sharding)


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) global array on this host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_same(value: str, what: str) -> None:
    """Refuse to go on unless every process computed the same ``value``.

    ``what`` completes the sentence "the processes disagree on ..." and names the fix.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))
    odd = [i for i, d in enumerate(every) if not np.array_equal(d, every[0])]
    if odd:
        raise SpringfieldError(
            f"the processes disagree on {what} (process 0 vs process(es) "
            f"{', '.join(map(str, odd))})."
        )


def check_shared_folder(path: Path, flag: str = "--workdir") -> None:
    """Refuse to go on unless every process sees the files process 0 writes in ``path``.

    Checkpoints are written collectively into one folder, so it must be one folder: shared
    storage on several hosts, and the same absolute path on every process.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    token = np.frombuffer(secrets.token_bytes(16), np.uint8)
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    probe = Path(path) / f".springfield-shared-{token.tobytes().hex()}"
    if jax.process_index() == 0:
        probe.write_bytes(token.tobytes())
    multihost_utils.sync_global_devices("springfield-shared-folder-written")
    seen = probe.is_file() and probe.read_bytes() == token.tobytes()
    every = np.asarray(multihost_utils.process_allgather(np.int32(seen)))
    multihost_utils.sync_global_devices("springfield-shared-folder-read")
    if jax.process_index() == 0:
        probe.unlink(missing_ok=True)
    blind = [i for i, ok in enumerate(every.reshape(-1)) if not ok]
    if blind:
        raise SpringfieldError(
            f"{flag} {path}: process(es) {', '.join(map(str, blind))} cannot see the files "
            "process 0 writes there. Put the run folder on storage every host shares and pass "
            "the same absolute path to every process."
        )


@contextlib.contextmanager
def stop_on_lost_peer() -> Iterator[None]:
    """Turn "a collective lost its peer" into a :class:`SpringfieldError` and a prompt exit.

    When one process dies, the others fail in their next collective (gloo reports the closed
    connection at once) or, if they were waiting elsewhere, when its heartbeat times out.
    Either way nothing more can be computed, and JAX's shutdown barrier at exit would wait
    for the dead process and then abort, so the process exits right after the message.
    """
    try:
        yield
    except SpringfieldError:
        raise
    except Exception as e:
        if jax.process_count() == 1 or not _is_peer_failure(e):
            raise
        atexit.register(_exit_now, _LOST_PEER_EXIT_STATUS)
        raise SpringfieldError(
            f"process {jax.process_index()} of {jax.process_count()} lost contact with the "
            f"others ({_first_line(e)}): another process stopped or was killed. Run the same "
            "command on every process again to resume from the last complete checkpoint."
        ) from None


def _is_peer_failure(e: BaseException) -> bool:
    return isinstance(e, (RuntimeError, ValueError)) and any(
        m in str(e) for m in _PEER_FAILURE_MARKERS
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _exit_now(status: int) -> None:
    # Registered after JAX's own atexit hooks, so it runs before them (atexit is LIFO).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
