"""Everything springfield does for speed on a CPU, behind one small interface.

The models and the train step ask this package for each operation they need, and get
oneDNN's implementation (:mod:`.onednn`: C++ kernels compiled on first use and called
through XLA's FFI) where it was asked for and can run, else XLA's (:mod:`.xla`), the
reference, with the same maths up to summation order:

- :func:`conv`, :func:`conv_block` (conv + bias + ReLU + 2x2 average pool),
  :func:`depthwise_conv`, :func:`norm` (BatchNorm + activation), :func:`dense_dot` and
  :func:`activation_dtype`: chosen when a layer is built;
- :func:`optimizer_update`: the train step's optimizer update, Adam and AdamW as one fused
  pass (:mod:`.fused_adam`) with optax's numbers bit for bit;
- :func:`eval_compile_options` and :data:`QUICK_COMPILE`: XLA compiler options per program,
  and :mod:`.tuning`: the process's XLA flags, huge pages and compilation cache;
- :func:`describe`: what runs, in a few words, for the run's header.

Which implementation runs is ``--kernels`` (``auto``, ``xla`` or ``onednn``, saved in the
run's config.json), set around model building with :func:`use`, which also takes the
precision and the finer :class:`KernelOptions` of tests and benchmarks; :func:`portable`
builds models that ``jax.export`` can serialise. Importing this package does not import JAX
(the command re-executes itself before it does): the names above load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from springfield.kernels.selection import (
    KERNELS,
    PRECISIONS,
    KernelOptions,
    Selection,
    check_kernels,
    portable,
    selected,
    use,
    use_selection,
)

_LAZY = {
    "activation_dtype": "dispatch",
    "conv": "dispatch",
    "conv_block": "dispatch",
    "depthwise_conv": "dispatch",
    "dense_dot": "dispatch",
    "describe": "dispatch",
    "norm": "dispatch",
    "onednn_runs": "dispatch",
    "optimizer_update": "dispatch",
    "eval_compile_options": "tuning",
    "QUICK_COMPILE": "tuning",
}

__all__ = [
    "KERNELS",
    "PRECISIONS",
    "KernelOptions",
    "Selection",
    "check_kernels",
    "portable",
    "selected",
    "use",
    "use_selection",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
