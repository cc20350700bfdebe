"""XLA's own implementations of what :mod:`springfield.kernels` offers: the reference, and
what runs wherever oneDNN cannot (several devices, a GPU or TPU, ``--kernels xla``).

Convolutions: XLA:CPU computes a convolution's weight gradient as another convolution over
the input with the batch as the contracted feature dimension, which needs the input
transposed so that the batch dimension is minor. When the input was produced by an
elementwise fusion (BatchNorm, residual add, ReLU), XLA duplicates that fusion into the
transpose, recomputing it in a cache-hostile order: in the default ResNet this was a quarter
of the training step (docs/performance.md). :func:`conv_general_dilated` computes exactly the
same gradients but hands the weight gradient a materialised copy of the input, so the
transpose reads memory instead of recomputing: the ResNets train about 15% faster. ``refcnn``
and ``seed`` take plain ``lax.conv_general_dilated`` instead (``materialise=False``): their
convolutions read average-pooled activations, which XLA already materialises, and the extra
copy made them no faster.

:func:`bfloat16_conv` is ``--precision bfloat16`` on GPUs and TPUs; :func:`norm` is
BatchNorm (+ activation) as ``nnx.BatchNorm`` computes it; the depthwise convolutions of
the EfficientNets are in :mod:`springfield.kernels.depthwise`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax


def _plain(x: jax.Array, w: jax.Array, cfg: tuple) -> jax.Array:
    strides, padding, lhs_dilation, rhs_dilation, dims, groups, precision = cfg
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dims,
        feature_group_count=groups,
        precision=precision,
    )


def _materialised(x: jax.Array, w: jax.Array) -> jax.Array:
    # A conditional's operand cannot be fused into its consumers, so this is a real buffer.
    # The predicate depends on the (replicated) weights, so XLA cannot fold the conditional
    # away and no device has to wait for another's data; both branches are a copy.
    first = w.reshape(-1)[0]
    return lax.cond(first == first, jnp.copy, jnp.copy, x)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, w: jax.Array, cfg: tuple) -> jax.Array:
    return _plain(x, w, cfg)


def _conv_fwd(x: jax.Array, w: jax.Array, cfg: tuple) -> tuple[jax.Array, tuple]:
    return _plain(x, w, cfg), (x, w)


def _conv_bwd(cfg: tuple, res: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    # Both gradients are JAX's own transpose rules; only the weight gradient's input differs.
    dx = jax.vjp(lambda x: _plain(x, w, cfg), x)[1](dy)[0]
    x_copy = _materialised(x, w)
    dw = jax.vjp(lambda w: _plain(x_copy, w, cfg), w)[1](dy)[0]
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _hashable(v: Any) -> Any:
    # Lists become tuples (custom_vjp needs hashable static arguments); named tuples such as
    # lax.ConvDimensionNumbers stay what they are.
    if isinstance(v, list) or (isinstance(v, tuple) and not hasattr(v, "_fields")):
        return tuple(_hashable(x) for x in v)
    return v


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """Drop-in for :func:`jax.lax.conv_general_dilated` (the signature ``nnx.Conv`` calls)
    with the faster weight gradient described in the module docstring."""
    if kwargs.get("preferred_element_type") is not None or kwargs.get("out_sharding") is not None:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    cfg = (
        _hashable(window_strides),
        _hashable(padding),
        _hashable(lhs_dilation),
        _hashable(rhs_dilation),
        _hashable(dimension_numbers),
        feature_group_count,
        precision,
    )
    return _conv(lhs, rhs, cfg)


def bfloat16_conv(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """:func:`jax.lax.conv_general_dilated` on bfloat16 copies of float32 operands with a
    float32 result: ``--precision bfloat16`` on GPUs and TPUs, whose convolution units take
    bfloat16 natively (on a CPU, oneDNN does it; XLA:CPU would convert around every product).
    Weights, activations and the optimizer stay float32; the gradients' convolutions take
    bfloat16 operands too."""
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
    kwargs["preferred_element_type"] = jnp.float32
    return lax.conv_general_dilated(
        lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), *args, **kwargs
    )


def norm(bn: nnx.BatchNorm, x: jax.Array, *, train: bool, act: Any = None) -> jax.Array:
    """``act(bn(x))``: batch statistics when ``train`` (and the running averages updated),
    the running averages otherwise."""
    y = bn(x, use_running_average=not train)
    return y if act is None else act(y)


def optax_update(tx: optax.GradientTransformation) -> Any:
    """``tx``'s update as optax applies it: ``(grads, opt_state, params) -> (params,
    opt_state)``."""

    def update(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return update
