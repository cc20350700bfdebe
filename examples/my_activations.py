"""A hand-written activation, as a user writes one: ``--activation my_activations:squareplus``
(with this folder on PYTHONPATH)."""

import jax
import jax.numpy as jnp


def squareplus(x: jax.Array, b: float = 4.0) -> jax.Array:
    """Squareplus (Barron, 2021): ``(x + sqrt(x^2 + b)) / 2``, a smooth ReLU from a square
    root instead of exponentials."""
    return (x + jnp.sqrt(x * x + b)) / 2
