"""The layers springfield's models are built from: flax's, with their operations taken from
:mod:`springfield.kernels` when the model is built (``--kernels``), same parameters and
maths whichever implementation runs them.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from springfield import kernels

# Models built inside use XLA's plain operations only, which jax.export can serialise.
xla_convolutions = kernels.portable


def Conv(  # noqa: N802 - a module constructor
    in_features: int,
    out_features: int,
    kernel_size: tuple[int, ...],
    materialise: bool = True,
    **kwargs: Any,
) -> nnx.Conv:
    """``nnx.Conv`` with :func:`springfield.kernels.conv` as its convolution (same parameters
    and maths); ``materialise=False`` for convolutions whose input XLA materialises anyway
    (see :mod:`springfield.kernels.xla`). Where the model hands bfloat16 activations on
    (:func:`activation_dtype`), a bfloat16 input reaches the convolution as it is, not
    promoted to the weights' float32."""
    if activation_dtype() is not None:
        kwargs.setdefault("promote_dtype", keep_input_type)
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size,
        conv_general_dilated=kernels.conv(materialise),
        **kwargs,
    )


def conv_act_pool(conv: nnx.Conv, act: Any, x: jax.Array, input_grad: bool = True) -> jax.Array:
    """``avg_pool(act(conv(x)), 2x2, stride 2)``, the block of ``refcnn`` and ``seed``
    (:func:`springfield.kernels.conv_block`). ``input_grad=False`` (a first block, whose
    input is the image) stops the gradient at ``x``."""
    return kernels.conv_block(conv, act, x, input_grad=input_grad)


def norm_impl() -> Any:
    """The BatchNorm (+ activation) function of the model built now,
    ``(bn, x, *, train, act=None) -> act(bn(x))`` (:func:`springfield.kernels.norm`)."""
    return kernels.norm()


def Dense(in_features: int, out_features: int, **kwargs: Any) -> nnx.Linear:  # noqa: N802
    """``nnx.Linear`` (same parameters and maths), its product from
    :func:`springfield.kernels.dense_dot` where that gives one (bfloat16 products under
    ``--precision bfloat16``), a bfloat16 input then reaching it as it is."""
    dot = kernels.dense_dot()
    if dot is not None:
        kwargs.setdefault("dot_general", dot)
        kwargs.setdefault("promote_dtype", keep_input_type)
    return nnx.Linear(in_features, out_features, **kwargs)


def keep_input_type(args: tuple, dtype: Any = None, **kwargs: Any) -> tuple:
    """An ``nnx`` ``promote_dtype`` that promotes nothing: the layer's operation chooses the
    arithmetic's type itself."""
    # The convolution (or product) casts what it multiplies; the bias promotes the output.
    return args


def activation_dtype() -> Any:
    """The type the layers of a model built now hand on between them: ``bfloat16`` or None
    (the layers' own float32); see :func:`springfield.kernels.activation_dtype`."""
    return kernels.activation_dtype()
