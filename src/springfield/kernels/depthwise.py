"""Depthwise convolution as a sum of shifted products, with a hand-written gradient.

XLA:CPU lowers a convolution with ``feature_group_count == channels`` to a generic grouped
kernel that is one to two orders of magnitude slower than the arithmetic needs (jax-ml/jax
#23713): a 3x3 depthwise layer of a 32-image batch at 80x80x96 took 1.1 s forward and 12 s
with its gradient on a 2-core Zen 5 (the experiment that chose this module). Written as
``k*k`` strided slices of the padded input, each times one weight per channel, XLA fuses it
into one elementwise loop: 0.2 s forward there. Autodiff of that sum makes a padded copy
per tap; :func:`depthwise_conv`'s own gradient computes the input gradient the same way as
the forward pass (the output gradient dilated by the stride, against the flipped kernel) and
each tap's weight gradient as one reduction.

Padding is TensorFlow's "SAME" (more after than before when the total is odd), as
``lax.conv_general_dilated(..., "SAME")`` and the Lite models' weights have it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _pads(size: tuple[int, int], k: int, s: int) -> list[tuple[int, int]]:
    return lax.padtype_to_pads(size, (k, k), (s, s), "SAME")


def _correlate(xp: jax.Array, w: jax.Array, s: int, out: tuple[int, int]) -> jax.Array:
    """``y[b, h, w, c] = sum_ij xp[b, h*s + i, w*s + j, c] * w[i, j, c]`` over ``out``,
    summed in float32 and written in ``xp``'s type (bfloat16 activations stay bfloat16; a
    sum of 25 bfloat16 terms in bfloat16 would lose their low bits)."""
    k = w.shape[0]
    dtype = xp.dtype
    xp, w = xp.astype(jnp.float32), w.astype(jnp.float32)
    y = None
    for i in range(k):
        for j in range(k):
            tap = _tap(xp, i, j, out, s)
            y = tap * w[i, j] if y is None else y + tap * w[i, j]
    return y.astype(dtype)


def _forward(x: jax.Array, w: jax.Array, s: int) -> jax.Array:
    h, wd = x.shape[1:3]
    k = w.shape[0]
    (pt, pb), (pl, pr) = _pads((h, wd), k, s)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    return _correlate(xp, w, s, (-(-h // s), -(-wd // s)))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise(x: jax.Array, w: jax.Array, s: int) -> jax.Array:
    return _forward(x, w, s)


def _depthwise_fwd(x: jax.Array, w: jax.Array, s: int) -> tuple[jax.Array, tuple]:
    return _forward(x, w, s), (x, w)


def _depthwise_bwd(s: int, res: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    k = w.shape[0]
    h, wd = x.shape[1:3]
    oh, ow = dy.shape[1:3]
    (pt, pb), (pl, pr) = _pads((h, wd), k, s)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    dy32 = dy.astype(jnp.float32)
    rows = []
    for i in range(k):
        row = []
        for j in range(k):
            tap = _tap(xp, i, j, (oh, ow), s)
            row.append(jnp.sum(tap.astype(jnp.float32) * dy32, axis=(0, 1, 2)))
        rows.append(jnp.stack(row))
    dw = jnp.stack(rows).astype(w.dtype)
    # The input gradient is a stride-1 correlation of the output gradient, dilated by the
    # stride and padded so that every input position sees the taps that read it.
    zero = jnp.zeros((), dy.dtype)
    dyp = lax.pad(
        dy,
        zero,
        (
            (0, 0, 0),
            (k - 1 - pt, h + pt - (oh - 1) * s - 1, s - 1),
            (k - 1 - pl, wd + pl - (ow - 1) * s - 1, s - 1),
            (0, 0, 0),
        ),
    )
    dx = _correlate(dyp, w[::-1, ::-1], 1, (h, wd))
    return dx.astype(x.dtype), dw


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Any,
    padding: Any = "SAME",
    *args: Any,
    feature_group_count: int = 1,
    **kwargs: Any,
) -> jax.Array:
    """A ``lax.conv_general_dilated`` drop-in (the signature ``nnx.Conv`` calls) for
    depthwise NHWC/HWIO convolutions with "SAME" padding and equal strides: ``rhs`` is
    ``(k, k, 1, C)``. The output (and the input's gradient) is in ``lhs``'s type: float32,
    or bfloat16 activations; the weights' gradient is float32."""
    s = int(window_strides[0])
    if (
        padding != "SAME"
        or rhs.shape[2] != 1
        or feature_group_count != lhs.shape[-1]
        or tuple(window_strides) != (s, s)
        or rhs.shape[0] != rhs.shape[1]
    ):
        raise ValueError("depthwise_conv: only square depthwise kernels, SAME, equal strides")
    return _depthwise(lhs, rhs[:, :, 0, :], s)


def _tap(xp: jax.Array, i: int, j: int, out: tuple[int, int], s: int) -> jax.Array:
    """The input each output pixel sees at kernel position ``(i, j)``: a strided slice of the
    padded input ``xp``, of the output's size ``out``."""
    oh, ow = out
    return lax.slice(
        xp,
        (0, i, j, 0),
        (xp.shape[0], i + (oh - 1) * s + 1, j + (ow - 1) * s + 1, xp.shape[3]),
        (1, s, s, 1),
    )
