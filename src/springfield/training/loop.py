"""The training loop: data -> model -> jitted steps -> exact eval -> checkpoints and metrics.

:func:`train`, read top to bottom, is the whole of training; each stage is a
small function in a module of its own:

- ``checks.py``: refuse impossible settings before any work;
- ``run_folder.py``: the run folder, its record files and the resume check;
- ``inputs.py``: the decoded splits and the training iterator;
- ``steps.py``: the jitted train and eval steps on pure state;
- ``resume.py``: the run's position, its checkpoints and resuming from them;
- ``epoch.py``: one epoch's steps, its evaluation and its metrics row;
- ``progress.py``: the console and TensorBoard;
- ``final.py``: the final evaluation, ``eval.json`` and the report.

Resuming is the same code path: if the run folder holds a checkpoint, the state and the
data iterator are restored from it and the loop continues at the next step. With several
processes, every process runs this same code on its own shard of the data; only process 0
writes files and shows progress.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from rich.console import Console

from springfield import parallel
from springfield.config import TrainConfig, to_json
from springfield.errors import Interrupted
from springfield.models import count_params, model_spec
from springfield.training import budget, checkpoint, progress, resume, run_folder
from springfield.training.assembly import Assembly, assemble
from springfield.training.budget import Refit, steady_epoch_seconds
from springfield.training.checks import check_config, check_steps_per_epoch
from springfield.training.epoch import (
    EpochTiming,
    after_step,
    end_epoch,
    epoch_batches,
    evaluate_epoch,
    stopped_early,
)

# Also importable from here, where they lived before the split.
from springfield.training.evaluation import run_eval
from springfield.training.final import finish
from springfield.training.inputs import RunData, augmented_samples, load_data, train_iterator
from springfield.training.interrupts import stop_requests
from springfield.training.lr_find import auto_lr
from springfield.training.optim import lr_of_step, make_schedule  # noqa: F401 (re-export)
from springfield.training.resume import Setup

__all__ = ["augmented_samples", "resolve", "run_eval", "train"]


def resolve(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its defaults made explicit: an absolute run folder and the model's
    image size."""
    workdir = Path(cfg.workdir or run_folder.default_workdir()).absolute()
    image_size = tuple(cfg.image_size or model_spec(cfg.model).image_size)
    return replace(cfg, workdir=workdir, image_size=image_size)


