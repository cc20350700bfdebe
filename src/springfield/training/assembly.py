"""One config -> the model, optimizer, initial state and jitted steps that train it.

``springfield train`` and the learning-rate finder both build their steps here, so a
setting that changes the loss (label smoothing, mixup, class weights, ...) changes it for
both: the finder sweeps the loss that training then minimises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import optax
from flax import nnx

from springfield import parallel
from springfield.config import TrainConfig
from springfield.data.pipeline import loss_weights
from springfield.models import model_of_config
from springfield.training.inputs import RunData
from springfield.training.optim import build_fused_update, build_optimizer
from springfield.training.steps import TrainState, init_state, make_eval_step, make_train_step


@dataclass(frozen=True)
class Assembly:
    """What :func:`assemble` builds: ``state`` is replicated over the mesh, ``train_step``
    and ``eval_step`` are those of :mod:`springfield.training.steps`."""

    model: nnx.Module
    tx: optax.GradientTransformation
    graphdef: Any
    state: TrainState
    train_step: Any
    eval_step: Any


def class_weights_of(cfg: TrainConfig, data: RunData) -> Any:
    """The loss's per-class weights: ``--balance loss``'s for the training split, or None."""
    if cfg.balance != "loss":
        return None
    return loss_weights(data.train.labels, len(data.classes))


def assemble(
    cfg: TrainConfig, data: RunData, schedule: optax.Schedule, mesh: jax.sharding.Mesh
) -> Assembly:
    """A fresh model of ``cfg`` for ``data``'s classes, its optimizer on ``schedule``, the
    initial state (replicated over ``mesh``) and the train and eval steps."""
    model = model_of_config(cfg, len(data.classes))
    tx = build_optimizer(cfg, schedule)
    graphdef, state = init_state(model, tx)
    state = parallel.replicate(state, mesh)
    train_step = make_train_step(
        graphdef,
        tx,
        label_smoothing=cfg.label_smoothing,
        skip_nonfinite=cfg.skip_nonfinite,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        class_weights=class_weights_of(cfg, data),
        mixstyle=cfg.mixstyle,
        fused_update=build_fused_update(cfg, schedule),
    )
    eval_step = make_eval_step(graphdef, tta=cfg.tta)
    return Assembly(model, tx, graphdef, state, train_step, eval_step)
