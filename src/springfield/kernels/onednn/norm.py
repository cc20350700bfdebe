"""BatchNorm (+ ReLU) in oneDNN, training and inference (``norm.cc``).

XLA:CPU makes five to seven passes over the activations for a training BatchNorm + ReLU and
its gradient; oneDNN's JIT kernel makes one each way (docs/performance.md).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from springfield.kernels.onednn.library import available, f32, ffi, load

# cfg = (epsilon, activation, mask bytes); norm.cc's `relu`: 0 none, 1 ReLU, 2 ReLU6.
RELU, RELU6 = 1, 2


def _bn_call(target: str, out: Any, *args: jax.Array, cfg: tuple) -> Any:
    eps, relu = cfg[:2]
    return ffi(target, out, *args, relu=np.int64(relu), epsilon=np.float32(eps))


def _bn_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, cfg: tuple) -> tuple:
    channels = f32(scale.shape)
    # cfg[2]: the bytes of the ReLU mask oneDNN keeps for the backward pass.
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels,
           jax.ShapeDtypeStruct((cfg[2],), np.uint8))  # fmt: skip
    y, mean, var, mask = _bn_call("bn_forward", out, x, scale, bias, cfg=cfg)
    return (y, mean, var), (x, mean, var, scale, bias, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn(x: jax.Array, scale: jax.Array, bias: jax.Array, cfg: tuple) -> tuple:
    return _bn_fwd(x, scale, bias, cfg)[0]


def _bn_bwd(cfg: tuple, res: tuple, cotangents: tuple) -> tuple[jax.Array, ...]:
    # The batch statistics are outputs for the running averages only: their cotangents
    # are zero wherever batch_norm is used (it stops their gradients).
    # (The shift is read for ReLU6's mask only.)
    x, mean, var, scale, bias, mask = res
    dy = cotangents[0]
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), f32(scale.shape), f32(scale.shape))
    return tuple(_bn_call("bn_backward", out, x, dy, mean, var, scale, bias, mask, cfg=cfg))


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
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
    relu: bool = False,
    relu6: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """Training-mode BatchNorm over all axes but the last, then ReLU if ``relu`` (or ReLU6,
    ``min(max(y, 0), 6)``, if ``relu6``), as one call each way: ``(y, batch mean, batch
    variance)``, the variance biased (divided by the count, as flax's), the statistics
    without gradients. ``None`` where that cannot run here: oneDNN not :func:`available`,
    or not a float32 or bfloat16 NHWC array (``y`` has its type; the statistics, ``scale``
    and ``bias`` are float32). Same maths as ``nnx.BatchNorm`` (+ ``jax.nn.relu`` /
    ``jax.nn.relu6``) up to summation order (and, for bfloat16, the rounding of ``y``), in
    fewer passes than XLA makes (docs/performance.md). oneDNN runs the BatchNorm and ReLU;
    with ReLU6, which oneDNN cannot fuse, ``norm.cc``'s own loops run it."""
    if not _bn_runs(x, scale, bias, types=(np.float32, jnp.bfloat16)):
        return None
    if relu6:
        y, mean, var = _bn(x, scale, bias, (float(epsilon), RELU6, 0))
        return y, lax.stop_gradient(mean), lax.stop_gradient(var)
    mask_bytes = 0
    if relu:
        n, h, w, c = x.shape
        bf16 = int(x.dtype == jnp.bfloat16)
        mask_bytes = load()[0].springfield_bn_workspace_bytes(n, h, w, c, bf16, 1, epsilon)
        if mask_bytes < 0:  # oneDNN has no such BatchNorm here
            return None
    y, mean, var = _bn(x, scale, bias, (float(epsilon), RELU if relu else 0, mask_bytes))
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
