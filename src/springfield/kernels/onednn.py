"""2-D convolutions on the CPU through oneDNN, called from jitted JAX code via XLA's FFI.

XLA:CPU (jaxlib 0.10) runs convolutions in its own Eigen kernels at 60-80% of GEMM speed on
the 2-core machines springfield is measured on, and on one core when YNNPACK takes them; the
oneDNN inside jaxlib is not reachable for convolutions. oneDNN's JIT kernels (the ones
TensorFlow and PyTorch use) run the same convolutions at 90-100% of GEMM speed
(docs/performance.md). :func:`make_conv` makes a drop-in for
:func:`jax.lax.conv_general_dilated` that runs float32 NHWC/HWIO 2-D convolutions as three
FFI calls (forward, input gradient, weight gradient) into ``onednn_conv.cc``, with the same
maths (or with bfloat16 products, on request), and falls back to another convolution for
anything else.

:func:`conv_relu_pool` runs a whole ``avg_pool(relu(conv(x) + b))`` block (``refcnn``,
``seed``) as one call each way, so that XLA makes no passes of its own over the convolution's
full-size output.

:func:`adam_update` runs a whole Adam/AdamW step of every parameter in one pass
(``adam.cc``, used by :mod:`springfield.training.fused_adam`).

:func:`make_dense_dot` runs a dense layer's products in bfloat16 (``onednn_conv.cc``,
used by :func:`springfield.models.layers.Dense` under ``--precision bfloat16``).

The C++ files are compiled on first use with the system's ``g++`` against the oneDNN wheel
(``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``) and jaxlib's FFI headers, into
``kernels/`` of springfield's cache folder (:func:`springfield.paths.cache_root`), one file per
source/jaxlib/oneDNN version; later processes load it in milliseconds. Where any of that is
missing (another OS or CPU, no compiler, a GPU backend, several devices) springfield uses
XLA's convolution and says why in :func:`status`. ``SPRINGFIELD_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import inspect
import os
import subprocess
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from springfield import runtime
from springfield.paths import cache_root

SOURCE = Path(__file__).with_name("onednn_conv.cc")
# Compiled into the same library: the fused Adam update (springfield.training.fused_adam).
SOURCES = (SOURCE, Path(__file__).with_name("adam.cc"))
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
_NAME = "springfield_onednn_conv_"
_NHWC = ("NHWC", "HWIO", "NHWC")
_LAX_CONV = inspect.signature(lax.conv_general_dilated)
# Arguments of lax.conv_general_dilated this path reads; any other must be left at None.
_OURS = {
    "lhs", "rhs", "window_strides", "padding", "lhs_dilation", "rhs_dilation",
    "dimension_numbers", "feature_group_count", "batch_group_count", "precision",
}  # fmt: skip
# Fewer input channels than this keep float32 products under --precision bfloat16.
MIN_BF16_CHANNELS = 8
# Dense layers of fewer weights than this keep XLA's float32 dot under --precision bfloat16:
# a classifier's head (256 x 4) takes microseconds either way.
MIN_BF16_DENSE_WEIGHTS = 65536


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
    # Compile to a temporary name and rename: concurrent builders never see half a file.
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    cmd = [
        os.environ.get("CXX", "g++"), "-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
        "-w",
        f"-I{ffi_include}", f"-I{include}", *map(str, SOURCES), str(lib),
        f"-Wl,-rpath,{lib.parent}", "-o", str(tmp_path),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        tmp_path.unlink(missing_ok=True)
        raise RuntimeError(f"could not run the C++ compiler ({cmd[0]}): {e}") from e
    if done.returncode != 0:
        tmp_path.unlink(missing_ok=True)
        names = " and ".join(f.name for f in SOURCES)
        raise RuntimeError(f"compiling {names} failed: {done.stderr.strip()[-400:]}")
    os.replace(tmp_path, out)


def _library_path() -> Path:
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES))
    for dist in ("jaxlib", "onednn-cpu-gomp"):
        try:
            key.update(f"{dist}={version(dist)}".encode())
        except PackageNotFoundError:
            key.update(dist.encode())
    # The library finds libdnnl by its absolute path (rpath): one build per environment.
    key.update(str(_libdnnl()).encode())
    return cache_root() / "kernels" / f"onednn_conv-{key.hexdigest()[:16]}.so"


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
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
        jax.ffi.register_ffi_target(_NAME + target, capsule, platform="cpu")
    lib.springfield_conv_impl.restype = ctypes.c_char_p
    lib.springfield_bn_workspace_bytes.restype = ctypes.c_int64
    lib.springfield_bn_workspace_bytes.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_float]
    lib.springfield_adam_isa.restype = ctypes.c_int
    return lib, f"oneDNN ({path.name})"


def status() -> str:
    """What runs springfield's convolutions in this process, and why, in a few words."""
    if os.environ.get("SPRINGFIELD_ONEDNN", "1") == "0":
        return "XLA (SPRINGFIELD_ONEDNN=0)"
    # A custom call cannot be split across devices by XLA's partitioner, and is registered
    # for the CPU only: anything but one CPU device keeps XLA's convolution.
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return f"XLA ({jax.device_count()} {jax.default_backend()} devices; oneDNN needs 1 CPU)"
    lib, why = _load()
    return why if lib is not None else f"XLA ({why})"


