"""A trained run folder: load it (:func:`load_run`) and evaluate it on a folder.

Loading reads only JSON and orbax arrays: a run folder can never make springfield execute
code (a custom ``module:function`` activation is imported only because the user's config
named it, and the CLI says so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from springfield import runtime
from springfield.config import TrainConfig, from_json
from springfield.errors import SpringfieldError
from springfield.training import checkpoint
from springfield.training.assembly import model_and_optimizer
from springfield.training.optim import make_schedule
from springfield.training.steps import TrainState, eval_params, make_eval_step

if TYPE_CHECKING:
    from rich.console import Console

    from springfield.data.prepare import Split


@dataclass
class TrainedModel:
    """A restored model: config, class names, graph definition and state."""

    run_dir: Path
    config: TrainConfig
    classes: list[str]
    graphdef: Any
    params: Any
    rest: Any
    step: int

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.config.image_size)


def load_run(run_dir: Path, *, allow_import: bool = False) -> TrainedModel:
    """Restore the latest checkpoint of ``run_dir`` (parameters and BatchNorm statistics).

    A run trained with a ``module:function`` activation is refused unless ``allow_import``:
    importing that module would run its code.
    """
    runtime.use_compilation_cache()
    run_dir = Path(run_dir).expanduser().absolute()
    cfg_path, classes_path = run_dir / "config.json", run_dir / "classes.json"
    if not cfg_path.exists() or not classes_path.exists():
        raise SpringfieldError(
            f"{run_dir}: not a springfield run folder (no config.json / "
            "classes.json). Pass the --workdir of a train run."
        )
    cfg = from_json(json.loads(cfg_path.read_text()))
    classes = json.loads(classes_path.read_text())
    if ":" in cfg.activation and not allow_import:
        raise SpringfieldError(
            f"{run_dir} uses the custom activation {cfg.activation!r}; "
            "importing it runs that module's code. If you trust it, pass "
            "--allow-import."
        )
    manager = checkpoint.open_manager(run_dir)
    step = manager.latest_step()
    if step is None:
        raise SpringfieldError(
            f"{run_dir}: no complete checkpoint yet. Train first, or "
            f"resume with: springfield train --workdir {run_dir}"
        )
    try:
        _check_meta(run_dir, step, checkpoint.read_meta(manager, step), cfg, classes)
    except SpringfieldError:
        manager.close()
        raise
    # The checkpoint holds the weights: no ImageNet or --weights file is read here.
    # The optimizer state is restored too (orbax needs the full tree); only the --ema
    # average, when kept, is used from it. A fine-tune's has one state per layer group.
    schedule = make_schedule(cfg.schedule, lr=cfg.lr, total_steps=2, warmup_steps=0)
    model, tx, _, _ = model_and_optimizer(cfg, len(classes), schedule, initial_weights=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    target = TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))
    try:
        state = checkpoint.restore(manager, step, target)
    except (ValueError, KeyError) as e:
        raise SpringfieldError(
            f"{run_dir}: checkpoint {step} does not match its config.json "
            f"(model {cfg.model}, {len(classes)} classes): {e}"
        ) from None
    finally:
        manager.close()
    return TrainedModel(run_dir, cfg, classes, graphdef, eval_params(state), state.rest, step)


def _check_meta(run_dir: Path, step: int, meta: dict, cfg: TrainConfig, classes: list) -> None:
    # The checkpoint's own record of what it holds: a config.json or classes.json edited or
    # copied from another run would otherwise load silently (e.g. another image size).
    expected = {"model": cfg.model, "image_size": list(cfg.image_size), "classes": classes}
    diffs = [
        f"{key} {meta[key]} (checkpoint) vs {value} (config.json/classes.json)"
        for key, value in expected.items()
        if key in meta and meta[key] != value
    ]
    if diffs:
        raise SpringfieldError(
            f"{run_dir}: checkpoint {step} does not match the run's config.json/classes.json: "
            f"{'; '.join(diffs)}. Restore those files as train wrote them."
        )


def evaluate_data(
    trained: TrainedModel,
    data: Path | None = None,
    batch_size: int = 64,
    console: Console | None = None,
) -> tuple[Split, tuple[np.ndarray, ...], dict]:
    """Exact predictions of ``trained`` on the folder ``data`` (its ``val/`` if it has one;
    default: the run's own validation split): ``(split, (rows, labels, probs, losses),
    result)``, where ``result`` is :func:`~springfield.training.metrics.summarise`'s plus the
    skipped files."""
    from springfield.data.prepare import prepare_folder, prepare_splits, resolve_data_root
    from springfield.training.evaluation import run_eval
    from springfield.training.metrics import summarise

    cfg = trained.config
    if data is None:
        root = resolve_data_root(cfg.data, per_class=cfg.synthetic_per_class, console=None)
        _, split = prepare_splits(
            root,
            image_size=trained.image_size,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            classes=trained.classes,
            only=trained.classes if cfg.classes else None,
            group_threshold=cfg.group_threshold if cfg.split_by_group else None,
            console=console,
        )
    else:
        root = Path(data)
        root = root / "val" if (root / "val").is_dir() else root
        split = prepare_folder(
            root, image_size=trained.image_size, classes=trained.classes, console=console
        )
    predictions = run_eval(
        make_eval_step(trained.graphdef, tta=trained.config.tta),
        trained.params,
        trained.rest,
        split,
        batch_size,
    )
    result = summarise(*predictions[1:], trained.classes)
    result["skipped"] = [{"path": p, "reason": r} for p, r in split.index.skipped]
    return split, predictions, result


__all__ = ["TrainedModel", "evaluate_data", "load_run"]
