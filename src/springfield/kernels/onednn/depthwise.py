"""Depthwise convolutions (EfficientNet-Lite's) in oneDNN's depthwise kernels.

XLA:CPU's grouped convolution is 10-100x slower than the arithmetic needs, and the shifted
sums of :mod:`springfield.kernels.depthwise` that replace it make a strided pass over the
activations per kernel tap (25 for a 5x5), which made the depthwise layers half of a Lite0
training step. oneDNN's ``*_dw`` kernels read each activation once per pass (``conv.cc``:
a grouped convolution of one channel a group). :func:`make_depthwise` makes a drop-in for
the same signature that runs NHWC, "SAME", square, equal-stride depthwise convolutions
there and calls its fallback for anything else.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from springfield.kernels.onednn.conv import _call, _dims_are_nhwc
from springfield.kernels.onednn.conv import implementation as conv_implementation
from springfield.kernels.onednn.library import available, bf16_supported, f32


def _out_shape(x: jax.Array, k: int, geom: tuple) -> tuple[int, int, int, int]:
    (s, _), ((pt, pb), (pl, pr)) = geom[:2]
    n, h, w, c = x.shape
    return n, (h + pt + pb - k) // s + 1, (w + pl + pr - k) // s + 1, c


# geom = (strides, pads, bfloat16): bfloat16 inputs, output and input gradient.
def _dw_fwd(x: jax.Array, w: jax.Array, geom: tuple) -> tuple[jax.Array, tuple]:
    t = jnp.bfloat16 if geom[2] else np.float32
    x_in, w_in = x.astype(t), w.astype(t)
    out = jax.ShapeDtypeStruct(_out_shape(x, w.shape[0], geom), t)
    y = _call("forward", out, x_in, w_in, geom=geom, depthwise=True)
    # The empty array carries the primal input's type to the backward pass.
    return y, (x_in, w_in, jnp.zeros(0, x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dw(x: jax.Array, w: jax.Array, geom: tuple) -> jax.Array:
    return _dw_fwd(x, w, geom)[0]


def _dw_bwd(geom: tuple, res: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_in, w_in, x_type = res
    dy_in = dy.astype(x_in.dtype)
    out = jax.ShapeDtypeStruct(x_in.shape, x_in.dtype)
    dx = _call("input_grad", out, dy_in, w_in, geom=geom, depthwise=True)
    dw = _call("weight_grad", f32(w_in.shape), x_in, dy_in, geom=geom, depthwise=True)
    return dx.astype(x_type.dtype), dw


_dw.defvjp(_dw_fwd, _dw_bwd)


def make_depthwise(
    fallback: Callable[..., jax.Array], bfloat16: bool = False
) -> Callable[..., jax.Array]:
    """A drop-in for ``fallback`` (``lax.conv_general_dilated``'s signature as ``nnx.Conv``
    calls it, for a depthwise layer: ``rhs`` of shape ``(k, k, 1, C)`` and
    ``feature_group_count == C``) that runs on oneDNN: float32 throughout, or with
    ``bfloat16`` (on a CPU with bfloat16 instructions) a bfloat16 input in bfloat16 (output
    and input gradient too; the weights' gradient is float32). A float32 input under
    ``bfloat16`` stays float32. Anything else (not "SAME", unequal strides or kernel sides,
    dilation, another layout) goes to ``fallback``."""
    if not available():
        return fallback
    bf16 = bfloat16 and bf16_supported()

    def depthwise(
        lhs: jax.Array,
        rhs: jax.Array,
        window_strides: Any,
        padding: Any = "SAME",
        lhs_dilation: Any = None,
        rhs_dilation: Any = None,
        dimension_numbers: Any = None,
        feature_group_count: int = 1,
        *args: Any,
        **kwargs: Any,
    ) -> jax.Array:
        strides = tuple(int(s) for s in window_strides)
        ours = (
            padding == "SAME"
            and lhs.ndim == 4
            and rhs.ndim == 4
            and rhs.shape[2] == 1
            and rhs.shape[0] == rhs.shape[1]
            and feature_group_count == lhs.shape[-1] == rhs.shape[3]
            and strides[0] == strides[1]
            and all(d is None or all(v == 1 for v in d) for d in (lhs_dilation, rhs_dilation))
            and _dims_are_nhwc(dimension_numbers, lhs.ndim)
            and lhs.dtype in (np.float32, jnp.bfloat16)
            and rhs.dtype == np.float32
        )
        if not ours:
            return fallback(
                lhs, rhs, window_strides, padding, *args, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, **kwargs,
            )  # fmt: skip
        k = rhs.shape[0]
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(lhs.shape[1:3], (k, k), strides, "SAME"))
        return _dw(lhs, rhs, (strides, pads, bf16 and lhs.dtype == jnp.bfloat16))

    depthwise.onednn = True  # type: ignore[attr-defined] - for tests and benchmarks
    return depthwise


def implementation(x_shape: tuple, k: int, stride: int, bfloat16: bool = False) -> str:
    """oneDNN's implementation names (forward / input grad / weight grad) for a depthwise
    geometry."""
    c = x_shape[-1]
    # A Key's types plus 4: depthwise (conv.cc).
    return conv_implementation(
        x_shape, (k, k, 1, c), (stride, stride), "SAME", bfloat16=bfloat16, extra_kind=4
    )