def train(
    cfg: TrainConfig, console: Console | None = None, *, started: float | None = None
) -> Path:
    """Train (or resume) the run described by ``cfg``; returns the run folder. Read top to
    bottom, this is the whole of training.

    With ``--distributed`` every process calls this with the same ``cfg``. ``started`` (a
    ``time.perf_counter()`` reading, by default this call's) is what the first epoch's
    ``first_step_seconds`` counts from: the command passes its process's start.
    """
    started = time.perf_counter() if started is None else started
    console = console or Console()
    # Devices and processes first: both must be fixed before anything starts JAX's backend.
    parallel.setup(
        cpu_devices=cfg.cpu_devices,
        distributed=cfg.distributed,
        coordinator=cfg.coordinator,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        workdir=cfg.workdir,
        timeout=cfg.distributed_timeout,
    )
    with parallel.stop_on_lost_peer(), checkpoint.disk_errors():
        is_main = jax.process_index() == 0
        cfg = resolve(cfg)
        workdir = cfg.workdir
        check_config(cfg)
        run_folder.make_workdir(workdir)
        record = None  # extra keys for config.json
        if cfg.lr == "auto":  # the finder's suggestion, found once per run folder
            cfg, record = auto_lr(cfg, console if is_main else None)
        mesh = parallel.make_mesh()
        # Paths may differ between hosts (checked by content in load_data); nothing else may.
        parallel.check_same(
            json.dumps(
                {
                    k: v
                    for k, v in to_json(cfg).items()
                    if k not in ("process_id", "data", "workdir")
                },
                sort_keys=True,
            ),
            "the settings: run the same springfield train command on every process",
        )

        # Data: folder -> index -> split -> decoded once.
        data = load_data(cfg, console if is_main else None)
        steps_per_epoch = check_steps_per_epoch(cfg, len(data.train.index))
        refit = None  # with --time-budget: the epochs that fit, by this machine's speed
        if cfg.time_budget:
            cfg, refit = budget.fit_epochs(
                cfg, data, mesh, steps_per_epoch, started, console if is_main else None
            )
            record = refit.record(record)  # a resumed run's changes stay in config.json
        total_steps = steps_per_epoch * cfg.epochs

        # Model, optimizer, steps (assembly.py); state replicated over the mesh.
        built = assemble(cfg, data, mesh, steps_per_epoch=steps_per_epoch)
        lr_at = lr_of_step(built.schedule)
        key = jax.random.key(cfg.seed)
        data_iter = train_iterator(
            cfg,
            data.train,
            parallel.local_batch_size(cfg.batch_size, mesh),
            steps_per_epoch,
            total_steps,
        )

        # Run folder: new, or resume from its latest complete checkpoint.
        parallel.check_shared_folder(workdir)
        setup = Setup(
            cfg,
            data.classes,
            steps_per_epoch,
            mesh,
            checkpoint.open_manager(workdir),
            data_iter,
            is_main,
            started,
        )
        pos = resume.start_or_resume(setup, built.state, console)
        if is_main:
            run_folder.write_run_record(workdir, cfg, data.root, data.train, data.val, record)
            progress.print_header(setup, data, count_params(built.model), console)

        writer = progress.open_writer(setup)
        bar = progress.progress_bar(console, enabled=is_main)

        def on_loss(step: int, loss: float) -> None:
            bar.update(task, completed=step, loss=f"{loss:.3f}")
            if writer is not None:
                writer.add_scalar("step/loss", loss, step)
                writer.add_scalar("step/lr", lr_at(step - 1), step)

        # Ctrl-C / SIGTERM stop the run between steps (see interrupts.py). With several
        # processes they would stop at different steps and hang the others' collectives.
        stop_context = stop_requests(enabled=jax.process_count() == 1)
        try:
            with stop_context as stop, bar:
                task = bar.add_task(
                    "train",
                    total=total_steps,
                    completed=pos.step,
                    epoch=1,
                    epochs=cfg.epochs,
                    loss="-",
                )
                replanned = False
                while (
                    pos.step < setup.total_steps
                    and not stop
                    and not stopped_early(pos.history, cfg)
                ):
                    bar.update(task, epoch=pos.step // steps_per_epoch + 1)
                    # A fine-tune trains its head alone first (assembly.py).
                    frozen = pos.step < built.frozen_steps
                    step_fn = built.frozen_step if frozen else built.train_step
                    timing = EpochTiming(pos.step, block_first=replanned)
                    for batch in epoch_batches(setup, pos, timing):
                        pos.state, m = step_fn(pos.state, batch, key)
                        if after_step(setup, pos, m, timing, stop, on_loss):
                            break
                    if pos.step % steps_per_epoch:  # stopped mid-epoch
                        break
                    lr = lr_at(pos.step - 1)
                    row = evaluate_epoch(setup, pos, built.eval_step, data, timing, lr)
                    end_epoch(setup, pos, row)
                    if is_main:
                        progress.log_epoch(writer, row, bar.console)
                    if refit is not None and not stop:  # --time-budget: by the run's pace
                        wall = time.perf_counter() - timing.start
                        say = bar.console if is_main else None
                        changed = replan(setup, data, refit, pos, timing, wall, record, say)
                        replanned = changed is not None
                        if changed is not None:
                            setup, built = changed
                            cfg = setup.cfg
                            lr_at = lr_of_step(built.schedule)
                            bar.update(task, total=setup.total_steps, epochs=cfg.epochs)
            if stop and pos.step < setup.total_steps:
                if pos.saved != pos.step:
                    resume.save(setup, pos, mid_epoch=True)
                # The save completes in `finally` below, before the message reaches the user.
                raise Interrupted(
                    f"{stop.signal} at step {pos.step}/{setup.total_steps}; a checkpoint of step "
                    f"{pos.step} is saved in {workdir / 'checkpoints'}. To resume, run the same "
                    f"command again (same --workdir {workdir} and settings)."
                )
        finally:
            if writer is not None:
                writer.flush()
            # On every way out: wait for the save in flight (an exit would lose it), and stop
            # grain's worker processes and free their shared memory now, not at exit.
            try:
                checkpoint.finish(setup.manager)
            finally:
                setup.data_iter.close()

        finish(setup, pos, built.eval_step, data, writer, console)
        return workdir


def replan(
    setup: Setup,
    data: RunData,
    refit: Refit,
    pos: resume.Position,
    timing: EpochTiming,
    wall: float,
    record: dict | None,
    console: Console | None,
) -> tuple[Setup, Assembly] | None:
    """After an epoch of a ``--time-budget`` run that took ``wall`` seconds: when
    ``refit`` finds that another number of epochs fits, the run's setup and steps for it
    (the schedule follows the epochs; the state carries over unchanged), else None. The
    new epochs are written into ``config.json`` once the epoch's checkpoint is complete,
    so a resumed run continues on the same schedule."""
    cfg, steps = setup.cfg, setup.steps_per_epoch
    epoch = pos.step // steps
    epoch_s = steady_epoch_seconds(
        wall, timing.seconds, timing.first_s, pos.step - timing.first_step
    )
    epochs = refit.after_epoch(epoch, cfg.epochs, epoch_s)
    if jax.process_count() > 1:  # every process trains the same schedule: process 0's
        epochs = int(multihost_utils.broadcast_one_to_all(np.int32(epochs)))
    if epochs == cfg.epochs:
        return None
    new = replace(cfg, epochs=epochs)
    built = assemble(new, data, setup.mesh, steps_per_epoch=steps, initial_weights=False)
    # The same stream with more (or fewer) epochs, at the position the old one reached:
    # grain shuffles each epoch by its seed and number, so the batches ahead are the same.
    it = train_iterator(
        new, data.train, parallel.local_batch_size(new.batch_size, setup.mesh), steps,
        steps * epochs,
    )  # fmt: skip
    it.set_state(setup.data_iter.get_state())
    setup.data_iter.close()
    setup = replace(setup, cfg=new, data_iter=it)
    checkpoint.wait(setup.manager)
    if setup.is_main:
        run_folder.write_config(new.workdir, new, refit.record(record))
    if console is not None:
        console.print(
            f"--time-budget {new.time_budget}: {epochs} epochs instead of {cfg.epochs} "
            f"(epochs here take about {np.mean(refit.epoch_s):.0f} s)."
        )
    return setup, built
