"""Optimizers and learning-rate schedules from optax, by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from springfield import kernels
from springfield.errors import SpringfieldError
from springfield.kernels import QUICK_COMPILE
from springfield.kernels.fused_adam import find_state

if TYPE_CHECKING:
    from springfield.config import TrainConfig

# Optimizers whose own weight_decay argument is the decoupled (AdamW-style) kind.
_DECOUPLED = {"adamw", "lion", "lamb", "adan", "novograd"}
OptimizerFactory = Callable[[optax.Schedule], optax.GradientTransformation]
# Named optimizers beyond optax's own functions: ``name -> factory(schedule)``. Add yours
# with :func:`register_optimizer`; every optax optimizer is available by name without it.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
}


def register_optimizer(
    fn: OptimizerFactory | None = None, *, name: str | None = None
) -> OptimizerFactory | Callable[[OptimizerFactory], OptimizerFactory]:
    """Add an optimizer, ``factory(schedule) -> optax.GradientTransformation``, under
    ``name`` (default: its ``__name__``), e.g.::

        @springfield.register_optimizer
        def sgd_half(lr):
            return optax.sgd(lr, momentum=0.5)

    ``--weight-decay`` is then added to its gradient as L2. Use as a function or a
    decorator; returns the factory.
    """

    def add(f: OptimizerFactory) -> OptimizerFactory:
        key = name or getattr(f, "__name__", None)
        if not callable(f) or not key or key == "<lambda>":
            raise SpringfieldError(
                f"register_optimizer({f!r}): pass a function, and name= for a lambda."
            )
        OPTIMIZERS[key] = f
        return f

    return add if fn is None else add(fn)


def optimizer_names() -> list[str]:
    """Every name ``--optimizer`` accepts: the registered ones, then optax's."""
    return [*OPTIMIZERS, *(n for n in _optax_names() if n not in OPTIMIZERS)]


def _optax_names() -> list[str]:
    names = []
    for name, fn in vars(optax).items():
        # lbfgs needs the loss value and scale_by_* are building blocks, not optimizers.
        if name.startswith(("_", "scale_by")) or name == "lbfgs" or not inspect.isfunction(fn):
            continue
        params = inspect.signature(fn).parameters
        if "learning_rate" in params and fn.__annotations__.get("return") in (
            "base.GradientTransformationExtraArgs",
            "base.GradientTransformation",
            optax.GradientTransformationExtraArgs,
            optax.GradientTransformation,
        ):
            names.append(name)
    return sorted(names)


def make_schedule(name: str, *, lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps, lr * 1e-3)
    if name == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, lr)
    if name == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, warmup_steps),
                optax.linear_schedule(lr, 0.0, total_steps - warmup_steps),
            ],
            [warmup_steps],
        )
    raise SpringfieldError(
        f"--schedule {name!r}: unknown; choose constant, cosine, onecycle or linear."
    )


def lr_of_step(schedule: optax.Schedule) -> Callable[[int], float]:
    """``schedule`` as a float of a Python int step, for logs and metrics. Evaluated eagerly,
    an optax schedule dispatches a dozen tiny operations each compiled at its first call
    (1.2 s before the first epoch's line); compiled once as one program it is milliseconds."""
    compiled = jax.jit(schedule, compiler_options=QUICK_COMPILE)
    return lambda step: float(compiled(step))


def make_optimizer(
    name: str, schedule: optax.Schedule, *, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """Optimizer ``name`` (an optax function such as ``adam`` or an alias such as
    ``momentum``) driven by ``schedule``.

    Weight decay is decoupled for optimizers that define it that way (adamw, lion, lamb);
    for all others it is added to the gradient as L2 on every parameter, as the tutorial
    and ``torch.optim`` do.
    """
    if name in OPTIMIZERS:
        tx = OPTIMIZERS[name](schedule)
    elif name in _DECOUPLED:
        return getattr(optax, name)(schedule, weight_decay=weight_decay)
    else:
        fn = getattr(optax, name, None) if not name.startswith("_") else None
        if fn is None or name not in _optax_names():
            choices = ", ".join(optimizer_names())
            raise SpringfieldError(f"--optimizer {name!r}: unknown; choose one of {choices}.")
        tx = fn(schedule)
    if weight_decay:
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx


class ParamsEmaState(NamedTuple):
    """State of :func:`params_ema`: the number of updates seen and the averaged parameters."""

    count: jax.Array
    ema: optax.Params


def params_ema(decay: float) -> optax.GradientTransformation:
    """Keep an exponential moving average of the parameters in the optimizer state.

    Goes last in a chain: it passes ``updates`` through unchanged and averages
    ``params + updates``. The decay warms up as ``min(decay, (1 + t) / (10 + t))`` so
    that the average does not remember the random initialisation for thousands of steps.
    Living in the optimizer state, the average is checkpointed, restored, sharded and
    skipped on non-finite steps (``optax.apply_if_finite``) like any other optimizer
    state. Read it with :func:`averaged_params`.
    """

    def init(params: optax.Params) -> ParamsEmaState:
        return ParamsEmaState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates, state: ParamsEmaState, params=None):
        if params is None:
            raise ValueError("params_ema needs the parameters: call tx.update(g, s, params).")
        t = state.count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema, new)
        return updates, ParamsEmaState(state.count + 1, ema)

    return optax.GradientTransformation(init, update)


