"""Convolution layers whose gradients run faster on XLA:CPU, with unchanged maths.

XLA:CPU computes a convolution's weight gradient as another convolution over the input with
the batch as the contracted feature dimension, which needs the input transposed so that the
batch dimension is minor. When the input was produced by an elementwise fusion (BatchNorm,
residual add, ReLU), XLA duplicates that fusion into the transpose, recomputing it in a
cache-hostile order: in the default ResNet this was a quarter of the training step
(docs/performance.md). :func:`conv_general_dilated` computes exactly the same gradients
but hands the weight gradient a materialised copy of the input, so the transpose reads
memory instead of recomputing: the ResNets train about 15% faster.

Where oneDNN can run (a single CPU device, see :mod:`springfield.kernels.onednn`) it runs
every convolution of every model instead, and all of the above applies only to the fallback.
The ResNets use :func:`Conv`; ``refcnn`` and ``seed`` use ``Conv(..., materialise=False)``:
their convolutions read average-pooled activations, which XLA already materialises, and the
extra copy made them no faster. ``SPRINGFIELD_CONV=lax`` (read when a model is built) makes
:func:`Conv` use plain ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from springfield import runtime
from springfield.kernels import onednn


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


PRECISIONS = ("float32", "bfloat16")
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar(
    "conv_precision", default="float32"
)
_XLA_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("xla_convolutions", default=False)


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Models built inside use plain ``lax.conv_general_dilated`` for every convolution, as
    with ``SPRINGFIELD_CONV=lax``: no oneDNN custom call, whose FFI target exists only in a
    process that loaded springfield's kernels, so that ``jax.export`` can serialise the model
    for any machine (:mod:`springfield.export_writer`)."""
    token = _XLA_ONLY.set(True)
    try:
        yield
    finally:
        _XLA_ONLY.reset(token)


@contextlib.contextmanager
def conv_precision(precision: str) -> Iterator[None]:
    """Models built inside compute their convolutions in ``precision``: ``float32``, or
    ``bfloat16`` (bfloat16 products, float32 accumulation, float32 weights and activations;
    oneDNN on CPUs with bfloat16 instructions only, float32 elsewhere)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def conv_impl(materialise: bool = True) -> Any:
    """The convolution function models use: oneDNN's where it can run
    (:mod:`springfield.kernels.onednn`), else XLA's, with the materialised weight gradient
    above when ``materialise``; plain ``lax`` with ``SPRINGFIELD_CONV=lax`` or inside
    :func:`xla_convolutions`."""
    if os.environ.get("SPRINGFIELD_CONV", "") == "lax" or _XLA_ONLY.get():
        return lax.conv_general_dilated
    if _PRECISION.get() == "bfloat16" and jax.default_backend() != "cpu":
        return bfloat16_conv
    fallback = conv_general_dilated if materialise else lax.conv_general_dilated
    return onednn.make_conv(fallback, bfloat16=_PRECISION.get() == "bfloat16")


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


def conv_act_pool(conv: nnx.Conv, act: Any, x: jax.Array, input_grad: bool = True) -> jax.Array:
    """``avg_pool(act(conv(x)), 2x2, stride 2)``, the block of ``refcnn`` and ``seed``.

    Where ``conv`` runs on oneDNN (built by :func:`Conv` with oneDNN available), ``act`` is
    ReLU and the convolution is a plain biased stride-1 one, the whole block runs as one
    oneDNN call each way (:func:`springfield.kernels.onednn.conv_relu_pool`): XLA would
    otherwise make six passes over the convolution's full-size output for the bias, ReLU,
    pooling and their gradients. ``SPRINGFIELD_FUSE_BLOCKS=0`` keeps the separate layers.
    ``input_grad=False`` (a first block, whose input is the image) stops the gradient at
    ``x`` on every path, which lets the fused block skip the input's gradient."""
    bf16 = getattr(conv.conv_general_dilated, "onednn_bfloat16", None)
    plain = (
        bf16 is not None
        and act is jax.nn.relu
        and conv.bias is not None
        and conv.mask is None
        and _trivial(conv.strides)
        and _trivial(conv.input_dilation)
        and _trivial(conv.kernel_dilation)
        and conv.feature_group_count == 1
        and os.environ.get("SPRINGFIELD_FUSE_BLOCKS", "1") != "0"
    )
    if plain:
        y = onednn.conv_relu_pool(
            x,
            conv.kernel[...],
            conv.bias[...],
            conv.padding,
            bfloat16=bf16,
            input_grad=input_grad,
            activations=getattr(conv.conv_general_dilated, "bfloat16_activations", False),
        )
        if y is not None:
            return y
    if not input_grad:
        x = lax.stop_gradient(x)
    return nnx.avg_pool(act(conv(x)), (2, 2), strides=(2, 2))


