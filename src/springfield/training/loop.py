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
from rich.console import Console

from springfield import parallel
from springfield.config import TrainConfig, to_json
from springfield.errors import Interrupted
from springfield.models import count_params, model_spec
from springfield.training import checkpoint, progress, resume, run_folder
from springfield.training.assembly import assemble
from springfield.training.budget import fit_epochs
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
from springfield.training.inputs import augmented_samples, load_data, train_iterator
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
        if cfg.time_budget:  # the epochs that fit, from this machine's measured step time
            cfg = fit_epochs(
                cfg, data, mesh, steps_per_epoch, started, console if is_main else None
            )
        total_steps = steps_per_epoch * cfg.epochs

        # Model, optimizer, steps (assembly.py); state replicated over the mesh.
        built = assemble(cfg, data, mesh, steps_per_epoch=steps_per_epoch)
        state, train_step, eval_step = built.state, built.train_step, built.eval_step
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
        pos = resume.start_or_resume(setup, state, console)
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
                while pos.step < total_steps and not stop and not stopped_early(pos.history, cfg):
                    bar.update(task, epoch=pos.step // steps_per_epoch + 1)
                    # A fine-tune trains its head alone first (assembly.py).
                    step_fn = built.frozen_step if pos.step < built.frozen_steps else train_step
                    timing = EpochTiming(pos.step)
                    for batch in epoch_batches(setup, pos, timing):
                        pos.state, m = step_fn(pos.state, batch, key)
                        if after_step(setup, pos, m, timing, stop, on_loss):
                            break
                    if pos.step % steps_per_epoch:  # stopped mid-epoch
                        break
                    row = evaluate_epoch(setup, pos, eval_step, data, timing, lr_at(pos.step - 1))
                    end_epoch(setup, pos, row)
                    if is_main:
                        progress.log_epoch(writer, row, bar.console)
            if stop and pos.step < total_steps:
                if pos.saved != pos.step:
                    resume.save(setup, pos, mid_epoch=True)
                # The save completes in `finally` below, before the message reaches the user.
                raise Interrupted(
                    f"{stop.signal} at step {pos.step}/{total_steps}; a checkpoint of step "
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
                data_iter.close()

        finish(setup, pos, eval_step, data, writer, console)
        return workdir
