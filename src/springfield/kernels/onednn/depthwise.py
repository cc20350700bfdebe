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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from springfield.kernels.onednn.conv import _conv, _dims_are_nhwc
from springfield.kernels.onednn.conv import implementation as conv_implementation
from springfield.kernels.onednn.library import available, bf16_supported


def make_depthwise(
    fallback: Callable[..., jax.Array], bfloat16: bool = False, own_weight_grad: bool = True
) -> Callable[..., jax.Array]:
    """A drop-in for ``fallback`` (``lax.conv_general_dilated``'s signature as ``nnx.Conv``
    calls it, for a depthwise layer: ``rhs`` of shape ``(k, k, 1, C)`` and
    ``feature_group_count == C``) that runs on oneDNN: float32 throughout, or with
    ``bfloat16`` (on a CPU with bfloat16 instructions) a bfloat16 input in bfloat16 (output
    and input gradient too; the weights' gradient is float32). A float32 input under
    ``bfloat16`` stays float32. With ``own_weight_grad`` the 5x5 weight gradients run in
    springfield's own loop on a CPU with AVX-512 (``conv.cc``: oneDNN has no depthwise
    kernel for them), else in oneDNN. Anything else (not "SAME", unequal strides or kernel
    sides, dilation, another layout) goes to ``fallback``."""
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
        # conv.cc's convolution with one filter per channel; bfloat16 products and
        # activations together, for a bfloat16 input.
        bf = bf16 and lhs.dtype == jnp.bfloat16
        # geom[4], conv.cc's `depthwise`: 2 asks for its own weight-gradient loop.
        return _conv(lhs, rhs, (strides, pads, bf, bf, 2 if own_weight_grad else 1))

    depthwise.onednn = True  # type: ignore[attr-defined] - for tests and benchmarks
    return depthwise


def implementation(x_shape: tuple, k: int, stride: int, bfloat16: bool = False) -> str:
    """oneDNN's implementation names (forward / input grad / weight grad) for a depthwise
    geometry."""
    w_shape = (k, k, 1, x_shape[-1])
    return conv_implementation(
        x_shape, w_shape, (stride, stride), "SAME", bfloat16=bfloat16, depthwise=True
    )
