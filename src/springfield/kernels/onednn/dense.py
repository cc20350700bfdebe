"""Dense layers' products in bfloat16 with float32 accumulation, in oneDNN (``matmul.cc``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from springfield.kernels.onednn.library import available, bf16_supported, ffi

# Dense layers of fewer weights than this keep XLA's float32 dot under --precision bfloat16:
# a classifier's head (256 x 4) takes microseconds either way.
MIN_BF16_DENSE_WEIGHTS = 65536


def matmul(
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
    return ffi("matmul", out, a, b, **flags)


def _dense_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    return matmul(x, w, np.float32, bf16=True), (x, w)


@jax.custom_vjp
def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dense_fwd(x, w)[0]


def _dense_bwd(res: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    # The input's gradient in the input's own type (a bfloat16 activation's in bfloat16).
    dx = matmul(dy, w, x.dtype, trans_b=True, bf16=True)
    dw = matmul(x, dy, np.float32, trans_a=True, bf16=True)
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
