"""What happens around one epoch's train steps (its batches, the accounting after each step,
mid-epoch checkpoints), its evaluation and its row of ``metrics.jsonl``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax

from springfield import parallel
from springfield.config import TrainConfig
from springfield.training import history, nonfinite, resume
from springfield.training.evaluation import run_eval
from springfield.training.inputs import RunData
from springfield.training.interrupts import StopRequest
from springfield.training.metrics import summarise
from springfield.training.resume import Position, Setup
from springfield.training.steps import eval_params


@dataclass
class EpochTiming:
    """Wall time of an epoch's train steps and the part of it spent waiting for input,
    accumulated by :func:`epoch_batches` and :func:`after_step`."""

    first_step: int
    start: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    wait: float = 0.0
    started_after: float | None = None
    """Seconds from the start of the command (or of the ``train()`` call) to the end of a
    fresh run's first step: imports, data preparation, compilation. First epoch only."""
    block_first: bool = False
    """Wait for the epoch's first step (it compiles) and time it into ``first_s``; always
    done for a fresh run's first step."""
    first_s: float | None = None


def epoch_batches(setup: Setup, pos: Position, timing: EpochTiming) -> Iterator[Any]:
    """The batches from ``pos.step`` to the end of its epoch, sharded over the mesh; the
    time spent waiting for each goes into ``timing.wait``."""
    epoch_end = (pos.step // setup.steps_per_epoch + 1) * setup.steps_per_epoch
    for _ in range(epoch_end - pos.step):
        t0 = time.perf_counter()
        batch = next(setup.data_iter)
        timing.wait += time.perf_counter() - t0
        yield parallel.shard_batch(batch, setup.mesh)


def after_step(
    setup: Setup,
    pos: Position,
    metrics: dict,
    timing: EpochTiming,
    stop: StopRequest,
    on_loss: Callable[[int, float], None],
) -> bool:
    """Account for the train step just taken (its ``metrics``): count it, every 10 steps
    check the losses and report one (``on_loss(step, loss)``; reading it syncs with the
    device), save the ``--checkpoint-every`` checkpoints. True when the epoch is over or
    ``stop`` is set."""
    cfg = setup.cfg
    epoch_end = (pos.step // setup.steps_per_epoch + 1) * setup.steps_per_epoch
    pos.sums.append(metrics)
    if pos.step == 0 or (timing.block_first and pos.step == timing.first_step):
        jax.block_until_ready(metrics)  # what a user waits for before training starts
        timing.first_s = time.perf_counter() - timing.start
        if pos.step == 0:
            timing.started_after = time.perf_counter() - setup.started
    pos.step += 1
    step = pos.step
    save_now = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step != epoch_end
    if step % 10 == 0 or step == epoch_end or save_now or stop:
        # Reading the loss syncs with the device: only every 10 steps, and before any
        # checkpoint, so that no checkpoint holds a NaN state.
        loss = float(metrics["loss_sum"]) / max(float(metrics["count"]), 1.0)
        if not cfg.skip_nonfinite:
            nonfinite.check_losses(
                pos.sums[pos.checked :],
                step - len(pos.sums) + pos.checked + 1,
                cfg.workdir,
                cfg.lr,
                pos.saved,
            )
        pos.checked = len(pos.sums)
        on_loss(step, loss)
        if save_now:
            resume.save(setup, pos, mid_epoch=True)
    done = step == epoch_end or bool(stop)
    if done:
        timing.seconds = time.perf_counter() - timing.start
    return done


def evaluate_epoch(
    setup: Setup,
    pos: Position,
    eval_step: Callable,
    data: RunData,
    timing: EpochTiming,
    lr: float,
) -> dict:
    """Evaluate the finished epoch exactly and return its row of ``metrics.jsonl``."""
    cfg = setup.cfg
    epoch = pos.step // setup.steps_per_epoch
    early = data.early_val is not None and epoch <= cfg.early_epochs
    _, labels, probs, losses = run_eval(
        eval_step,
        eval_params(pos.state),
        pos.state.rest,
        data.early_val if early else data.val,
        cfg.batch_size,
        setup.mesh,
    )
    row = epoch_row(
        epoch,
        pos.step,
        lr,
        history.epoch_totals(pos.sums),
        summarise(labels, probs, losses, setup.classes),
        images=(pos.step - timing.first_step) * cfg.batch_size,
        seconds=timing.seconds,
        wait=timing.wait,
    )
    if timing.started_after is not None:
        row["first_step_seconds"] = timing.started_after
    if cfg.early_epochs:
        row["image_size"] = list(cfg.early_size if early else cfg.image_size)
    if cfg.skip_nonfinite:
        row["skipped_updates"] = int(pos.state.opt_state.total_notfinite)
    return row


def end_epoch(setup: Setup, pos: Position, row: dict) -> None:
    """Record the epoch's row and save its checkpoint."""
    # The row goes into the checkpoint first: a resume rebuilds metrics.jsonl from the
    # checkpoint, so each epoch's row appears exactly once.
    pos.history.append(row)
    resume.save(setup, pos, mid_epoch=False)
    pos.sums, pos.checked = [], 0
    if setup.is_main:
        history.append_metrics(setup.cfg.workdir, row)


def epoch_row(
    epoch: int,
    step: int,
    lr: float,
    train: dict,
    val: dict,
    *,
    images: int,
    seconds: float,
    wait: float,
) -> dict:
    """One line of ``metrics.jsonl``: epoch totals of the train steps and the evaluation."""
    return {
        "epoch": epoch,
        "step": step,
        "lr": lr,
        "train_loss": train["loss_sum"] / train["count"],
        "train_accuracy": train["correct"] / train["count"],
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "val_macro_f1": val["macro_f1"],
        "train_img_s": images / seconds,
        "epoch_seconds": seconds,
        "input_wait_fraction": wait / seconds,
    }


def stopped_early(epoch_rows: list[dict], cfg: TrainConfig) -> dict | None:
    """The best epoch's row when ``--early-stop`` ends the run after ``epoch_rows``, else None.

    Derived from the epoch history alone, so a resumed run stops at the same epoch.
    """
    # Validation losses at the --early-size compare with each other, not with full size.
    rows = [r for r in epoch_rows if r["epoch"] > cfg.early_epochs]
    if cfg.early_stop <= 0 or not rows:
        return None
    best = min(rows, key=lambda r: r["val_loss"])
    return best if rows[-1]["epoch"] - best["epoch"] >= cfg.early_stop else None
