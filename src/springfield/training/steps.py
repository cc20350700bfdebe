"""Jit-compiled train and eval steps on pure state (the split/merge pattern).

The model is split once into a static graph definition and pytrees of parameters and other
state (BatchNorm statistics). The steps are plain ``jax.jit`` functions of those pytrees, so
there is no per-step Python traversal of the object graph, the state can be donated, and
the same functions run unchanged on one device or sharded over many.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from springfield.kernels import QUICK_COMPILE, eval_compile_options, optimizer_update
from springfield.parallel import take_rows
from springfield.training.optim import averaged_params


class TrainState(NamedTuple):
    """Everything that changes during training and goes into a checkpoint."""

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any


def eval_params(state: TrainState) -> Any:
    """The parameters to evaluate and predict with: the ``--ema`` average when kept."""
    averaged = averaged_params(state.opt_state)
    return state.params if averaged is None else averaged


def init_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    """Split ``model`` into its graph definition and a fresh :class:`TrainState`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # One compiled program: eager, the optimizer's zeros are ~30 operations each compiled
    # at first use (0.8 s of start-up for resnet's Adam state).
    opt_state = jax.jit(tx.init, compiler_options=QUICK_COMPILE)(params)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, opt_state)


# The model's input: uint8 pixels mapped to [-1, 1] as x * INPUT_SCALE + INPUT_OFFSET.
INPUT_SCALE, INPUT_OFFSET = 2.0 / 255.0, -1.0


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 images ``(B, H, W, 3)`` -> the model's float32 input in [-1, 1]; the train and
    eval steps and the exported model (:mod:`springfield.export_writer`) all use it."""
    # uint8 travels to the device; scaling here fuses into the first convolution's input.
    return images.astype(jnp.float32) * INPUT_SCALE + INPUT_OFFSET


def inference_logits(model: nnx.Module, x: jax.Array, *, tta: bool) -> jax.Array:
    """``model``'s logits for the preprocessed images ``x`` in inference mode; ``tta``:
    test-time augmentation, averaged with those of the mirror images."""
    logits = model(x, train=False)
    if tta:
        logits = 0.5 * (logits + model(x[:, :, ::-1], train=False))
    return logits


def _targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    targets = jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(targets, smoothing) if smoothing else targets


def _num_classes(model: nnx.Module) -> int:
    # Every springfield model ends in a Linear called `head`; an ensemble says it directly.
    n = getattr(model, "num_classes", None)
    return int(n) if n is not None else model.head.out_features


def _losses(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    # log-softmax inside optax: numerically safe, unlike log(softmax(x)).
    return optax.softmax_cross_entropy(logits, _targets(labels, logits.shape[-1], smoothing))


def _partners(key: jax.Array, x: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each example's partner for mixing: the batch (images and targets) in a random order."""
    perm = jax.random.permutation(key, x.shape[0])
    return take_rows(x, perm), take_rows(targets, perm)


def mixup(
    key: jax.Array, x: jax.Array, targets: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """Mixup (Zhang et al., 2018): blend each image and its target with another example of the
    batch, with one weight ``lam ~ Beta(alpha, alpha)`` for the whole batch."""
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha)
    x2, t2 = _partners(k_perm, x, targets)
    return lam * x + (1 - lam) * x2, lam * targets + (1 - lam) * t2


