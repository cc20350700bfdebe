"""Activation functions by name, plus ``module:function`` for a user's own.

An activation is any function from an array to an array of the same shape. Adding one is a
line in ``ACTIVATIONS`` here, or from your own code (a notebook)::

    @springfield.register_activation
    def squareplus(x):
        return (x + jnp.sqrt(x * x + 4)) / 2

after which ``activation="squareplus"`` trains with it in this process. From the command line
(another process) name it as ``module:function`` (``--activation mypkg.acts:squareplus``):
that module is imported only when a user names it (a run folder can never make springfield
import code on its own).
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
_BUILTIN = frozenset(ACTIVATIONS)


def register_activation(fn: Activation | None = None, *, name: str | None = None):
    """Add ``fn`` to :data:`ACTIVATIONS` under ``name`` (default: its ``__name__``).

    Use as ``register_activation(fn)``, ``register_activation(fn, name="sq")`` or as a
    decorator, with or without ``name=``. Returns ``fn``. Re-registering a name replaces it;
    the names springfield ships with cannot be replaced.
    """

    def add(f: Activation) -> Activation:
        key = name or getattr(f, "__name__", None)
        if not callable(f) or not key or key == "<lambda>":
            raise SpringfieldError(
                f"register_activation({f!r}): pass a function, and name= for a lambda."
            )
        if ":" in key:
            raise SpringfieldError(f"register_activation: name {key!r} may not contain ':'.")
        if key in _BUILTIN and ACTIVATIONS.get(key) is not f:
            raise SpringfieldError(
                f"register_activation: {key!r} is one of springfield's own; choose another name."
            )
        ACTIVATIONS[key] = f
        return f

    return add if fn is None else add(fn)


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
