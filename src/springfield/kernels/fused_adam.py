"""optax's Adam and AdamW as one in-place pass over each parameter, with the same numbers.

Under XLA:CPU, ``optax.adam`` followed by ``optax.apply_updates`` is three loops per
parameter: the first moment, the second moment, then the parameter from both, read back
from memory; the last is bound by its two divisions and square root. A step of ``refcnn``
(a 2.1M-weight dense layer at 64 px) spent 5.4 of its 18 ms there in bfloat16. The kernel
``springfield/kernels/onednn/adam.cc`` reads each gradient, moment and parameter once and writes
the moments and parameter back in place (the train step donates its state), with optax's
arithmetic operation for operation: the parameters and the optimizer state come out bit for
bit as optax's (tests/test_fused_adam.py), and the state keeps optax's structure, so
checkpoints, ``springfield eval`` and resuming see no difference.

:func:`make_fused_update` gives the update for what
:func:`springfield.training.optim.make_optimizer` builds for ``adam`` (with ``--weight-decay``
as L2) and ``adamw``, or None where it cannot run: another optimizer, several devices, a
CPU without AVX2 and FMA, no compiled kernels. The train step gets it through
:func:`springfield.kernels.optimizer_update`, which also decides whether it is wanted
(``--kernels``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from springfield.kernels.onednn import adam as onednn

# (grads, opt_state, params) -> (params, opt_state), or None to use optax's update instead.
FusedUpdate = Callable[[Any, Any, Any], "tuple[Any, Any] | None"]


def make_fused_update(
    name: str, schedule: optax.Schedule, *, weight_decay: float
) -> FusedUpdate | None:
    """The update of optax's ``adam`` / ``adamw`` (with its default hyperparameters) as
    :func:`springfield.training.optim.make_optimizer` builds it for ``name``, as one kernel
    call per step; None for any other optimizer or where the kernel cannot run (see the
    module docstring). A name registered over optax's is the caller's to rule out
    (:func:`~springfield.training.optim.build_update` does).

    The returned function gives None (use optax's update) for parameters that are not all
    float32 or an optimizer state of another shape, so it is always safe to try."""
    if name not in ("adam", "adamw"):
        return None
    if not onednn.adam_available():
        return None
    defaults = {k: v.default for k, v in inspect.signature(getattr(optax, name)).parameters.items()}
    if defaults.get("eps_root", 0.0) != 0.0 or defaults.get("nesterov", False):
        return None
    b1, b2, eps = float(defaults["b1"]), float(defaults["b2"]), float(defaults["eps"])
    if name == "adamw":
        decay = "decoupled"
    else:
        decay = "l2" if weight_decay else "none"

    def update(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any] | None:
        adam = find_state(opt_state, optax.ScaleByAdamState)
        sched = find_state(opt_state, optax.ScaleByScheduleState)
        if adam is None or sched is None:
            return None
        g, treedef = jax.tree.flatten(grads)
        try:
            p, m, v = (treedef.flatten_up_to(t) for t in (params, adam.mu, adam.nu))
        except ValueError:
            return None
        if not all(x.dtype == jnp.float32 for x in (*g, *p, *m, *v)):
            return None
        # The scalars exactly as optax computes them (bias corrections with the incremented
        # count; the schedule at its own count, before the increment).
        count = optax.safe_increment(adam.count)
        hyper = jnp.stack(
            [
                -jnp.asarray(schedule(sched.count), jnp.float32),
                (1 - b1**count).astype(jnp.float32),
                (1 - b2**count).astype(jnp.float32),
            ]
        )
        new = onednn.adam_update(
            hyper,
            list(zip(g, m, v, p, strict=True)),
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            decay=decay,
        )
        mu, nu, new_params = (treedef.unflatten([leaf[i] for leaf in new]) for i in range(3))
        new_adam = adam._replace(count=count, mu=mu, nu=nu)
        return new_params, _replace_states(opt_state, new_adam)

    return update


def _replace_states(state: Any, adam: optax.ScaleByAdamState) -> Any:
    """``state`` after one step: ``adam`` in place of the Adam state, every schedule's count
    incremented, the stateless parts as they were."""
    if isinstance(state, optax.ScaleByAdamState):
        return adam
    if isinstance(state, optax.ScaleByScheduleState):
        return state._replace(count=optax.safe_increment(state.count))
    if isinstance(state, tuple):
        parts = [_replace_states(s, adam) for s in state]
        return state._make(parts) if hasattr(state, "_make") else tuple(parts)
    return state


def find_state(state: Any, kind: type) -> Any:
    """The first ``kind`` state in an optimizer state, looking inside chains and wrapper
    states (tuples and named tuples, nested), or None."""
    if isinstance(state, kind):
        return state
    if isinstance(state, tuple):
        for part in state:
            found = find_state(part, kind)
            if found is not None:
                return found
    return None
