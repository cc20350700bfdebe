"""Activation functions by name, plus ``module:function`` for a user's own.

Adding one is a single line in ``ACTIVATIONS``; comparing them is ``--activation NAME``.
A ``module:function`` name is imported only when a user names it (a run folder can never
make springfield import code on its own).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from springfield.errors import SpringfieldError

Activation = Callable[[jax.Array], jax.Array]


def mish(x: jax.Array) -> jax.Array:
    """Mish: ``x * tanh(softplus(x))`` (Misra, 2019)."""
    return x * jnp.tanh(jax.nn.softplus(x))


ACTIVATIONS: dict[str, Activation] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": mish,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "celu": jax.nn.celu,
    "leaky_relu": jax.nn.leaky_relu,
    "hard_swish": jax.nn.hard_swish,
    "relu6": jax.nn.relu6,
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def get_activation(name: str) -> Activation:
    """The activation called ``name``: a key of ``ACTIVATIONS`` or ``package.module:function``."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    if ":" not in name:
        raise SpringfieldError(
            f"--activation {name!r}: unknown; choose one of {', '.join(ACTIVATIONS)}, "
            "or pass your own as module:function (e.g. mypkg.acts:squareplus)."
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpringfieldError(
            f"--activation {name!r}: cannot import module {module_name!r} ({e}). "
            "Check the name and that it is on PYTHONPATH."
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpringfieldError(
            f"--activation {name!r}: module {module_name!r} has no function {attr!r}."
        )
    return fn
