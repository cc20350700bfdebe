"""2-D convolutions, and whole conv + bias + ReLU + 2x2 average-pool blocks, in oneDNN.

XLA:CPU (jaxlib 0.10) runs convolutions in its own Eigen kernels at 60-80% of GEMM speed on
the 2-core machines springfield is measured on, and on one core when YNNPACK takes them; the
oneDNN inside jaxlib is not reachable for convolutions. oneDNN's JIT kernels (the ones
TensorFlow and PyTorch use) run the same convolutions at 90-100% of GEMM speed
(docs/performance.md). :func:`make_conv` makes a drop-in for
:func:`jax.lax.conv_general_dilated` that runs float32 NHWC/HWIO 2-D convolutions as three
FFI calls (forward, input gradient, weight gradient) into ``conv.cc``, with the same maths
(or with bfloat16 products, on request), and falls back to another convolution for anything
else.

:func:`conv_relu_pool` runs a whole ``avg_pool(relu(conv(x) + b))`` block (``refcnn``,
``seed``) as one call each way (``block.cc``, ``pool.cc``), so that XLA makes no passes of
its own over the convolution's full-size output.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from springfield.kernels.onednn.library import available, bf16_supported, f32, ffi, load

_NHWC = ("NHWC", "HWIO", "NHWC")
_LAX_CONV = inspect.signature(lax.conv_general_dilated)
# Arguments of lax.conv_general_dilated this path reads; any other must be left at None.
_OURS = {
    "lhs", "rhs", "window_strides", "padding", "lhs_dilation", "rhs_dilation",
    "dimension_numbers", "feature_group_count", "batch_group_count", "precision",
}  # fmt: skip
# Fewer input channels than this keep float32 products under --precision bfloat16.
MIN_BF16_CHANNELS = 8


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


def _call(target: str, out: Any, *args: jax.Array, geom: tuple, depthwise: int = 0) -> Any:
    """A convolution kernel (``conv.cc``): :func:`~.library.ffi` with ``geom``'s strides and
    padding; ``depthwise``: one filter per channel, weights ``(k, k, 1, C)``."""
    return ffi(target, out, *args, **_attrs(*geom[:2]), depthwise=np.int64(depthwise))


def _block_call(target: str, out: Any, *args: jax.Array, geom: tuple) -> Any:
    # A block's geom[5]: the convolution output's kilobytes per chunk (block.cc).
    return ffi(target, out, *args, **_attrs(*geom[:2]), chunk_kb=np.int64(geom[5]))


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


# A single convolution's geom = (strides, pads, bfloat16 products, bfloat16 activations,
# depthwise: weights (k, k, 1, C), one filter per channel).
def _conv_fwd(x: jax.Array, w: jax.Array, geom: tuple) -> tuple[jax.Array, tuple]:
    x_in, w_in = _inputs(geom, x, w)
    out = jax.ShapeDtypeStruct(_out_shape(x, w, geom), _activation_type(geom))
    y = _call("forward", out, x_in, w_in, geom=geom, depthwise=geom[4])
    # The empty array carries the primal input's type to the backward pass.
    return y, (x_in, w_in, jnp.zeros(0, x.dtype))


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
    dx = _call("input_grad", out, dy_in, w_in, geom=geom, depthwise=geom[4])
    dw = _call("weight_grad", f32(w_in.shape), x_in, dy_in, geom=geom, depthwise=geom[4])
    return dx.astype(x_type.dtype), dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _pooled_shape(x: jax.Array, w: jax.Array, geom: tuple) -> tuple[int, int, int, int]:
    n, oh, ow, o = _out_shape(x, w, geom)
    return n, oh // 2, ow // 2, o


# A block's geom = (strides, pads, bfloat16 products, input_grad, bfloat16 activations,
# kilobytes per chunk).
def _pooled(x: jax.Array, w: jax.Array, geom: tuple) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(_pooled_shape(x, w, geom), jnp.bfloat16 if geom[4] else np.float32)


def _block_fwd(x: jax.Array, w: jax.Array, b: jax.Array, geom: tuple) -> tuple[jax.Array, tuple]:
    x_in, w_in = _inputs(geom, x, w)
    n, oh, ow, o = _out_shape(x, w, geom)
    # ReLU's mask: one bit per element of the convolution's output.
    out = (_pooled(x, w, geom), jax.ShapeDtypeStruct((n, oh, ow, o // 8), np.uint8))
    y, mask = _block_call("block_forward", out, x_in, w_in, b, geom=geom)
    return y, (x_in, w_in, mask, jnp.zeros(0, x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _block(x: jax.Array, w: jax.Array, b: jax.Array, geom: tuple) -> jax.Array:
    # Not differentiated (evaluation): no mask to keep.
    x_in, w_in = _inputs(geom, x, w)
    return _block_call("block_infer", _pooled(x, w, geom), x_in, w_in, b, geom=geom)


def _block_bwd(geom: tuple, res: tuple, dy: jax.Array) -> tuple[jax.Array, ...]:
    # dy comes in the output's type (float32 or bfloat16); the kernels read either.
    x_in, w_in, mask, x_type = res
    if not geom[3]:
        # No input gradient (see conv_relu_pool): the weights' one pass, chunked in cache.
        out = (f32(w_in.shape), f32(w_in.shape[-1:]))
        dw, db = _block_call("block_weight_grad", out, x_in, dy, mask, geom=geom)
        return jnp.zeros(x_in.shape, x_type.dtype), dw, db
    dz = jax.ShapeDtypeStruct(_out_shape(x_in, w_in, geom), x_in.dtype)
    out = (dz, f32(w_in.shape), f32(w_in.shape[-1:]))
    dz, dw, db = _block_call("block_backward", out, x_in, dy, mask, geom=geom)
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
    chunk_kb: int = 4096,
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
    activations between layers, as :func:`make_conv`'s convolutions hand on). ``chunk_kb``:
    the block runs a few images at a time, so that this many kilobytes of the convolution's
    output stay in cache between oneDNN and the pooling pass (``block.cc``)."""
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
    geom = ((1, 1), pads, bf16, input_grad, activations, int(chunk_kb))
    _, oh, ow, _ = _out_shape(x, w, geom)
    if oh < 2 or ow < 2:
        return None
    return _block(x, w, b, geom)


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


