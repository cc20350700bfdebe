"""The kernels' interface (re-exported by :mod:`springfield.kernels`): for each operation
the models and the train step need, oneDNN's implementation where the selection
(:mod:`.selection`) asks for it and it can run, else XLA's (:mod:`.xla`), the reference.

Everything but :func:`conv_block` and the functions it returns is decided when called, which
for the layers is when a model is built: the model keeps what was chosen then.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from springfield.errors import SpringfieldError
from springfield.kernels import fused_adam, onednn, tuning, xla
from springfield.kernels.depthwise import depthwise_conv as _depthwise_conv
from springfield.kernels.selection import Selection, check_kernels, selected

Update = Any  # (grads, opt_state, params) -> (params, opt_state)


def onednn_runs(selection: Selection | None = None) -> bool:
    """Whether the selection's models run on oneDNN here: ``auto`` where it can run, never
    for ``xla`` or a portable model; ``onednn`` where it cannot is an error."""
    sel = selected() if selection is None else selection
    if sel.portable or sel.kernels == "xla":
        return False
    if sel.kernels == "onednn" and not onednn.available():
        raise SpringfieldError(
            f"--kernels onednn: oneDNN cannot run here: {onednn.status()}. Use --kernels auto "
            "(oneDNN where it can run, XLA elsewhere) or --kernels xla."
        )
    return onednn.available()


def conv(materialise: bool = True) -> Any:
    """The convolution function (:func:`jax.lax.conv_general_dilated`'s signature, as
    ``nnx.Conv`` calls it) of a layer built now: oneDNN's where it runs, else XLA's with the
    materialised weight gradient when ``materialise`` (:mod:`.xla`), bfloat16 products on a
    GPU or TPU under ``--precision bfloat16``, plain ``lax`` in a portable model."""
    sel = selected()
    if sel.portable:
        return lax.conv_general_dilated
    if sel.precision == "bfloat16" and jax.default_backend() != "cpu":
        return xla.bfloat16_conv
    fallback = xla.conv_general_dilated if materialise else lax.conv_general_dilated
    if not onednn_runs(sel):
        return fallback
    opts = sel.options
    fn = onednn.make_conv(
        fallback, bfloat16=sel.precision == "bfloat16", activations=opts.bf16_activations
    )
    # Read by conv_block when the model runs.
    fn.fuse_blocks = opts.fuse_blocks  # type: ignore[attr-defined]
    fn.block_chunk_kb = opts.block_chunk_kb  # type: ignore[attr-defined]
    return fn


def _trivial(v: Any) -> bool:
    return v is None or all(d == 1 for d in ((v,) if isinstance(v, int) else v))


def conv_block(layer: nnx.Conv, act: Any, x: jax.Array, input_grad: bool = True) -> jax.Array:
    """``avg_pool(act(layer(x)), 2x2, stride 2)``, the block of ``refcnn`` and ``seed``.

    Where ``layer``'s convolution runs on oneDNN (built by :func:`conv`), ``act`` is ReLU
    and the convolution is a plain biased stride-1 one, the whole block runs as one oneDNN
    call each way (:func:`springfield.kernels.onednn.conv_relu_pool`): XLA would otherwise
    make six passes over the convolution's full-size output for the bias, ReLU, pooling and
    their gradients. ``input_grad=False`` (a first block, whose input is the image) stops
    the gradient at ``x`` on every path, which lets the fused block skip the input's
    gradient."""
    fn = layer.conv_general_dilated
    bf16 = getattr(fn, "onednn_bfloat16", None)
    plain = (
        bf16 is not None
        and getattr(fn, "fuse_blocks", False)
        and act is jax.nn.relu
        and layer.bias is not None
        and layer.mask is None
        and _trivial(layer.strides)
        and _trivial(layer.input_dilation)
        and _trivial(layer.kernel_dilation)
        and layer.feature_group_count == 1
    )
    if plain:
        y = onednn.conv_relu_pool(
            x,
            layer.kernel[...],
            layer.bias[...],
            layer.padding,
            bfloat16=bf16,
            input_grad=input_grad,
            activations=getattr(fn, "bfloat16_activations", False),
            chunk_kb=fn.block_chunk_kb,
        )
        if y is not None:
            return y
    if not input_grad:
        x = lax.stop_gradient(x)
    return nnx.avg_pool(act(layer(x)), (2, 2), strides=(2, 2))


def activation_dtype() -> Any:
    """The type the layers of a model built now hand on between them: ``bfloat16`` where its
    convolutions run on oneDNN with ``--precision bfloat16`` (they read and write bfloat16
    activations; BatchNorm normalises in float32 from float32 statistics and writes
    bfloat16, as under PyTorch's autocast), else ``None`` (the layers' own float32)."""
    return jnp.bfloat16 if getattr(conv(), "bfloat16_activations", False) else None


def norm() -> Any:
    """The BatchNorm (+ activation) function of a layer built now: ``(bn, x, *, train,
    act=None) -> act(bn(x))``; oneDNN's where the model's convolutions run there, else
    XLA's (:func:`springfield.kernels.xla.norm`)."""
    sel = selected()
    if not (sel.options.fuse_norm and onednn_runs(sel)):
        return xla.norm
    return functools.partial(_onednn_norm, fuse_relu6=sel.options.fuse_relu6)


