"""Several copies of a model trained side by side and averaged: ``--ensemble K``.

Each member starts from its own random weights and is trained on its own loss (the train
step averages the members' losses), on the same batches. Members trained independently
make partly different mistakes, so their averaged prediction is usually better than any
one of them trained as long; training the average itself would let the members co-adapt
and lose that. Each member costs a whole model's compute: on real Simpsons frames an
ensemble of 2 for half the epochs tied one model for all of them (docs/results.md).

In training mode the ensemble returns every member's logits, ``(K, B, classes)``; in
inference mode one ``(B, classes)`` array: the mean of the members' log-probabilities (a
normalised geometric mean of their probabilities), so evaluation, TTA and prediction treat
an ensemble like any other model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Ensemble(nnx.Module):
    """``K`` member models with the same architecture and different initial weights."""

    def __init__(self, members: list[nnx.Module]) -> None:
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = nnx.List(members)
        # The train step sizes its one-hot targets from this, as it does from a model's head.
        self.num_classes = int(members[0].head.out_features)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None, **kw
    ) -> jax.Array:
        # A Python loop, not nnx.vmap: on CPU the members' convolutions run one after another
        # either way, and a loop keeps each member's BatchNorm state plain. ``kw``: a member
        # model's own options (the ResNets' ``mixstyle``).
        logits = [m(x, train=train, rngs=rngs, **kw) for m in self.members]
        if train:
            return jnp.stack(logits)
        return jnp.mean(jnp.stack([jax.nn.log_softmax(z) for z in logits]), axis=0)