def make_conv(
    fallback: Callable[..., jax.Array], bfloat16: bool = False, activations: bool = True
) -> Callable[..., jax.Array]:
    """A :func:`jax.lax.conv_general_dilated` drop-in (the signature ``nnx.Conv`` calls) that
    runs on oneDNN when it can and calls ``fallback`` with the same arguments otherwise.

    ``bfloat16``: oneDNN multiplies bfloat16 copies of the inputs (and of the output
    gradient) and accumulates in float32, and writes the output and the input's gradient in
    bfloat16 (bfloat16 activations between layers, as PyTorch's autocast and Keras'
    ``mixed_bfloat16`` do; weight gradients stay float32); ignored where the CPU lacks
    bfloat16 instructions and for convolutions of fewer than ``MIN_BF16_CHANNELS`` input
    channels, which stay float32. The input may then be bfloat16 or float32 (its gradient
    comes back in its own type); the weights are float32. ``activations=False`` keeps
    float32 activations between layers under ``bfloat16`` (bfloat16 products only, the path
    before 2026-12-06). Whether oneDNN can run here
    (:func:`available`) is decided now, when the model is built; what it can run (NHWC/HWIO,
    2-D, no dilation or groups) when it is called."""
    if not available():
        return fallback
    bfloat16 = bfloat16 and bf16_supported()
    activations = bfloat16 and activations

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
            y = _conv(lhs, rhs, (strides, _pads(padding), False, False, False))
            return y.astype(jnp.bfloat16) if activations else y
        return _conv(lhs, rhs, (strides, _pads(padding), True, activations, False))

    # Read by layers: this convolution runs on oneDNN, in bfloat16 or not, and hands
    # bfloat16 activations on.
    conv_general_dilated.onednn_bfloat16 = bfloat16  # type: ignore[attr-defined]
    conv_general_dilated.bfloat16_activations = activations  # type: ignore[attr-defined]
    return conv_general_dilated


def implementation(
    x_shape: tuple,
    w_shape: tuple,
    strides: tuple,
    padding: str = "SAME",
    bfloat16: bool = False,
    depthwise: bool = False,
) -> str:
    """oneDNN's implementation names (forward / input grad / weight grad) for one geometry
    (``depthwise``: one filter per channel, ``w_shape`` ``(k, k, 1, C)``)."""
    lib, why = load()
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
    # conv.cc's Key types: a depthwise layer in bfloat16 also hands bfloat16 activations on;
    # 4 marks a depthwise convolution.
    types = (2 if depthwise else 1) if bfloat16 else 0
    kind = types | (4 if depthwise else 0)
    args = (n, h, w, c, kh, kw, o, oh, ow, *strides, pt, pb, pl, pr, kind)
    return lib.springfield_conv_impl(*(ctypes.c_int64(a) for a in args)).decode()
