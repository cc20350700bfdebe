"""springfield: train, evaluate and serve image classifiers with JAX and Flax NNX.

The Python API (each name is imported on first use, so ``import springfield`` stays cheap):

- :func:`train` (config or keyword arguments) -> :class:`Run`; :class:`TrainConfig`.
- :func:`load` (a run folder or an exported one) -> :class:`Classifier` with ``.predict(images)``,
  ``.probabilities(images)`` and ``.evaluate(folder)``.
- :func:`lr_find`: the learning-rate range test; :func:`compare`: train every
  combination of some settings and summarise.
- :data:`ACTIVATIONS` / :func:`register_activation` and :data:`OPTIMIZERS` /
  :func:`register_optimizer` / :func:`optimizer_names`: the names ``activation=`` and
  ``optimizer=`` accept, and how to add your own.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

# One version, pyproject.toml's, as installed.
__version__ = importlib.metadata.version("springfield")

if TYPE_CHECKING:
    from springfield.api import Run, compare, lr_find, train
    from springfield.config import PRESETS, TrainConfig
    from springfield.errors import SpringfieldError
    from springfield.inference import Classifier, load
    from springfield.models.activations import ACTIVATIONS, register_activation
    from springfield.training.optim import OPTIMIZERS, optimizer_names, register_optimizer

_EXPORTS = {
    "train": "springfield.api",
    "Run": "springfield.api",
    "lr_find": "springfield.api",
    "compare": "springfield.api",
    "TrainConfig": "springfield.config",
    "PRESETS": "springfield.config",
    "SpringfieldError": "springfield.errors",
    "load": "springfield.inference",
    "Classifier": "springfield.inference",
    "ACTIVATIONS": "springfield.models.activations",
    "register_activation": "springfield.models.activations",
    "OPTIMIZERS": "springfield.training.optim",
    "optimizer_names": "springfield.training.optim",
    "register_optimizer": "springfield.training.optim",
}

__all__ = [
    "ACTIVATIONS",
    "OPTIMIZERS",
    "PRESETS",
    "Classifier",
    "Run",
    "SpringfieldError",
    "TrainConfig",
    "compare",
    "load",
    "lr_find",
    "optimizer_names",
    "register_activation",
    "register_optimizer",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