def cutmix(
    key: jax.Array, x: jax.Array, targets: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """CutMix (Yun et al., 2019): paste one random box, of area ``1 - lam`` with
    ``lam ~ Beta(alpha, alpha)``, from another example of the batch into each image; targets
    are mixed by the box's actual (clipped) area. One box for the whole batch."""
    k_lam, k_perm, k_y, k_x = jax.random.split(key, 4)
    _, h, w, _ = x.shape
    lam = jax.random.beta(k_lam, alpha, alpha)
    cut = jnp.sqrt(1.0 - lam)
    cy = jax.random.uniform(k_y) * h
    cx = jax.random.uniform(k_x) * w
    rows, cols = jnp.arange(h)[:, None] + 0.5, jnp.arange(w)[None, :] + 0.5
    box = (jnp.abs(rows - cy) < cut * h / 2) & (jnp.abs(cols - cx) < cut * w / 2)
    x2, t2 = _partners(k_perm, x, targets)
    kept = 1.0 - jnp.mean(box)
    return jnp.where(box[None, :, :, None], x2, x), kept * targets + (1 - kept) * t2


def _is_head(path: tuple) -> bool:
    return bool(path) and getattr(path[0], "key", None) == "head"


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    skip_nonfinite: bool = False,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    class_weights: Any = None,
    mixstyle: float = 0.0,
    update: Any = None,
    frozen: bool = False,
):
    """``train_step(state, batch, key) -> (state, metrics)``.

    ``batch`` holds ``image`` (uint8 NHWC), ``label`` and ``mask``; ``metrics`` holds the
    summed loss, correct count and count over the unmasked examples, so sums over steps are
    exact epoch totals. ``mixup_alpha > 0`` trains on mixup batches (:func:`mixup`); the
    reported loss and accuracy are then those of the mixed batch against the true labels'
    mixed targets and the unmixed labels. ``cutmix_alpha > 0`` does the same with
    :func:`cutmix`; with both, each step picks one of the two by a fair coin.

    ``skip_nonfinite``: for a ``tx`` wrapped in ``optax.apply_if_finite``, which drops the
    parameter update of a step with NaN/inf gradients; the step then also keeps the old
    BatchNorm statistics, which the same bad forward pass would have poisoned.

    ``class_weights`` (one weight per class, e.g. from
    :func:`springfield.data.pipeline.class_weights`): each example's loss is weighted by its
    true class's weight and the batch loss divided by the summed weights, as PyTorch's
    ``CrossEntropyLoss(weight=...)`` does. The reported ``loss_sum`` stays unweighted, so
    train loss reads the same with and without ``--balance loss``.

    ``mixstyle > 0``: the model (a ResNet) mixes feature statistics between the batch's
    images with this chance per batch (:mod:`springfield.models.mixstyle`).

    ``update`` (:func:`springfield.training.optim.build_update`): how the step applies
    ``tx``, ``(grads, opt_state, params) -> (params, opt_state)``; default optax's own.

    ``frozen``: fine-tuning's first phase; the model (one with ImageNet weights) runs its
    body in inference mode, out of the gradient, and only its head learns.

    The step donates ``state``: its buffers are reused for the new state (the optimizer
    updates in place), so the ``state`` passed in cannot be used after the call.
    """
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
    apply_update = optimizer_update(tx, "xla") if update is None else update

    def loss_fn(params, rest, batch, key):
        if frozen:
            # Only the head is differentiated: the body's backward pass is never traced.
            params = jax.tree_util.tree_map_with_path(
                lambda path, v: v if _is_head(path) else jax.lax.stop_gradient(v), params
            )
        # copy=True: fresh Variables at this trace level, so BatchNorm may update its stats.
        model = nnx.merge(graphdef, params, rest, copy=True)
        x = preprocess(batch["image"])
        mix_key, drop_key = jax.random.split(key)
        targets = _targets(batch["label"], _num_classes(model), label_smoothing)
        if mixup_alpha > 0 and cutmix_alpha > 0:
            coin_key, mix_key = jax.random.split(mix_key)
            x, targets = jax.lax.cond(
                jax.random.bernoulli(coin_key),
                lambda: mixup(mix_key, x, targets, mixup_alpha),
                lambda: cutmix(mix_key, x, targets, cutmix_alpha),
            )
        elif mixup_alpha > 0:
            x, targets = mixup(mix_key, x, targets, mixup_alpha)
        elif cutmix_alpha > 0:
            x, targets = cutmix(mix_key, x, targets, cutmix_alpha)
        # MixStyle draws from a stream of its own, so dropout's numbers stay as they were;
        # only the ResNets take the option, so others are called without it.
        rngs = nnx.Rngs(dropout=drop_key, mixstyle=jax.random.fold_in(drop_key, 1))
        extra = {"mixstyle": mixstyle} if mixstyle else {}
        if frozen:
            extra["frozen"] = True
        logits = model(x, train=True, rngs=rngs, **extra)
        mask = batch["mask"]
        losses = optax.softmax_cross_entropy(logits, targets)
        if logits.ndim == 3:
            # An ensemble's members, (K, B, classes): each member learns from its own loss;
            # the metrics describe their averaged prediction, as in evaluation.
            losses = losses.mean(axis=0)
            logits = jax.nn.log_softmax(logits).mean(axis=0)
        if weights is None:
            loss = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        else:
            # A one-hot product, not a gather: a gather of sharded labels needs its output
            # sharding spelled out, this follows the batch's on its own.
            w = mask * (jax.nn.one_hot(batch["label"], weights.shape[0]) @ weights)
            total = jnp.sum(w)
            loss = jnp.sum(losses * w) / jnp.where(total > 0, total, 1.0)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return loss, (new_rest, logits, losses)

    # Donated: XLA writes the new parameters and optimizer state over the old ones instead of
    # into fresh buffers (refcnn float32 at 64 px: 7% faster), and an in-place update needs it.
    @partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch: dict, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        grads, (rest, logits, losses) = jax.grad(loss_fn, has_aux=True)(
            state.params, state.rest, batch, key
        )
        if skip_nonfinite:
            # Finite gradients can come with overflowed batch statistics (the variance of
            # huge activations is inf, the normalised output then 0): such a step counts,
            # and is skipped, as a non-finite one.
            stats_ok = _all_finite(rest)
            grads = jax.tree.map(lambda g: jnp.where(stats_ok, g, jnp.nan), grads)
        params, opt_state = apply_update(grads, state.opt_state, state.params)
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


def make_eval_step(graphdef: Any, *, tta: bool = False):
    """``eval_step(params, rest, batch) -> (logits, per-example loss)`` in inference mode.

    ``tta``: average the logits of each image and its mirror image (test-time augmentation).
    """

    def eval_step(params: Any, rest: Any, batch: dict):
        model = nnx.merge(graphdef, params, rest)
        logits = inference_logits(model, preprocess(batch["image"]), tta=tta)
        return logits, _losses(logits, batch["label"], 0.0)

    # XLA:CPU's fastest fusion choice depends on the batch size: see eval_compile_options.
    on_cpu = jax.default_backend() == "cpu"
    jitted: dict[int, Any] = {}

    def dispatch(params: Any, rest: Any, batch: dict):
        n = batch["image"].shape[0]
        if n not in jitted:
            options = eval_compile_options(n) if on_cpu else {}
            jitted[n] = jax.jit(eval_step, compiler_options=options or None)
        return jitted[n](params, rest, batch)

    return dispatch


@partial(jax.jit, compiler_options=QUICK_COMPILE)
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point number in ``tree`` is finite (one device reduction)."""
    return _all_finite(tree)


def _all_finite(tree: Any) -> jax.Array:
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)
