"""Refuse settings that cannot work, before minutes of data preparation rather than after.

Each check raises :class:`~springfield.errors.SpringfieldError` naming the flag and the fix.
``springfield compare`` runs :func:`check_config` on every variant before training any.
"""

from __future__ import annotations

import optax

from springfield.config import PRESETS, TrainConfig
from springfield.errors import SpringfieldError
from springfield.kernels import check_kernels
from springfield.models import MODELS, check_ensemble, check_image_size
from springfield.models.activations import get_activation
from springfield.training.optim import build_optimizer


def check_config(cfg: TrainConfig) -> None:
    """Every check that needs no data: names, sizes and ranges of ``cfg``'s flags.

    ``cfg.image_size`` must be resolved (not None); a ``module:function`` activation is
    imported here, since the user named it.
    """
    check_image_size(cfg.model, cfg.image_size)
    check_early(cfg)
    check_ensemble(cfg.ensemble)
    check_kernels(cfg.kernels)
    get_activation(cfg.activation)
    check_finetune(cfg)
    # The rate does not matter here: the optimizer's name and its settings do.
    build_optimizer(cfg, optax.constant_schedule(_placeholder_lr(cfg.lr)))
    for flag, alpha in (("--mixup", cfg.mixup), ("--cutmix", cfg.cutmix)):
        if alpha < 0:
            raise SpringfieldError(f"{flag} {alpha}: must be 0 (off) or a positive alpha.")
    chances = (
        ("--erase", cfg.erase),
        ("--grayscale", cfg.grayscale),
        ("--style", cfg.style),
        ("--mixstyle", cfg.mixstyle),
    )
    for flag, chance in chances:
        if not 0 <= chance <= 1:
            raise SpringfieldError(f"{flag} {chance}: must be a chance between 0 and 1.")
    spec = MODELS.get(cfg.model)
    if cfg.mixstyle and spec is not None and not spec.mixstyle:
        raise SpringfieldError(
            f"--mixstyle {cfg.mixstyle}: only the resnet models have it (--model "
            f"{cfg.model}; the simpsons presets set 0.5); use --model resnet or resnet4, "
            "or add --mixstyle 0."
        )
    if cfg.early_stop < 0:
        raise SpringfieldError(
            f"--early-stop {cfg.early_stop}: must be 0 (off) or a number of epochs."
        )
    if cfg.checkpoint_every < 0:
        raise SpringfieldError(
            f"--checkpoint-every {cfg.checkpoint_every}: must be 0 (epoch ends only) or a "
            "number of steps."
        )


def _placeholder_lr(lr: float | str) -> float:
    # `--lr auto` is resolved by the finder later; any positive number builds the optimizer.
    return 1e-3 if isinstance(lr, str) else lr


def check_early(cfg: TrainConfig) -> None:
    """Refuse progressive-resizing settings that cannot work."""
    if cfg.early_epochs == 0:  # off, whatever --early-size says (presets may set it)
        return
    if cfg.early_size is None or cfg.early_epochs < 0:
        raise SpringfieldError(
            f"--early-epochs {cfg.early_epochs}: needs --early-size H W and a positive "
            "count (e.g. --early-size 64 64 --early-epochs 60); 0 turns it off."
        )
    if cfg.early_epochs > cfg.epochs:
        preset = PRESETS["simpsons"]
        raise SpringfieldError(
            f"--early-epochs {cfg.early_epochs}: more than --epochs {cfg.epochs} (the early "
            f"epochs are part of the total; --preset simpsons sets {preset['early_epochs']} "
            f"of {preset['epochs']}). Pass a smaller --early-epochs, or 0 to train at "
            "--image-size throughout."
        )
    spec = check_image_size(cfg.model, cfg.early_size, flag="--early-size")
    (h, w), (full_h, full_w) = cfg.early_size, cfg.image_size
    if h > full_h or w > full_w:
        raise SpringfieldError(
            f"--early-size {h} {w}: larger than --image-size {full_h} {full_w}; the early "
            "epochs train on smaller images (or pass --early-epochs 0 to turn them off)."
        )
    if not spec.any_size:
        raise SpringfieldError(
            f"--early-size: model {cfg.model!r} has a head sized for one input size; "
            "progressive resizing needs a model with global pooling ("
            + ", ".join(name for name, m in MODELS.items() if m.any_size)
            + ")."
        )


def check_steps_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    """Training steps per epoch; refuses a batch larger than the training set."""
    steps = n_train // cfg.batch_size
    if steps == 0:
        raise SpringfieldError(
            f"--batch-size {cfg.batch_size}: larger than the {n_train} "
            "training images; use a smaller batch size."
        )
    return steps


def check_finetune(cfg: TrainConfig) -> None:
    """The pretrained models' and ``--time-budget``'s flags."""
    from springfield.models import MODELS
    from springfield.training.budget import parse_budget

    spec = MODELS[cfg.model]
    if spec.load_pretrained and cfg.activation != "relu":
        raise SpringfieldError(
            f"--activation {cfg.activation}: --model {cfg.model} uses ReLU6, which its "
            "ImageNet weights were trained with; leave --activation out."
        )
    if cfg.freeze_epochs < 0:
        raise SpringfieldError(f"--freeze-epochs {cfg.freeze_epochs}: must be 0 or more.")
    if cfg.lr_mult < 1:
        raise SpringfieldError(
            f"--lr-mult {cfg.lr_mult}: must be 1 (one rate for all layers) or more."
        )
    if cfg.time_budget is not None:
        parse_budget(cfg.time_budget)
        if cfg.distributed:
            raise SpringfieldError(
                "--time-budget with --distributed: each process would measure its own speed "
                "and choose its own epochs; give --epochs instead."
            )