def averaged_params(opt_state: Any) -> optax.Params | None:
    """The parameter average kept by :func:`params_ema` in ``opt_state``, or None."""
    state = find_state(opt_state, ParamsEmaState)
    return None if state is None else state.ema


@dataclass(frozen=True)
class LayerRates:
    """A fine-tune's learning rates by layer group: ``schedules[g]`` drives the parameters
    that ``group_of`` (a model's ``layer_group``) puts in group ``g``, the earliest layers
    first and the head last. The body's schedules are 0 for the first ``frozen_steps``."""

    schedules: tuple[optax.Schedule, ...]
    group_of: Callable[[tuple[str, ...]], int]
    frozen_steps: int = 0


def layer_multipliers(groups: int, lr_mult: float) -> list[float]:
    """fastai's ``slice(lr / lr_mult, lr)`` over ``groups`` groups: geometric from
    ``1 / lr_mult`` for the earliest to 1 for the head."""
    if groups == 1:
        return [1.0]
    return [lr_mult ** -((groups - 1 - g) / (groups - 1)) for g in range(groups)]


def finetune_rates(
    cfg: TrainConfig,
    group_of: Callable[[tuple[str, ...]], int],
    groups: int,
    *,
    steps_per_epoch: int,
    total_steps: int,
) -> LayerRates:
    """fastai's ``fine_tune``: ``--freeze-epochs`` of ``--schedule`` at ``--lr`` for the head
    alone, then every layer on a schedule of its own over the remaining steps, at half
    ``--lr`` for the head and ``--lr-mult`` times less for the earliest layers."""
    frozen = min(cfg.freeze_epochs, cfg.epochs - 1) * steps_per_epoch if cfg.epochs > 1 else 0
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    first = make_schedule(cfg.schedule, lr=cfg.lr, total_steps=frozen, warmup_steps=warmup)
    out = []
    for g, m in enumerate(layer_multipliers(groups, cfg.lr_mult)):
        rest = make_schedule(
            cfg.schedule,
            lr=0.5 * cfg.lr * m if frozen else cfg.lr * m,
            total_steps=total_steps - frozen,
            warmup_steps=warmup,
        )
        start = first if g == groups - 1 else optax.constant_schedule(0.0)
        out.append(optax.join_schedules([start, rest], [frozen]) if frozen else rest)
    return LayerRates(tuple(out), group_of, frozen)


def scaled_rates(
    cfg: TrainConfig,
    schedule: optax.Schedule,
    group_of: Callable[[tuple[str, ...]], int],
    groups: int,
) -> LayerRates:
    """``schedule`` for the head and ``--lr-mult``'s fractions of it for the earlier layers,
    nothing frozen: what the learning-rate finder sweeps for a fine-tune."""

    def times(m: float) -> optax.Schedule:
        return lambda step: m * schedule(step)

    scaled = [times(m) for m in layer_multipliers(groups, cfg.lr_mult)]
    return LayerRates(tuple(scaled), group_of, 0)


def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def build_optimizer(
    cfg: TrainConfig, schedule: optax.Schedule, rates: LayerRates | None = None
) -> optax.GradientTransformation:
    """The optimizer a run of ``cfg`` trains with: ``--optimizer`` with ``--weight-decay``,
    then the ``--ema`` average, all inside ``--skip-nonfinite``'s guard. Evaluation builds
    the same one to restore a checkpoint's optimizer state. With ``rates`` (a fine-tune),
    each layer group has an optimizer of its own on its schedule instead of ``schedule``."""
    if rates is None:
        tx = make_optimizer(cfg.optimizer, schedule, weight_decay=cfg.weight_decay)
    else:
        tx = optax.multi_transform(
            {
                g: make_optimizer(cfg.optimizer, s, weight_decay=cfg.weight_decay)
                for g, s in enumerate(rates.schedules)
            },
            lambda params: jax.tree_util.tree_map_with_path(
                lambda path, _: rates.group_of(_path_names(path)), params
            ),
        )
    if cfg.ema:
        if not 0.0 < cfg.ema < 1.0:
            raise SpringfieldError(f"--ema {cfg.ema}: use a decay between 0 and 1, e.g. 0.999.")
        tx = optax.chain(tx, params_ema(cfg.ema))
    if cfg.skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
    return tx


def build_update(
    cfg: TrainConfig, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """How the train step applies :func:`build_optimizer`'s ``tx``: ``(grads, opt_state,
    params) -> (params, opt_state)`` from :func:`springfield.kernels.optimizer_update`, with
    ``--kernels``. The optimizer's name and ``schedule`` are passed on only where ``tx`` is
    optax's ``--optimizer`` alone (no ``--ema``, ``--skip-nonfinite`` or layer groups), so
    that an update written for that optimizer may stand in for it."""
    # A name registered with register_optimizer is the user's own, whatever optax calls it.
    # A fine-tune's layer groups each have an optimizer of their own (optax.multi_transform).
    from springfield.models import starts_pretrained

    if cfg.ema or cfg.skip_nonfinite or cfg.optimizer in OPTIMIZERS or starts_pretrained(cfg):
        return kernels.optimizer_update(tx, cfg.kernels)
    return kernels.optimizer_update(
        tx, cfg.kernels, name=cfg.optimizer, schedule=schedule, weight_decay=cfg.weight_decay
    )
