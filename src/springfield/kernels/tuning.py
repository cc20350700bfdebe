"""The process's tuning for speed: XLA flags, huge pages for malloc, the compilation cache,
and compiler options per program.

On CPU, XLA (jaxlib 0.10) hands each standalone convolution to YNNPACK, which ran the
training step on one core here. One experimental flag takes ``individual_convolution`` out of
the YNN fusion types, so convolutions run in XLA's own two-threaded (Eigen) convolution:
training is 1.4-1.9x faster on two cores (shared/notes/cpu-baseline.md, docs/performance.md).
YNN keeps its other default types (individual dots and reductions): dropping ``reduce`` as well
sped some shapes up and slowed others down by as much (docs/performance.md), so it stays.

Since springfield's convolutions run in oneDNN where they can (:mod:`springfield.kernels.onednn`),
the flag matters where they cannot (several devices, ``--kernels xla``).

An unknown XLA flag or value aborts the process at start-up, so the flag is set only for
jaxlib versions it was checked on (tests/test_runtime.py checks the installed one).

Memory: XLA:CPU allocates its large buffers with ``malloc``, which maps fresh pages for each
one, every step; touching them costs a page fault per 4 KiB, several milliseconds per step
for the activations of a small CNN. Where the kernel hands out transparent huge pages only
on request (``madvise``, the default of Debian and Ubuntu), glibc asks for them when the
tunable ``glibc.malloc.hugetlb=1`` is set, which must happen before the process starts: the
``springfield`` command re-executes itself once with it (:func:`malloc_env`), which trained
the reference CNN 1.2x faster (docs/performance.md).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib versions on which CPU_CONV_FLAG was checked to be accepted and faster.
CHECKED_JAXLIB = ("0.10.",)


# XLA compiler options for programs that run once or rarely and cost little (initialising a
# model, a finiteness check): their compile time is all that matters.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _cpu_flags() -> str:
    """/proc/cpuinfo's text ('' where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX). Without
    them oneDNN and XLA convert bfloat16 to float32 and back around every product, so
    bfloat16 is slower than float32, for springfield and for every framework alike."""
    return "avx512_bf16" in _cpu_flags() or "amx_bf16" in _cpu_flags()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 (Intel Sapphire Rapids and later)."""
    return "amx_bf16" in _cpu_flags()


def xla_flags_wanted() -> list[str]:
    """The XLA flags springfield adds for the installed jaxlib (empty where unchecked)."""
    try:
        jaxlib_version = version("jaxlib")
    except PackageNotFoundError:
        return []
    return [CPU_CONV_FLAG] if jaxlib_version.startswith(CHECKED_JAXLIB) else []


# Evaluation batches up to this size compile without YNN's reduce fusion (see below).
SMALL_EVAL_BATCH = 64


def eval_compile_options(batch_size: int) -> dict[str, str]:
    """Per-compilation XLA options for an evaluation step over ``batch_size`` images.

    With YNN's ``reduce`` fusion type XLA runs the forward pass as YNNPACK graphs: at 32-64
    images per batch 1.1-2x slower than XLA's own kernels (refcnn, resnet; seed level); at
    128 faster for refcnn (1.4x) but slower for resnet and seed (docs/performance.md). Small
    batches therefore compile with YNN kept to individual dots; larger ones keep the process
    default. Empty where springfield's flags are unchecked.
    """
    if batch_size > SMALL_EVAL_BATCH or not xla_flags_wanted():
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def malloc_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables to add so that glibc's malloc backs large buffers with
    transparent huge pages; empty where that is already set, not glibc on Linux, or
    pointless (the kernel gives huge pages always, or never)."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return {}
    if not _is_glibc():
        return {}
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return {}
    try:
        if "[madvise]" not in THP_SETTING.read_text():
            return {}
    except OSError:
        return {}
    return {"GLIBC_TUNABLES": ":".join(t for t in (current, HUGEPAGE_TUNABLE) if t)}


def _is_glibc() -> bool:
    # confstr answers from libc itself; platform.libc_ver() would read the interpreter binary.
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):
        return False


def reexec_with_malloc_env() -> None:
    """Replace this process by the same command with :func:`malloc_env` set (once); returns
    only if there is nothing to set or the re-execution failed."""
    extra = malloc_env()
    if not extra or os.environ.get("_SPRINGFIELD_REEXEC"):
        return
    env = {**os.environ, **extra, "_SPRINGFIELD_REEXEC": "1"}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return


# Only compilations at least this long are written: the train and eval steps, the model's
# initialisation; not the hundreds of tiny eager operations, which compile in milliseconds.
# (At 0.2 s a fast machine compiled a small model's eval step under the bar, uncached.)
XLA_CACHE_MIN_SECONDS = 0.05
XLA_CACHE_MAX_BYTES = 2 << 30
_xla_cache_dir: str | None = None  # the directory this module configured, if any


def use_compilation_cache() -> None:
    """Keep compiled XLA programs in ``<springfield cache>/xla`` (JAX's persistent cache),
    so that a second run of the same model, shapes and settings skips the compilation
    that takes most of a run's start-up (docs/performance.md).

    JAX keys each program by its HLO, the compiler options and flags, and the jax/jaxlib
    versions and devices, so a changed model or upgrade compiles afresh; the oldest entries
    go beyond 2 GiB. A cache directory the user configured for JAX is left as it is.
    """
    import jax

    from springfield.paths import cache_root

    global _xla_cache_dir
    configured = jax.config.jax_compilation_cache_dir
    if configured and configured != _xla_cache_dir:  # the user's own
        return
    wanted = str(cache_root() / "xla")
    if configured == wanted:
        return
    if configured:  # $SPRINGFIELD_CACHE changed since (benchmarks/accuracy.py --cold)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    _xla_cache_dir = wanted
    jax.config.update("jax_compilation_cache_dir", wanted)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", XLA_CACHE_MIN_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_MAX_BYTES)


def add_xla_flags() -> None:
    """Add springfield's XLA flags to ``$XLA_FLAGS`` (read by XLA when JAX's backend starts;
    nothing once it has started)."""
    if "jax" not in sys.modules or not _backend_started():
        flags = os.environ.get("XLA_FLAGS", "")
        extra = [f for f in xla_flags_wanted() if f.split("=")[0] not in flags]
        if extra:
            os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except Exception:  # noqa: BLE001 - private API; assume started if it moved
        return True