def norm_impl() -> Any:
    """The BatchNorm (+ activation) function models built now use: :func:`onednn_norm`
    where oneDNN runs their convolutions (and ``SPRINGFIELD_FUSE_BN`` is not ``0``), else
    :func:`xla_norm`. Both take ``(bn, x, *, train, act=None)`` and compute
    ``act(bn(x))``."""
    fused = getattr(conv_impl(), "onednn_bfloat16", None) is not None
    return onednn_norm if fused and os.environ.get("SPRINGFIELD_FUSE_BN", "1") != "0" else xla_norm


def xla_norm(bn: nnx.BatchNorm, x: jax.Array, *, train: bool, act: Any = None) -> jax.Array:
    """``act(bn(x))``: batch statistics when ``train`` (and the running averages updated),
    the running averages otherwise."""
    y = bn(x, use_running_average=not train)
    return y if act is None else act(y)


def onednn_norm(bn: nnx.BatchNorm, x: jax.Array, *, train: bool, act: Any = None) -> jax.Array:
    """:func:`xla_norm` with training-mode BatchNorm (and ReLU, when ``act`` is ReLU) in
    one oneDNN call each way (:func:`springfield.kernels.onednn.batch_norm`): XLA makes five
    to seven passes over the activations for them. The running averages are updated as
    ``nnx.BatchNorm`` does. Evaluation runs in oneDNN for bfloat16 activations (XLA:CPU's
    bfloat16 passes are slow); float32 evaluation, and whatever oneDNN cannot run, stays
    :func:`xla_norm`."""
    plain = (
        bn.axis in (-1, x.ndim - 1)
        and bn.use_scale
        and bn.use_bias
        and bn.axis_name is None
        and bn.dtype in (None, x.dtype)
    )
    relu = act is jax.nn.relu
    scale, bias = bn.scale[...], bn.bias[...]
    y = None
    if plain and not train:
        y = onednn.batch_norm_infer(x, scale, bias, bn.mean[...], bn.var[...], bn.epsilon, relu)
    elif plain:
        out = onednn.batch_norm(x, scale, bias, bn.epsilon, relu=relu)
        if out is not None:
            y, mean, var = out
            m = bn.momentum
            bn.mean[...] = m * bn.mean[...] + (1 - m) * mean
            bn.var[...] = m * bn.var[...] + (1 - m) * var
    if y is None:
        return xla_norm(bn, x, train=train, act=act)
    return y if relu or act is None else act(y)


def _trivial(v: Any) -> bool:
    return v is None or all(d == 1 for d in ((v,) if isinstance(v, int) else v))


def Conv(  # noqa: N802 - a module constructor
    in_features: int,
    out_features: int,
    kernel_size: tuple[int, ...],
    materialise: bool = True,
    **kwargs: Any,
) -> nnx.Conv:
    """``nnx.Conv`` with :func:`conv_impl` as its convolution (same parameters and maths).
    Where that convolution takes bfloat16 activations (:func:`activation_dtype`), a
    bfloat16 input reaches it as it is, not promoted to the weights' float32."""
    impl = conv_impl(materialise)
    if getattr(impl, "bfloat16_activations", False):
        kwargs.setdefault("promote_dtype", keep_input_type)
    return nnx.Conv(in_features, out_features, kernel_size, conv_general_dilated=impl, **kwargs)


def Dense(in_features: int, out_features: int, **kwargs: Any) -> nnx.Linear:  # noqa: N802
    """``nnx.Linear`` (same parameters and maths). Where the model's convolutions multiply
    in bfloat16 on oneDNN (``--precision bfloat16`` on a CPU with bfloat16 instructions),
    its product runs there too, in bfloat16 with float32 accumulation
    (:func:`springfield.kernels.onednn.make_dense_dot`), and a bfloat16 input reaches it as
    it is, except on CPUs with AMX, where oneDNN's skinny bfloat16 products measured no
    faster than XLA's float32 dot (docs/performance.md). ``SPRINGFIELD_BF16_DENSE=0`` keeps
    XLA's float32 dot everywhere, ``=1`` takes oneDNN's on AMX too."""
    wanted = os.environ.get("SPRINGFIELD_BF16_DENSE", "")
    if getattr(conv_impl(), "onednn_bfloat16", False) and (
        wanted == "1" or (wanted != "0" and not runtime.cpu_has_amx())
    ):
        kwargs.setdefault("dot_general", onednn.make_dense_dot())
        kwargs.setdefault("promote_dtype", keep_input_type)
    return nnx.Linear(in_features, out_features, **kwargs)


def keep_input_type(args: tuple, dtype: Any = None, **kwargs: Any) -> tuple:
    """An ``nnx`` ``promote_dtype`` that promotes nothing: the layer's operation chooses the
    arithmetic's type itself."""
    # The convolution (or product) casts what it multiplies; the bias promotes the output.
    return args


def activation_dtype() -> Any:
    """The type the layers of a model built now should hand on between them: ``bfloat16``
    where its convolutions run on oneDNN with ``--precision bfloat16`` (they read and write
    bfloat16 activations; BatchNorm normalises in float32 from float32 statistics and writes
    bfloat16, as under PyTorch's autocast), else ``None`` (the layers' own float32)."""
    impl = conv_impl()
    return jnp.bfloat16 if getattr(impl, "bfloat16_activations", False) else None
