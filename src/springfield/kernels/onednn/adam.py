"""The fused Adam/AdamW step of every parameter in one pass (``adam.cc``), used by
:mod:`springfield.kernels.fused_adam`."""

from __future__ import annotations

import jax
import numpy as np

from springfield.kernels.onednn.library import NAME, load, one_cpu_device

_ADAM_DECAY = {"none": 0, "l2": 1, "decoupled": 2}


def adam_available() -> bool:
    """Whether the fused Adam kernel (``adam.cc``) can run here: one CPU device (a custom call
    cannot be split across devices), the library loads, and the CPU has AVX2 and FMA (XLA
    contracts optax's expressions into fused multiply-adds there, which the kernel
    reproduces)."""
    if not one_cpu_device():
        return False
    lib, _ = load()
    return lib is not None and lib.springfield_adam_isa() > 0


def adam_update(
    hyper: jax.Array,
    leaves: list[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    decay: str,
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """One Adam step for every ``(gradient, m, v, parameter)`` of ``leaves`` (float32) in one
    call: the new ``(m, v, parameter)`` of each, written over the old ones' buffers.
    ``hyper`` is ``[-learning rate, 1 - b1^t, 1 - b2^t]`` (float32); ``decay`` says where
    ``weight_decay`` enters: ``none``, ``l2`` (added to the gradient) or ``decoupled``
    (AdamW)."""
    args = [x for leaf in leaves for x in leaf]
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype) for leaf in leaves for x in leaf[1:]]
    # Argument 0 is hyper; then (g, m, v, p) per leaf: m, v, p become results 3k .. 3k + 2.
    aliases = {1 + 4 * k + j: 3 * k + j - 1 for k in range(len(leaves)) for j in (1, 2, 3)}
    results = jax.ffi.ffi_call(NAME + "adam", out, input_output_aliases=aliases)(
        hyper,
        *args,
        b1=np.float32(b1),
        ob1=np.float32(1 - b1),
        b2=np.float32(b2),
        ob2=np.float32(1 - b2),
        eps=np.float32(eps),
        wd=np.float32(weight_decay),
        decay=np.int64(_ADAM_DECAY[decay]),
    )
    return [tuple(results[3 * k : 3 * k + 3]) for k in range(len(leaves))]
