"""Jit-compiled train and eval steps on pure state (the split/merge pattern).

The model is split once into a static graph definition and pytrees of parameters and other
state (BatchNorm statistics). The steps are plain ``jax.jit`` functions of those pytrees, so
there is no per-step Python traversal of the object graph, the state can be donated, and
the same functions run unchanged on one device or sharded over many.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class TrainState(NamedTuple):
    """Everything that changes during training and goes into a checkpoint."""

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any


def init_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    """Split ``model`` into its graph definition and a fresh :class:`TrainState`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))


def _normalise(images: jax.Array) -> jax.Array:
    # uint8 travels to the device; scaling here fuses into the first convolution's input.
    return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def _losses(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    # log-softmax inside optax: numerically safe, unlike log(softmax(x)).
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    skip_nonfinite: bool = False,
):
    """``train_step(state, batch, key) -> (state, metrics)``.

    ``batch`` holds ``image`` (uint8 NHWC), ``label`` and ``mask``; ``metrics`` holds the
    summed loss, correct count and count over the unmasked examples, so sums over steps are
    exact epoch totals.

    ``skip_nonfinite``: for a ``tx`` wrapped in ``optax.apply_if_finite``, which drops the
    parameter update of a step with NaN/inf gradients; the step then also keeps the old
    BatchNorm statistics, which the same bad forward pass would have poisoned.
    """

    def loss_fn(params, rest, batch, key):
        # copy=True: fresh Variables at this trace level, so BatchNorm may update its stats.
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits = model(_normalise(batch["image"]), train=True, rngs=nnx.Rngs(dropout=key))
        mask = batch["mask"]
        losses = _losses(logits, batch["label"], label_smoothing)
        loss = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return loss, (new_rest, logits, losses)

    @jax.jit
    def train_step(state: TrainState, batch: dict, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        grads, (rest, logits, losses) = jax.grad(loss_fn, has_aux=True)(
            state.params, state.rest, batch, key
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
            rest = jax.tree.map(lambda new, old: jnp.where(finite, new, old), rest, state.rest)
        mask = batch["mask"]
        correct = (jnp.argmax(logits, -1) == batch["label"]) * mask
        metrics = {
            "loss_sum": jnp.sum(losses * mask),
            "correct": jnp.sum(correct),
            "count": jnp.sum(mask),
        }
        return TrainState(state.step + 1, params, rest, opt_state), metrics

    return train_step


def make_eval_step(graphdef: Any):
    """``eval_step(params, rest, batch) -> (logits, per-example loss)`` in inference mode."""

    @jax.jit
    def eval_step(params: Any, rest: Any, batch: dict):
        model = nnx.merge(graphdef, params, rest)
        logits = model(_normalise(batch["image"]), train=False)
        return logits, _losses(logits, batch["label"], 0.0)

    return eval_step


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point number in ``tree`` is finite (one device reduction)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)
