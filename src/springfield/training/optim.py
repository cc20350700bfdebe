"""Optimizers and learning-rate schedules from optax, by name."""

from __future__ import annotations

import inspect

import optax

from springfield.errors import SpringfieldError

# Optimizers whose own weight_decay argument is the decoupled (AdamW-style) kind.
_DECOUPLED = {"adamw", "lion", "lamb", "adan", "novograd"}
_ALIASES = {
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
}


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


def make_optimizer(
    name: str, schedule: optax.Schedule, *, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """Optimizer ``name`` (an optax function such as ``adam`` or an alias such as
    ``momentum``) driven by ``schedule``.

    Weight decay is decoupled for optimizers that define it that way (adamw, lion, lamb);
    for all others it is added to the gradient as L2 on every parameter, as the tutorial
    and ``torch.optim`` do.
    """
    if name in _ALIASES:
        tx = _ALIASES[name](schedule)
    elif name in _DECOUPLED:
        return getattr(optax, name)(schedule, weight_decay=weight_decay)
    else:
        fn = getattr(optax, name, None) if not name.startswith("_") else None
        if fn is None or name not in _optax_names():
            choices = ", ".join([*_ALIASES, *_optax_names()])
            raise SpringfieldError(f"--optimizer {name!r}: unknown; choose one of {choices}.")
        tx = fn(schedule)
    if weight_decay:
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx
