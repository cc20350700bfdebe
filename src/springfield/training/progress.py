"""What a run tells the user while it trains: the header line, the progress bar, one line per
epoch, and TensorBoard scalars. Only process 0 shows or writes anything."""

from __future__ import annotations

from typing import Any

import jax
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from springfield import kernels
from springfield.data.prepare import Split
from springfield.paths import printable
from springfield.training import run_folder
from springfield.training.inputs import RunData
from springfield.training.resume import Setup

# Skipped files listed on the console; skipped.txt has them all.
_SHOW_SKIPPED = 20


def print_header(setup: Setup, data: RunData, num_params: int, console: Console) -> None:
    """Model, data, sizes, devices and skipped files, before the first step."""
    cfg = setup.cfg
    skipped_files = run_folder.skipped_files(data.train, data.val)
    skipped = len(skipped_files)
    sizes = f"{cfg.image_size[0]}x{cfg.image_size[1]}"
    if cfg.early_epochs:
        h, w = cfg.early_size
        sizes += f" (the first {cfg.early_epochs} epochs at {h}x{w})"
    layers = kernels.describe(cfg.kernels, cfg.precision)
    console.print(
        f"[bold]{cfg.model}[/] ({num_params:,} parameters) on {len(data.train.index)} train / "
        f"{len(data.val.index)} val images of {len(setup.classes)} classes at {sizes}; "
        f"{cfg.epochs} epochs x {setup.steps_per_epoch} steps "
        f"on {jax.device_count()} device(s), layers by {layers}. Skipped {skipped} file(s)"
        + (f" (see {cfg.workdir / 'skipped.txt'})." if skipped else ".")
    )
    console.print(class_sizes_line(data.train, data.val, cfg.balance), highlight=False)
    for path, reason in skipped_files[:_SHOW_SKIPPED]:
        console.print(
            f"  skipped {printable(path)}: {printable(reason)}", highlight=False, soft_wrap=True
        )
    if skipped > _SHOW_SKIPPED:
        console.print(f"  ... and {skipped - _SHOW_SKIPPED} more.")


def class_sizes_line(train: Split, val: Split, balance: str) -> str:
    """Images per class (train/val) as the run saw them, and a hint when they differ a lot."""
    tr, va = train.index.counts(), val.index.counts()
    line = "Images per class (train/val): " + ", ".join(f"{c} {tr[c]}/{va[c]}" for c in tr)
    sizes = [n for n in tr.values() if n]
    ratio = max(sizes) / min(sizes) if sizes else 1.0
    if ratio >= 2:
        line += f". The largest class is {ratio:.1f}x the smallest: " + (
            "--balance sampler or --balance loss evens them out."
            if balance == "none"
            else f"balanced by --balance {balance}."
        )
    return line


def progress_bar(console: Console, *, enabled: bool) -> Progress:
    """The transient bar over all steps of the run (epoch, steps, last loss, time left)."""
    return Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )


def open_writer(setup: Setup) -> Any | None:
    """A TensorBoard writer into ``<workdir>/tensorboard`` (``--tensorboard``), or None."""
    if not (setup.cfg.tensorboard and setup.is_main):
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(setup.cfg.workdir / "tensorboard"))


def log_epoch(writer: Any | None, row: dict, console: Console) -> None:
    """An epoch's row on the console and in TensorBoard."""
    if writer is not None:
        for k, v in row.items():
            if isinstance(v, int | float):  # not the early epochs' size
                writer.add_scalar(f"epoch/{k}", v, row["step"])
    console.print(epoch_line(row))


def epoch_line(row: dict) -> str:
    """The console line of one epoch's row."""
    skipped = row.get("skipped_updates")
    started = row.get("first_step_seconds")
    return (
        f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} acc "
        f"{row['train_accuracy']:.3f}  val loss {row['val_loss']:.4f} acc "
        f"{row['val_accuracy']:.3f}  {row['train_img_s']:.0f} img/s  "
        f"input wait {row['input_wait_fraction']:.0%}"
        + (f"  first step {started:.1f} s after start" if started is not None else "")
        + (f"  skipped {skipped} non-finite update(s)" if skipped else "")
    )