def _onednn_norm(
    bn: nnx.BatchNorm, x: jax.Array, *, train: bool, act: Any = None, fuse_relu6: bool = True
) -> jax.Array:
    """:func:`springfield.kernels.xla.norm` with training-mode BatchNorm (and ReLU or ReLU6,
    when ``act`` is ``jax.nn.relu`` or ``jax.nn.relu6``) in one call each way: XLA makes
    five to seven passes over the activations for them. The running averages are updated
    as ``nnx.BatchNorm`` does. Evaluation runs in oneDNN for bfloat16 activations (XLA:CPU's
    bfloat16 passes are slow; ReLU6 then applied by XLA); float32 evaluation, and whatever
    oneDNN cannot run, stays XLA's."""
    plain = (
        bn.axis in (-1, x.ndim - 1)
        and bn.use_scale
        and bn.use_bias
        and bn.axis_name is None
        and bn.dtype in (None, x.dtype)
    )
    relu, relu6 = act is jax.nn.relu, act is jax.nn.relu6 and fuse_relu6
    scale, bias = bn.scale[...], bn.bias[...]
    y = None
    if plain and not train:
        y = onednn.batch_norm_infer(x, scale, bias, bn.mean[...], bn.var[...], bn.epsilon, relu)
    elif plain:
        out = onednn.batch_norm(x, scale, bias, bn.epsilon, relu=relu, relu6=relu6)
        if out is not None:
            y, mean, var = out
            m = bn.momentum
            bn.mean[...] = m * bn.mean[...] + (1 - m) * mean
            bn.var[...] = m * bn.var[...] + (1 - m) * var
    if y is None:
        return xla.norm(bn, x, train=train, act=act)
    return y if relu or (relu6 and train) or act is None else act(y)


def dense_dot() -> Any:
    """The ``dot_general`` of a dense layer built now, or None for ``nnx.Linear``'s own
    (XLA's float32 dot): oneDNN's bfloat16 products where the model's convolutions multiply
    in bfloat16 on oneDNN (``--precision bfloat16`` on a CPU with bfloat16 instructions),
    except on CPUs with AMX (:attr:`KernelOptions.bf16_dense`)."""
    sel = selected()
    if sel.precision != "bfloat16" or not onednn.bf16_supported() or not onednn_runs(sel):
        return None
    wanted = sel.options.bf16_dense
    if wanted is False or (wanted is None and tuning.cpu_has_amx()):
        return None
    return onednn.make_dense_dot()


def depthwise_conv() -> Any:
    """The convolution function of a depthwise layer built now (``feature_group_count`` =
    channels, square kernel, SAME, equal strides): oneDNN's depthwise kernels where the
    model's convolutions run there (:func:`springfield.kernels.onednn.make_depthwise`), else
    XLA's shifted sums (:mod:`.depthwise`; XLA's own grouped convolution is 10-100x slower
    on a CPU), which a portable model keeps."""
    sel = selected()
    if sel.portable or not sel.options.onednn_depthwise or not onednn_runs(sel):
        return _depthwise_conv
    return onednn.make_depthwise(
        _depthwise_conv,
        bfloat16=sel.precision == "bfloat16" and sel.options.bf16_activations,
        own_weight_grad=sel.options.own_depthwise_grad,
    )


def optimizer_update(
    tx: optax.GradientTransformation,
    kernels: str = "auto",
    *,
    name: str = "",
    schedule: optax.Schedule | None = None,
    weight_decay: float = 0.0,
) -> Update:
    """``(grads, opt_state, params) -> (params, opt_state)``: ``tx``'s update, as one in-place
    kernel pass where ``tx`` is optax's ``name`` (``adam`` or ``adamw`` with ``schedule``
    and ``weight_decay``, built by :func:`springfield.training.optim.make_optimizer`) and
    ``kernels`` is not ``xla`` (:mod:`.fused_adam`: the same numbers; the function then has
    ``fused = True``), else optax's own (:func:`springfield.kernels.xla.optax_update`)."""
    check_kernels(kernels)
    plain = xla.optax_update(tx)
    fused = None
    if kernels != "xla" and schedule is not None and selected().options.fused_adam:
        fused = fused_adam.make_fused_update(name, schedule, weight_decay=weight_decay)
    if fused is None:
        return plain

    def update(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
        # Parameters the kernel does not take (not all float32, say) go to optax.
        out = fused(grads, opt_state, params)
        return plain(grads, opt_state, params) if out is None else out

    update.fused = True  # type: ignore[attr-defined] - for tests and benchmarks
    return update


def describe(kernels: str = "auto", precision: str = "float32") -> str:
    """What runs a model's layers in this process, for the run's header: ``oneDNN`` or
    ``XLA (why)``, and a note where ``--precision bfloat16`` falls back to float32."""
    if kernels == "xla":
        return "XLA (--kernels xla)"
    if not onednn_runs(Selection(kernels=kernels)):
        return onednn.status()
    # oneDNN falls back to float32 products on a CPU without bfloat16 instructions; say so,
    # since the run is then neither faster nor numerically the bfloat16 run the flag asked for.
    if precision == "bfloat16" and not onednn.bf16_supported():
        return (
            "oneDNN in float32 (--precision bfloat16 needs a CPU with AVX512_BF16 or AMX; this"
            " one has neither)"
        )
    return "oneDNN"
