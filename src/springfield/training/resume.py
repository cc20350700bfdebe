"""Where a run stands (step, train state, epoch history) and how that is saved and resumed.

A run folder with a checkpoint resumes at its latest complete step: the train state and the
data iterator are restored and ``metrics.jsonl`` is rewritten from the checkpoint's record,
so a resumed run ends exactly as an uninterrupted one (see ``history.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from rich.console import Console

from springfield.config import TrainConfig
from springfield.training import checkpoint, history, nonfinite, run_folder
from springfield.training.steps import TrainState


@dataclass(frozen=True)
class Setup:
    """What stays fixed while a run trains."""

    cfg: TrainConfig  # resolved: absolute workdir, image size set
    classes: list[str]
    steps_per_epoch: int
    mesh: Any
    manager: ocp.CheckpointManager
    data_iter: grain.DatasetIterator
    is_main: bool
    started: float  # time.perf_counter() when the command (or the train() call) started

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


@dataclass
class Position:
    """Where a run stands; the epoch body advances it in place."""

    state: TrainState
    step: int = 0
    saved: int = 0  # step of the latest checkpoint (0: none yet)
    history: list[dict] = field(default_factory=list)  # the finished epochs' rows
    sums: list[dict] = field(default_factory=list)  # per-step metrics of the epoch in progress
    checked: int = 0  # how many of `sums` were checked to be finite


def start_or_resume(setup: Setup, state: TrainState, console: Console) -> Position:
    """A new run's position, or the one restored from the run folder's latest checkpoint
    (refused when the folder's settings differ from ``setup.cfg``)."""
    cfg, workdir = setup.cfg, setup.cfg.workdir
    start = setup.manager.latest_step() or 0
    if not start:
        if setup.is_main:
            (workdir / "metrics.jsonl").unlink(missing_ok=True)
        return Position(state)
    meta = checkpoint.read_meta(setup.manager, start)
    run_folder.check_resume(workdir, cfg, setup.classes, meta)
    state = checkpoint.restore(setup.manager, start, state, setup.data_iter)
    if setup.is_main:
        if "history" in meta:
            history.write_metrics(workdir, meta["history"])
        else:  # a checkpoint from before the record was kept
            run_folder.truncate_metrics(workdir, start // setup.steps_per_epoch)
        console.print(f"Resuming {workdir} at step {start}/{setup.total_steps}.")
    rows = list(meta.get("history") or [])
    if "history" not in meta:  # its rows are in metrics.jsonl only
        rows = history.read_metrics(workdir)
    # A mid-epoch checkpoint carries the steps already done in its epoch.
    sums = history.decode_steps(meta.get("epoch_steps"))
    return Position(state, start, start, rows, sums, len(sums))


def save(setup: Setup, pos: Position, *, mid_epoch: bool) -> None:
    """Check the state is finite, then start an async save of ``pos`` (with the per-step
    sums of the epoch in progress when ``mid_epoch``)."""
    cfg = setup.cfg
    if not cfg.skip_nonfinite:
        nonfinite.check_params(pos.state, pos.step, cfg.workdir, cfg.lr, pos.saved)
    meta = {
        "history": list(pos.history),
        "epoch_steps": history.encode_steps(pos.sums if mid_epoch else []),
        "step": pos.step,
        "epoch": pos.step // setup.steps_per_epoch,
        "classes": setup.classes,
        "model": cfg.model,
        "image_size": list(cfg.image_size),
        "workers": cfg.workers,
        "processes": jax.process_count(),
    }
    checkpoint.save(setup.manager, pos.step, pos.state, meta, setup.data_iter)
    pos.saved = pos.step
