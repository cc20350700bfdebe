"""Building, caching and loading the oneDNN kernels' library, and calling into it.

The C++ files next to this one (``*.cc`` and ``common.h``) are compiled on first use with
the system's ``g++`` against the oneDNN wheel (``onednn-cpu-gomp`` and
``onednn-devel-cpu-gomp``) and jaxlib's FFI headers, into ``kernels/`` of springfield's cache
folder (:func:`springfield.paths.cache_root`), one file per source/jaxlib/oneDNN version;
later processes load it in milliseconds. Where any of that is missing (another OS or CPU,
no compiler, a GPU backend, several devices) the kernels are not :func:`available` and
:func:`status` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any

import jax
import numpy as np

from springfield.kernels import tuning
from springfield.paths import cache_root

_HERE = Path(__file__).parent
# Compiled together into one library (adam.cc: the fused Adam update).
SOURCES = tuple(sorted(_HERE.glob("*.cc")))
HEADERS = tuple(sorted(_HERE.glob("*.h")))
_TARGETS = {
    "forward": "SpringfieldConvForward",
    "input_grad": "SpringfieldConvBackwardData",
    "weight_grad": "SpringfieldConvBackwardWeights",
    "block_forward": "SpringfieldConvBlockForward",
    "block_infer": "SpringfieldConvBlockInfer",
    "block_backward": "SpringfieldConvBlockBackward",
    "block_weight_grad": "SpringfieldConvBlockBackwardWeights",
    "bn_forward": "SpringfieldBnForward",
    "bn_backward": "SpringfieldBnBackward",
    "bn_infer": "SpringfieldBnInfer",
    "adam": "SpringfieldAdam",
    "matmul": "SpringfieldMatmul",
}
NAME = "springfield_onednn_conv_"


def _dist_file(dist: str, suffix: str) -> Path | None:
    try:
        files = distribution(dist).files or []
    except PackageNotFoundError:
        return None
    for f in files:
        if ("/" + str(f)).endswith(suffix):
            return Path(f.locate()).resolve()
    return None


def _libdnnl() -> Path | None:
    return _dist_file("onednn-cpu-gomp", "/libdnnl.so.3")


def _build(out: Path) -> None:
    lib = _libdnnl()
    header = _dist_file("onednn-devel-cpu-gomp", "/oneapi/dnnl/dnnl.hpp")
    if lib is None or header is None:
        raise RuntimeError(
            "oneDNN is not installed (pip packages onednn-cpu-gomp, onednn-devel-cpu-gomp)"
        )
    include = header.parents[2]
    ffi_include = Path(jax.ffi.include_dir())
    out.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    flags = ["-O3", "-fopenmp", "-std=c++17", "-fPIC", "-w"]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # One object per source, compiled side by side: each parses oneDNN's headers, so on
        # 2 cores this takes half the time of compiling them one after another.
        objects = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        compiles = [
            [cxx, *flags, f"-I{_HERE}", f"-I{ffi_include}", f"-I{include}", "-c", str(src),
             "-o", str(obj)]
            for src, obj in zip(SOURCES, objects, strict=True)
        ]  # fmt: skip
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for done in pool.map(_compile, compiles):
                if done.returncode != 0:
                    names = ", ".join(f.name for f in SOURCES)
                    raise RuntimeError(f"compiling {names} failed: {done.stderr.strip()[-400:]}")
        # Linked under a temporary name and renamed: concurrent builders never see half a file.
        tmp_path = Path(tmp) / "lib.so"
        link = [cxx, *flags, "-shared", *map(str, objects), str(lib),
                f"-Wl,-rpath,{lib.parent}", "-o", str(tmp_path)]  # fmt: skip
        done = _compile(link)
        if done.returncode != 0:
            raise RuntimeError(f"linking the oneDNN kernels failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp_path, out)


def _compile(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"could not run the C++ compiler ({cmd[0]}): {e}") from e


def _library_path() -> Path:
    key = hashlib.sha256(b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS)))
    for dist in ("jaxlib", "onednn-cpu-gomp"):
        try:
            key.update(f"{dist}={version(dist)}".encode())
        except PackageNotFoundError:
            key.update(dist.encode())
    # The library finds libdnnl by its absolute path (rpath): one build per environment.
    key.update(str(_libdnnl()).encode())
    return cache_root() / "kernels" / f"onednn_conv-{key.hexdigest()[:16]}.so"


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str]:
    """The library (built first if need be) with its FFI targets registered, and a few
    words on it; ``(None, why not)`` where it cannot be built or loaded here."""
    if os.uname().machine != "x86_64" or os.uname().sysname != "Linux":
        return None, "oneDNN kernels are built for Linux x86_64 only"
    path = _library_path()
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
    except (RuntimeError, OSError) as e:
        return None, str(e)
    for target, symbol in _TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(lib, symbol))
        jax.ffi.register_ffi_target(NAME + target, capsule, platform="cpu")
    lib.springfield_conv_impl.restype = ctypes.c_char_p
    lib.springfield_bn_workspace_bytes.restype = ctypes.c_int64
    lib.springfield_bn_workspace_bytes.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_float]
    lib.springfield_adam_isa.restype = ctypes.c_int
    return lib, f"oneDNN ({path.name})"


def one_cpu_device() -> bool:
    """Whether JAX runs on one CPU device: a custom call cannot be split across devices by
    XLA's partitioner, and the kernels are registered for the CPU only."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def status() -> str:
    """Whether the oneDNN kernels can run in this process, and why, in a few words:
    ``oneDNN (<library file>)`` or ``XLA (<reason>)``."""
    if not one_cpu_device():
        return f"XLA ({jax.device_count()} {jax.default_backend()} devices; oneDNN needs 1 CPU)"
    lib, why = load()
    return why if lib is not None else f"XLA ({why})"


def available() -> bool:
    """Whether oneDNN's kernels can run here (builds the library once)."""
    return status().startswith("oneDNN")


def bf16_supported() -> bool:
    """Whether oneDNN's bfloat16 products beat float32 ones here: only on a CPU with
    bfloat16 dot products (:func:`springfield.kernels.tuning.cpu_has_bf16`)."""
    return tuning.cpu_has_bf16()


def f32(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    """A float32 result (oneDNN accumulates in float32 whatever the inputs)."""
    return jax.ShapeDtypeStruct(shape, np.float32)


def ffi(target: str, out: Any, *args: jax.Array, **attrs: Any) -> Any:
    """Call kernel ``target`` with results ``out`` (one ShapeDtypeStruct, or a tuple)."""
    # vmap (ensembles) loops over the mapped axis: the kernels take fixed-rank arrays.
    return jax.ffi.ffi_call(NAME + target, out, vmap_method="sequential")(*args, **attrs)
