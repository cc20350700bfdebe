"""One config -> the model, optimizer, schedule, initial state and jitted steps that train it.

``springfield train``, the time budget's probe and the learning-rate finder build their steps
here, so a setting that changes the loss (label smoothing, mixup, class weights, ...) changes
it for all: the finder sweeps the loss that training then minimises. Loading a trained run
(eval, predict, serve, export) builds its model and optimizer here too.
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
from springfield.models import model_of_config, starts_pretrained
from springfield.training.inputs import RunData
from springfield.training.optim import (
    LayerRates,
    build_optimizer,
    build_update,
    finetune_rates,
    make_schedule,
    scaled_rates,
)
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
    schedule: optax.Schedule
    """The head's learning rate by step (for logs)."""
    frozen_step: Any = None
    """A fine-tune's train step for its first ``frozen_steps`` steps (head only), or None."""
    frozen_steps: int = 0


def class_weights_of(cfg: TrainConfig, data: RunData) -> Any:
    """The loss's per-class weights: ``--balance loss``'s for the training split, or None."""
    if cfg.balance != "loss":
        return None
    return loss_weights(data.train.labels, len(data.classes))


def run_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate by step of a run of ``cfg`` (``--schedule``, ``--lr``, ``--epochs``,
    ``--warmup-epochs``)."""
    return make_schedule(
        cfg.schedule,
        lr=cfg.lr,
        total_steps=steps_per_epoch * cfg.epochs,
        warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
    )


def model_and_optimizer(
    cfg: TrainConfig,
    num_classes: int,
    schedule: optax.Schedule,
    *,
    steps_per_epoch: int | None = None,
    initial_weights: bool = True,
) -> tuple[nnx.Module, optax.GradientTransformation, optax.Schedule, LayerRates | None]:
    """A model of ``cfg`` with ``num_classes`` outputs and its optimizer on ``schedule``;
    also the head's schedule and a fine-tune's per-group rates (None when it learns from
    scratch). Training and the loading of a trained run (``trained_run.py``) both build them
    here, so a checkpoint's optimizer state always has the structure training saved.

    A model that starts from trained weights (:func:`~springfield.models.starts_pretrained`)
    is fine-tuned: given ``steps_per_epoch``, with ``--freeze-epochs`` of its head alone and
    then discriminative rates (:func:`~.optim.finetune_rates`); without it (the
    learning-rate finder, a trained run's restore), ``schedule`` scaled per layer group.
    ``initial_weights=False`` skips reading ImageNet or ``--weights`` files (a checkpoint
    will overwrite them)."""
    model = model_of_config(cfg, num_classes, initial_weights=initial_weights)
    rates: LayerRates | None = None
    if starts_pretrained(cfg):
        groups = model.layer_groups
        if steps_per_epoch is None:
            rates = scaled_rates(cfg, schedule, model.layer_group, groups)
        else:
            rates = finetune_rates(
                cfg,
                model.layer_group,
                groups,
                steps_per_epoch=steps_per_epoch,
                total_steps=steps_per_epoch * cfg.epochs,
            )
        schedule = rates.schedules[-1]
    return model, build_optimizer(cfg, schedule, rates), schedule, rates


def assemble(
    cfg: TrainConfig,
    data: RunData,
    mesh: jax.sharding.Mesh,
    *,
    steps_per_epoch: int | None = None,
    schedule: optax.Schedule | None = None,
    initial_weights: bool = True,
) -> Assembly:
    """A fresh model of ``cfg`` for ``data``'s classes, its optimizer, the initial state
    (replicated over ``mesh``) and the train and eval steps.

    The optimizer follows ``schedule``, by default the run's (:func:`run_schedule`, which
    needs ``steps_per_epoch``); a fine-tune's is built per layer group
    (:func:`model_and_optimizer`), with a ``frozen_step`` for its ``--freeze-epochs``.
    ``initial_weights=False`` skips reading ImageNet or ``--weights`` files, for a caller
    that brings its own state."""
    if schedule is None:
        if steps_per_epoch is None:
            raise ValueError("assemble: give steps_per_epoch or a schedule")
        schedule = run_schedule(cfg, steps_per_epoch)
    model, tx, schedule, rates = model_and_optimizer(
        cfg,
        len(data.classes),
        schedule,
        steps_per_epoch=steps_per_epoch,
        initial_weights=initial_weights,
    )
    graphdef, state = init_state(model, tx)
    state = parallel.replicate(state, mesh)
    step_args = dict(
        label_smoothing=cfg.label_smoothing,
        skip_nonfinite=cfg.skip_nonfinite,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        class_weights=class_weights_of(cfg, data),
        mixstyle=cfg.mixstyle,
        update=build_update(cfg, tx, schedule),
    )
    train_step = make_train_step(graphdef, tx, **step_args)
    frozen_steps = rates.frozen_steps if rates else 0
    frozen_step = make_train_step(graphdef, tx, frozen=True, **step_args) if frozen_steps else None
    eval_step = make_eval_step(graphdef, tta=cfg.tta)
    return Assembly(
        model, tx, graphdef, state, train_step, eval_step, schedule, frozen_step, frozen_steps
    )