def short_status() -> str:
    """:func:`status` without the library's file name: ``oneDNN`` or ``XLA (reason)``."""
    text = status()
    return "oneDNN" if text.startswith("oneDNN") else text


def available() -> bool:
    """Whether convolutions built now can run through oneDNN (builds the kernels once)."""
    return status().startswith("oneDNN")


def _attrs(strides: tuple[int, int], pads: tuple) -> dict[str, np.int64]:
    # geom = (strides, pads, bfloat16[, input_grad]): only the first two are attributes.
    (pt, pb), (pl, pr) = pads
    return {
        "stride_h": np.int64(strides[0]),
        "stride_w": np.int64(strides[1]),
        "pad_top": np.int64(pt),
        "pad_bottom": np.int64(pb),
        "pad_left": np.int64(pl),
        "pad_right": np.int64(pr),
    }


def _f32(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    # Results are float32 (oneDNN accumulates in float32 whatever the inputs).
    return jax.ShapeDtypeStruct(shape, np.float32)


def _ffi(target: str, out: Any, *args: jax.Array, **attrs: Any) -> Any:
    """Call kernel ``target`` with results ``out`` (one ShapeDtypeStruct, or a tuple)."""
    # vmap (ensembles) loops over the mapped axis: the kernels take fixed-rank arrays.
    return jax.ffi.ffi_call(_NAME + target, out, vmap_method="sequential")(*args, **attrs)


def _call(target: str, out: Any, *args: jax.Array, geom: tuple) -> Any:
    """A convolution kernel: :func:`_ffi` with ``geom``'s strides and padding."""
    return _ffi(target, out, *args, **_attrs(*geom[:2]))


def _out_shape(x: jax.Array, w: jax.Array, geom: tuple) -> tuple[int, int, int, int]:
    (sh, sw), ((pt, pb), (pl, pr)) = geom[:2]
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    return n, (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1, o


def _inputs(geom: tuple, *arrays: jax.Array) -> list[jax.Array]:
    # geom[2]: compute in bfloat16, else float32 (a bfloat16 activation reaching a float32-
    # product call is widened). The casts are elementwise, so XLA fuses them into whatever
    # produced the array; the residuals kept for the backward pass halve too.
    return [a.astype(jnp.bfloat16 if geom[2] else np.float32) for a in arrays]


def _conv_fwd(x: jax.Array, w: jax.Array, geom: tuple) -> tuple[jax.Array, tuple]:
    x_in, w_in = _inputs(geom, x, w)
    out = jax.ShapeDtypeStruct(_out_shape(x, w, geom), _activation_type(geom))
    # The empty array carries the primal input's type to the backward pass.
    return _call("forward", out, x_in, w_in, geom=geom), (x_in, w_in, jnp.zeros(0, x.dtype))


def _activation_type(geom: tuple) -> Any:
    # geom[3]: the output and the input's gradient in bfloat16 (bfloat16 activations).
    return jnp.bfloat16 if geom[3] else np.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, w: jax.Array, geom: tuple) -> jax.Array:
    return _conv_fwd(x, w, geom)[0]


def _conv_bwd(geom: tuple, res: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_in, w_in, x_type = res
    dy_in = dy.astype(x_in.dtype)  # the type the products are in
    out = jax.ShapeDtypeStruct(x_in.shape, _activation_type(geom))
    dx = _call("input_grad", out, dy_in, w_in, geom=geom).astype(x_type.dtype)
    dw = _call("weight_grad", _f32(w_in.shape), x_in, dy_in, geom=geom)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _pooled_shape(x: jax.Array, w: jax.Array, geom: tuple) -> tuple[int, int, int, int]:
    n, oh, ow, o = _out_shape(x, w, geom)
    return n, oh // 2, ow // 2, o


# A block's geom = (strides, pads, bfloat16 products, input_grad, bfloat16 activations).
def _pooled(x: jax.Array, w: jax.Array, geom: tuple) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(_pooled_shape(x, w, geom), jnp.bfloat16 if geom[4] else np.float32)


def _block_fwd(x: jax.Array, w: jax.Array, b: jax.Array, geom: tuple) -> tuple[jax.Array, tuple]:
    x_in, w_in = _inputs(geom, x, w)
    n, oh, ow, o = _out_shape(x, w, geom)
    # ReLU's mask: one bit per element of the convolution's output.
    out = (_pooled(x, w, geom), jax.ShapeDtypeStruct((n, oh, ow, o // 8), np.uint8))
    y, mask = _call("block_forward", out, x_in, w_in, b, geom=geom)
    return y, (x_in, w_in, mask, jnp.zeros(0, x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _block(x: jax.Array, w: jax.Array, b: jax.Array, geom: tuple) -> jax.Array:
    # Not differentiated (evaluation): no mask to keep.
    x_in, w_in = _inputs(geom, x, w)
    return _call("block_infer", _pooled(x, w, geom), x_in, w_in, b, geom=geom)


def _block_bwd(geom: tuple, res: tuple, dy: jax.Array) -> tuple[jax.Array, ...]:
    # dy comes in the output's type (float32 or bfloat16); the kernels read either.
    x_in, w_in, mask, x_type = res
    if not geom[3]:
        # No input gradient (see conv_relu_pool): the weights' one pass, chunked in cache.
        out = (_f32(w_in.shape), _f32(w_in.shape[-1:]))
        dw, db = _call("block_weight_grad", out, x_in, dy, mask, geom=geom)
        return jnp.zeros(x_in.shape, x_type.dtype), dw, db
    dz = jax.ShapeDtypeStruct(_out_shape(x_in, w_in, geom), x_in.dtype)
    out = (dz, _f32(w_in.shape), _f32(w_in.shape[-1:]))
    dz, dw, db = _call("block_backward", out, x_in, dy, mask, geom=geom)
    # A separate call, so that XLA drops it wherever the input's gradient goes unused.
    # (Bfloat16 activations imply bfloat16 products: conv_relu_pool.)
    dx_type = jnp.bfloat16 if geom[4] else np.float32
    dx = _call("input_grad", jax.ShapeDtypeStruct(x_in.shape, dx_type), dz, w_in, geom=geom)
    return dx.astype(x_type.dtype), dw, db


_block.defvjp(_block_fwd, _block_bwd)


def conv_relu_pool(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    padding: str | Any = "SAME",
    bfloat16: bool = False,
    input_grad: bool = True,
    activations: bool = False,
) -> jax.Array | None:
    """``avg_pool(relu(conv(x, w) + b), 2x2, stride 2)`` in two oneDNN calls (forward and
    backward, plus the input gradient's convolution), or ``None`` where that cannot run here:
    oneDNN not :func:`available`, not float32 NHWC/HWIO, output channels not a multiple of
    8, or an output smaller than 2x2.
    Stride 1; ``padding`` as :func:`jax.lax.conv_general_dilated` takes it; ``bfloat16`` as
    in :func:`make_conv`. Same maths as the unfused layers, up to summation order.
    ``input_grad=False`` treats ``x`` as a constant (its gradient is zero, as under
    :func:`jax.lax.stop_gradient`), for a network's first block, whose input is the image:
    the backward pass then never writes the convolution output's gradient to memory.
    ``activations`` (with ``bfloat16``): the block writes its output, and reads its output's
    gradient and writes its input's, in bfloat16, and ``x`` may be bfloat16 (bfloat16
    activations between layers, as :func:`make_conv`'s convolutions hand on)."""
    if not available() or x.ndim != 4 or w.ndim != 4 or b.ndim != 1:
        return None
    activations = activations and bfloat16 and bf16_supported()
    x_ok = x.dtype == np.float32 or (x.dtype == jnp.bfloat16 and activations)
    if not (x_ok and w.dtype == b.dtype == np.float32) or w.shape[2] != x.shape[3]:
        return None
    if w.shape[3] % 8:  # ReLU's mask packs 8 output channels to a byte
        return None
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            return None
        padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (1, 1), padding)
    if not (isinstance(padding, tuple | list) and all(len(p) == 2 for p in padding)):
        return None
    # With bfloat16 activations the image's block multiplies in bfloat16 too: its weight
    # gradient then runs on chunks of twice the images (half the bytes), 8-15% of the whole
    # training step at 64-128 px (refcnn, same process, interleaved).
    few = w.shape[2] < MIN_BF16_CHANNELS and not activations
    bf16 = bfloat16 and bf16_supported() and not few
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    geom = ((1, 1), pads, bf16, input_grad, activations)
    _, oh, ow, _ = _out_shape(x, w, geom)
    if oh < 2 or ow < 2:
        return None
    return _block(x, w, b, geom)


def _bn_call(target: str, out: Any, *args: jax.Array, cfg: tuple) -> Any:
    eps, relu = cfg[:2]
    return _ffi(target, out, *args, relu=np.int64(relu), epsilon=np.float32(eps))


def _bn_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, cfg: tuple) -> tuple:
    channels = _f32(scale.shape)
    # cfg[2]: the bytes of the ReLU mask oneDNN keeps for the backward pass.
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels,
           jax.ShapeDtypeStruct((cfg[2],), np.uint8))  # fmt: skip
    y, mean, var, mask = _bn_call("bn_forward", out, x, scale, bias, cfg=cfg)
    return (y, mean, var), (x, mean, var, scale, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn(x: jax.Array, scale: jax.Array, bias: jax.Array, cfg: tuple) -> tuple:
    return _bn_fwd(x, scale, bias, cfg)[0]


def _bn_bwd(cfg: tuple, res: tuple, cotangents: tuple) -> tuple[jax.Array, ...]:
    # The batch statistics are outputs for the running averages only: their cotangents
    # are zero wherever batch_norm is used (it stops their gradients).
    x, mean, var, scale, mask = res
    dy = cotangents[0]
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), _f32(scale.shape), _f32(scale.shape))
    return tuple(_bn_call("bn_backward", out, x, dy, mean, var, scale, mask, cfg=cfg))


_bn.defvjp(_bn_fwd, _bn_bwd)


def _bn_runs(x: jax.Array, *channels: jax.Array, types: tuple = (np.float32,)) -> bool:
    # oneDNN available, a non-empty NHWC array of one of `types`, float32 per-channel arrays.
    c = x.shape[-1] if x.ndim else None
    return (
        available()
        and x.ndim == 4
        and x.dtype in types
        and 0 not in x.shape
        and all(a.shape == (c,) and a.dtype == np.float32 for a in channels)
    )


def batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, relu: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """Training-mode BatchNorm over all axes but the last, then ReLU if ``relu``, as one
    oneDNN call each way: ``(y, batch mean, batch variance)``, the variance biased (divided
    by the count, as flax's), the statistics without gradients. ``None`` where that cannot
    run here: oneDNN not :func:`available`, or not a float32 or bfloat16 NHWC array (``y``
    has its type; the statistics, ``scale`` and ``bias`` are float32). Same maths as
    ``nnx.BatchNorm`` (+ ReLU) up to summation order (and, for bfloat16, the rounding of
    ``y``), in fewer passes than XLA makes (docs/performance.md)."""
    if not _bn_runs(x, scale, bias, types=(np.float32, jnp.bfloat16)):
        return None
    mask_bytes = 0
    if relu:
        n, h, w, c = x.shape
        bf16 = int(x.dtype == jnp.bfloat16)
        mask_bytes = _load()[0].springfield_bn_workspace_bytes(n, h, w, c, bf16, 1, epsilon)
        if mask_bytes < 0:  # oneDNN has no such BatchNorm here
            return None
    y, mean, var = _bn(x, scale, bias, (float(epsilon), bool(relu), mask_bytes))
    return y, lax.stop_gradient(mean), lax.stop_gradient(var)


def batch_norm_infer(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    epsilon: float,
    relu: bool = False,
) -> jax.Array | None:
    """Inference-mode BatchNorm from the running ``mean`` and ``var`` (then ReLU if
    ``relu``) in one oneDNN call, for bfloat16 ``x`` (the result is bfloat16); ``None``
    where that cannot run here or ``x`` is not bfloat16 NHWC. Not differentiable."""
    if not _bn_runs(x, scale, bias, mean, var, types=(jnp.bfloat16,)):
        return None
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return _bn_call("bn_infer", out, x, scale, bias, mean, var, cfg=(epsilon, relu))


def _pads(padding: Any) -> tuple:
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _dims_are_nhwc(dimension_numbers: Any, ndim: int) -> bool:
    if ndim != 4 or dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        want = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
        return dimension_numbers == want
    return tuple(dimension_numbers) == _NHWC


def _trivial(v: Any) -> bool:
    return v is None or all(d == 1 for d in v)


_ADAM_DECAY = {"none": 0, "l2": 1, "decoupled": 2}


def adam_available() -> bool:
    """Whether the fused Adam kernel (``adam.cc``) can run here: one CPU device (a custom call
    cannot be split across devices), the library loads, and the CPU has AVX2 and FMA (XLA
    contracts optax's expressions into fused multiply-adds there, which the kernel
    reproduces). Independent of ``SPRINGFIELD_ONEDNN``, which picks the convolutions."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    lib, _ = _load()
    return lib is not None and lib.springfield_adam_isa() > 0


def adam_update(
    hyper: jax.Array,
    leaves: list[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    decay: str,
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """One Adam step for every ``(gradient, m, v, parameter)`` of ``leaves`` (float32) in one
    call: the new ``(m, v, parameter)`` of each, written over the old ones' buffers.
    ``hyper`` is ``[-learning rate, 1 - b1^t, 1 - b2^t]`` (float32); ``decay`` says where
    ``weight_decay`` enters: ``none``, ``l2`` (added to the gradient) or ``decoupled``
    (AdamW)."""
    args = [x for leaf in leaves for x in leaf]
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype) for leaf in leaves for x in leaf[1:]]
    # Argument 0 is hyper; then (g, m, v, p) per leaf: m, v, p become results 3k .. 3k + 2.
    aliases = {1 + 4 * k + j: 3 * k + j - 1 for k in range(len(leaves)) for j in (1, 2, 3)}
    results = jax.ffi.ffi_call(_NAME + "adam", out, input_output_aliases=aliases)(
        hyper,
        *args,
        b1=np.float32(b1),
        ob1=np.float32(1 - b1),
        b2=np.float32(b2),
        ob2=np.float32(1 - b2),
        eps=np.float32(eps),
        wd=np.float32(weight_decay),
        decay=np.int64(_ADAM_DECAY[decay]),
    )
    return [tuple(results[3 * k : 3 * k + 3]) for k in range(len(leaves))]


def _matmul(
    a: jax.Array,
    b: jax.Array,
    out_type: Any,
    trans_a: bool = False,
    trans_b: bool = False,
    bf16: bool = False,
) -> jax.Array:
    """``op(a) @ op(b)`` in oneDNN (``onednn_conv.cc``), ``op`` transposing where asked;
    with ``bf16`` in bfloat16 products (float32 operands rounded in the kernel)."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    out = jax.ShapeDtypeStruct((m, n), out_type)
    flags = {"trans_a": np.int64(trans_a), "trans_b": np.int64(trans_b), "bf16": np.int64(bf16)}
    return _ffi("matmul", out, a, b, **flags)


def _dense_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    return _matmul(x, w, np.float32, bf16=True), (x, w)


@jax.custom_vjp
def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dense_fwd(x, w)[0]


def _dense_bwd(res: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    # The input's gradient in the input's own type (a bfloat16 activation's in bfloat16).
    dx = _matmul(dy, w, x.dtype, trans_b=True, bf16=True)
    dw = _matmul(x, dy, np.float32, trans_a=True, bf16=True)
    return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


def make_dense_dot(fallback: Callable[..., jax.Array] = lax.dot_general) -> Callable[..., Any]:
    """A :func:`jax.lax.dot_general` drop-in (the signature ``nnx.Linear`` calls) that
    multiplies a dense layer's input and weights in bfloat16 with float32 accumulation in
    oneDNN, forward and both gradients, as PyTorch's autocast and Keras' ``mixed_bfloat16``
    do; the result and the weight gradient are float32, the input's gradient has the input's
    type (bfloat16 activations stay bfloat16). XLA:CPU's float32 dot of ``refcnn``'s
    8192 x 256 layer runs at a fraction of this CPU's bfloat16 rate, and its bfloat16 dot
    is slower still. Layers of fewer than ``MIN_BF16_DENSE_WEIGHTS`` weights, and anything
    but ``x[M, K] @ w[K, N]`` with float32 weights, go to ``fallback`` (in float32). Where
    oneDNN cannot run or the CPU lacks bfloat16 instructions, ``fallback`` itself."""
    if not (available() and bf16_supported()):
        return fallback

    def dot_general(
        lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, **kwargs: Any
    ) -> jax.Array:
        (lc, rc), (lb, rb) = dimension_numbers
        ours = (
            lhs.ndim == rhs.ndim == 2
            and tuple(lc) == (1,)
            and tuple(rc) == (0,)
            and not tuple(lb)
            and not tuple(rb)
            and rhs.dtype == np.float32
            and lhs.dtype in (np.float32, jnp.bfloat16)
            and rhs.size >= MIN_BF16_DENSE_WEIGHTS
            and kwargs.get("preferred_element_type") in (None, np.float32)
            and kwargs.get("out_sharding") is None
        )
        if not ours:
            # A bfloat16 activation meets float32 weights: multiply in float32.
            return fallback(lhs.astype(rhs.dtype), rhs, dimension_numbers, **kwargs)
        return _dense(lhs, rhs)

    return dot_general


def bf16_supported() -> bool:
    """Whether oneDNN's bfloat16 convolutions beat float32 ones here: only on a CPU with
    bfloat16 dot products (:func:`springfield.runtime.cpu_has_bf16`)."""
    return runtime.cpu_has_bf16()


def make_conv(
    fallback: Callable[..., jax.Array], bfloat16: bool = False
) -> Callable[..., jax.Array]:
    """A :func:`jax.lax.conv_general_dilated` drop-in (the signature ``nnx.Conv`` calls) that
    runs on oneDNN when it can and calls ``fallback`` with the same arguments otherwise.

    ``bfloat16``: oneDNN multiplies bfloat16 copies of the inputs (and of the output
    gradient) and accumulates in float32, and writes the output and the input's gradient in
    bfloat16 (bfloat16 activations between layers, as PyTorch's autocast and Keras'
    ``mixed_bfloat16`` do; weight gradients stay float32); ignored where the CPU lacks
    bfloat16 instructions and for convolutions of fewer than ``MIN_BF16_CHANNELS`` input
    channels, which stay float32. The input may then be bfloat16 or float32 (its gradient
    comes back in its own type); the weights are float32. Whether oneDNN can run here
    (:func:`available`) is decided now, when the model is built; what it can run (NHWC/HWIO,
    2-D, no dilation or groups) when it is called."""
    if not available():
        return fallback
    bfloat16 = bfloat16 and bf16_supported()
    activations = bfloat16 and os.environ.get("SPRINGFIELD_BF16_ACTIVATIONS", "1") != "0"

    def conv_general_dilated(*args: Any, **kwargs: Any) -> jax.Array:
        call = _LAX_CONV.bind(*args, **kwargs)
        call.apply_defaults()
        arg = call.arguments
        lhs, rhs, padding = arg["lhs"], arg["rhs"], arg["padding"]
        ours = (
            _dims_are_nhwc(arg["dimension_numbers"], lhs.ndim)
            and rhs.dtype == np.float32
            and (lhs.dtype == np.float32 or (lhs.dtype == jnp.bfloat16 and activations))
            and arg["feature_group_count"] == arg["batch_group_count"] == 1
            and _trivial(arg["lhs_dilation"])
            and _trivial(arg["rhs_dilation"])
            and all(arg[k] is None for k in arg if k not in _OURS)
        )
        if not ours:
            return fallback(*args, **kwargs)
        strides = tuple(int(s) for s in arg["window_strides"])
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
        # A convolution of few input channels (an image's 3) stays float32: its products are
        # too short for bfloat16 pairs, and it measured 1.4-2.4x slower in bfloat16.
        bf16 = bfloat16 and rhs.shape[2] >= MIN_BF16_CHANNELS
        if not bf16:
            # Float32 products: oneDNN writes them in float32 only (the image's convolution).
            y = _conv(lhs, rhs, (strides, _pads(padding), False, False))
            return y.astype(jnp.bfloat16) if activations else y
        return _conv(lhs, rhs, (strides, _pads(padding), True, activations))

    # Read by layers: this convolution runs on oneDNN, in bfloat16 or not, and hands
    # bfloat16 activations on.
    conv_general_dilated.onednn_bfloat16 = bfloat16  # type: ignore[attr-defined]
    conv_general_dilated.bfloat16_activations = activations  # type: ignore[attr-defined]
    return conv_general_dilated


def implementation(
    x_shape: tuple, w_shape: tuple, strides: tuple, padding: str = "SAME", bfloat16: bool = False
) -> str:
    """oneDNN's implementation names (forward / input grad / weight grad) for one geometry."""
    lib, why = _load()
    if lib is None:
        return f"XLA ({why})"
    pads = lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding)
    n, oh, ow, _ = _out_shape(
        jax.ShapeDtypeStruct(x_shape, np.float32), jax.ShapeDtypeStruct(w_shape, np.float32),
        (strides, pads, bfloat16),
    )  # fmt: skip
    (pt, pb), (pl, pr) = pads
    n, h, w, c = x_shape
    kh, kw, _, o = w_shape
    args = (n, h, w, c, kh, kw, o, oh, ow, *strides, pt, pb, pl, pr, int(bfloat16))
    return lib.springfield_conv_impl(*(ctypes.c_int64(a) for a in args)).decode()
