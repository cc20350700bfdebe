"""Process set-up that must happen before JAX starts, and the process's start time.

:func:`setup_runtime` adds springfield's XLA flags (:mod:`springfield.kernels.tuning`) and
marks absl's flags parsed; the ``springfield`` command also re-executes itself once with
glibc's huge-page tunable (:func:`reexec_with_malloc_env`, in the tuning module too).
"""

from __future__ import annotations

import os
import time

from springfield.kernels.tuning import (
    add_xla_flags,
    cpu_has_bf16,
    malloc_env,
    reexec_with_malloc_env,
    use_compilation_cache,
)

__all__ = [
    "cpu_has_bf16",
    "malloc_env",
    "process_start",
    "reexec_with_malloc_env",
    "setup_runtime",
    "use_compilation_cache",
]


def process_start() -> float | None:
    """The ``time.perf_counter()`` reading at which this process started, from /proc on Linux
    (so the interpreter's start-up, the imports and the re-exec of
    :func:`reexec_with_malloc_env` count: exec keeps the start time); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            # The command name (field 2) may hold spaces: count fields after its ")".
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.perf_counter() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def setup_runtime(xla_flags: bool = True) -> None:
    """Add springfield's XLA flags (before JAX initialises; not with ``xla_flags=False``, as
    for a benchmark of plain JAX) and mark absl flags parsed.

    grain 0.2.18's worker processes read an absl flag and fail with
    ``UnparsedFlagAccessError`` unless the flags were marked parsed first.
    """
    if xla_flags:
        add_xla_flags()
    from absl import flags as absl_flags

    if not absl_flags.FLAGS.is_parsed():
        absl_flags.FLAGS.mark_as_parsed()
