"""The training loop: data -> model -> jitted steps -> exact eval -> checkpoints and metrics.

Read top to bottom, this is the whole of training. Resuming is the same code path: if the run
folder holds a checkpoint, the state and the data iterator are restored from it and the loop
continues at the next step. With several processes, every process runs this same code on its
own shard of the data; only process 0 writes files and shows progress.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import optax
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from springfield import parallel
from springfield.config import PRESETS, TrainConfig, save_json, to_json
from springfield.data.pipeline import class_weights, eval_dataset, to_iterator, train_dataset
from springfield.data.prepare import Split, decode_split, prepare_splits, resolve_data_root
from springfield.errors import Interrupted, SpringfieldError
from springfield.kernels import onednn
from springfield.models import (
    MODELS,
    build_model,
    check_ensemble,
    check_image_size,
    count_params,
    model_spec,
)
from springfield.models.activations import get_activation
from springfield.paths import printable
from springfield.training import checkpoint, history, run_folder
from springfield.training.interrupts import stop_requests
from springfield.training.metrics import summarise
from springfield.training.optim import build_optimizer, make_schedule
from springfield.training.steps import (
    all_finite,
    eval_params,
    init_state,
    make_eval_step,
    make_train_step,
)

# Skipped files listed on the console; skipped.txt has them all.
_SHOW_SKIPPED = 20


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


def run_eval(
    eval_step, params, rest, split: Split, batch_size: int, mesh=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact batched evaluation: ``(rows, labels, probs, losses)``, one entry per image in
    the order of ``split.npy`` (``rows`` are the images' rows in it).

    The last batch is padded to the fixed batch shape and the padding dropped by its mask,
    so every image counts exactly once and the step never recompiles. With several
    processes each evaluates its own slice and the results are gathered on every host.
    """
    mesh = mesh or parallel.make_mesh()
    local = parallel.local_batch_size(batch_size, mesh)
    ds = eval_dataset(
        split.npy,
        split.labels,
        batch_size=local,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    rows, probs, losses, labels = [], [], [], []
    it = to_iterator(ds, workers=0)
    for batch in it:
        batch = parallel.shard_batch(batch, mesh)
        rows.append(parallel.to_host(batch["index"])[parallel.to_host(batch["mask"]) > 0])
        logits, loss = eval_step(params, rest, batch)
        keep = parallel.to_host(batch["mask"]) > 0
        probs.append(parallel.to_host(jax.nn.softmax(logits))[keep])
        losses.append(parallel.to_host(loss)[keep])
        labels.append(parallel.to_host(batch["label"])[keep])
    it.close()
    out = [np.concatenate(x) for x in (rows, labels, probs, losses)]
    # Several processes interleave their slices within each global batch: restore file order.
    order = np.argsort(out[0], kind="stable")
    return tuple(x[order] for x in out)


def augmented_samples(cfg: TrainConfig, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """The first training batch exactly as the model sees it (after augmentation)."""
    ds = train_dataset(
        split.npy,
        split.labels,
        batch_size=min(cfg.batch_size, len(split.index)),
        epochs=1,
        seed=cfg.seed,
        augment=cfg.augment,
        erase=cfg.erase,
        gray=cfg.grayscale,
        style=cfg.style,
        balanced=cfg.balance == "sampler",
    )
    it = to_iterator(ds, workers=0)
    batch = next(it)
    it.close()
    return batch["image"], batch["label"]


def _check_early(cfg: TrainConfig) -> None:
    """Refuse progressive-resizing settings that cannot work, before any data is read."""
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


def _data_fingerprint(*splits: Split) -> str:
    # Relative paths and labels: hosts may mount the data at different places.
    return json.dumps(
        [
            [
                s.index.classes,
                s.index.labels,
                [os.path.relpath(p, s.index.root) for p in s.index.paths],
            ]
            for s in splits
        ]
    )


def _check_finite(
    sums: list[dict], first_step: int, workdir: Path, lr: float, saved: int | None
) -> None:
    bad = history.first_nonfinite(sums, first_step)
    if bad is None:
        return
    step, loss = bad
    _stop_nonfinite(f"the training loss became {loss} at step {step}", workdir, lr, saved)


def _check_state(state, step: int, workdir: Path, lr: float, saved: int | None) -> None:
    # A finite loss at step N was computed before update N: the update itself may still
    # overflow. Checked before each save, so that a saved checkpoint is always a good one.
    if not bool(all_finite(state)):
        _stop_nonfinite(
            f"the model's parameters became NaN or infinite in step {step}", workdir, lr, saved
        )


def _stop_nonfinite(what: str, workdir: Path, lr: float, saved: int | None) -> None:
    kept = (
        f"its last good checkpoint (step {saved}) is kept in {workdir / 'checkpoints'}"
        if saved
        else "no checkpoint had been saved yet"
    )
    raise SpringfieldError(
        f"{what}; training stopped and {kept}. Lower --lr (now {lr:g}) and train again in "
        "a new --workdir, or pass --skip-nonfinite to skip such updates."
    )


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


def _epoch_row(
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


def _epoch_line(row: dict) -> str:
    skipped = row.get("skipped_updates")
    return (
        f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} acc "
        f"{row['train_accuracy']:.3f}  val loss {row['val_loss']:.4f} acc "
        f"{row['val_accuracy']:.3f}  {row['train_img_s']:.0f} img/s  "
        f"input wait {row['input_wait_fraction']:.0%}"
        + (f"  skipped {skipped} non-finite update(s)" if skipped else "")
    )


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Train (or resume) the run described by ``cfg``; returns the run folder.

    With ``--distributed`` every process calls this with the same ``cfg``.
    """
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
        return _train(cfg, console or Console())


def _train(cfg: TrainConfig, console: Console) -> Path:
    is_main = jax.process_index() == 0
    say = console if is_main else None
    workdir = Path(cfg.workdir or run_folder.default_workdir()).absolute()
    image_size = tuple(cfg.image_size or model_spec(cfg.model).image_size)
    cfg = replace(cfg, workdir=workdir, image_size=image_size)
    # Refuse bad names and sizes before minutes of data preparation, not after.
    check_image_size(cfg.model, image_size)
    _check_early(cfg)
    check_ensemble(cfg.ensemble)
    get_activation(cfg.activation)
    build_optimizer(cfg, optax.constant_schedule(cfg.lr))
    for flag, alpha in (("--mixup", cfg.mixup), ("--cutmix", cfg.cutmix)):
        if alpha < 0:
            raise SpringfieldError(f"{flag} {alpha}: must be 0 (off) or a positive alpha.")
    for flag, chance in (("--erase", cfg.erase), ("--grayscale", cfg.grayscale)):
        if not 0 <= chance <= 1:
            raise SpringfieldError(f"{flag} {chance}: must be a chance between 0 and 1.")
    run_folder.make_workdir(workdir)
    if cfg.early_stop < 0:
        raise SpringfieldError(
            f"--early-stop {cfg.early_stop}: must be 0 (off) or a number of epochs."
        )
    if cfg.checkpoint_every < 0:
        raise SpringfieldError(
            f"--checkpoint-every {cfg.checkpoint_every}: must be 0 (epoch ends only) or a "
            "number of steps."
        )
    mesh = parallel.make_mesh()
    local_batch = parallel.local_batch_size(cfg.batch_size, mesh)
    # Paths may differ between hosts (checked below by content); everything else may not.
    parallel.check_same(
        json.dumps(
            {k: v for k, v in to_json(cfg).items() if k not in ("process_id", "data", "workdir")},
            sort_keys=True,
        ),
        "the settings: run the same springfield train command on every process",
    )

    # Data: folder -> index -> split -> decoded once.
    root = resolve_data_root(cfg.data, per_class=cfg.synthetic_per_class, console=say)
    train_split, val_split = prepare_splits(
        root,
        image_size=image_size,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        on_bad_image=cfg.on_bad_image,
        group_threshold=cfg.group_threshold if cfg.split_by_group else None,
        only=list(cfg.classes) if cfg.classes else None,
        console=say,
    )
    # The early epochs are evaluated at their own size: the numbers a 64 px model earns on
    # 64 px images, at a third of the cost of evaluating at full size.
    early_val = (
        decode_split(val_split.index, tuple(cfg.early_size), say, "validation (early size)")
        if cfg.early_epochs
        else None
    )
    parallel.check_same(
        _data_fingerprint(train_split, val_split),
        "the data: --data must hold the same images on every host",
    )
    classes = list(train_split.index.classes)
    n_train = len(train_split.index)
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise SpringfieldError(
            f"--batch-size {cfg.batch_size}: larger than the {n_train} "
            "training images; use a smaller batch size."
        )
    total_steps = steps_per_epoch * cfg.epochs

    # Model, optimizer, steps; state replicated over the mesh.
    model = build_model(
        cfg.model,
        len(classes),
        image_size=image_size,
        activation=cfg.activation,
        seed=cfg.seed,
        ensemble=cfg.ensemble,
        precision=cfg.precision,
    )
    schedule = make_schedule(
        cfg.schedule,
        lr=cfg.lr,
        total_steps=total_steps,
        warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
    )
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
        class_weights=(
            class_weights(train_split.labels, len(classes)) if cfg.balance == "loss" else None
        ),
    )
    eval_step = make_eval_step(graphdef, tta=cfg.tta)
    key = jax.random.key(cfg.seed)

    data_iter = to_iterator(
        train_dataset(
            train_split.npy,
            train_split.labels,
            batch_size=local_batch,
            epochs=cfg.epochs,
            seed=cfg.seed,
            augment=cfg.augment,
            erase=cfg.erase,
            gray=cfg.grayscale,
            style=cfg.style,
            balanced=cfg.balance == "sampler",
            early_steps=cfg.early_epochs * steps_per_epoch,
            early_size=cfg.early_size,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        ),
        workers=cfg.workers,
    )

    # Run folder: new, or resume from its latest complete checkpoint.
    workdir.mkdir(parents=True, exist_ok=True)
    parallel.check_shared_folder(workdir)
    manager = checkpoint.open_manager(workdir)
    start_step = manager.latest_step() or 0
    resumed: dict = {}
    if start_step:
        resumed = checkpoint.read_meta(manager, start_step)
        run_folder.check_resume(workdir, cfg, classes, resumed)
        state = checkpoint.restore(manager, start_step, state, data_iter)
        if is_main:
            if "history" in resumed:
                history.write_metrics(workdir, resumed["history"])
            else:  # a checkpoint from before the record was kept
                run_folder.truncate_metrics(workdir, start_step // steps_per_epoch)
            console.print(f"Resuming {workdir} at step {start_step}/{total_steps}.")
    elif is_main:
        (workdir / "metrics.jsonl").unlink(missing_ok=True)
    if is_main:
        save_json(to_json(cfg), workdir / "config.json")
        save_json(classes, workdir / "classes.json")
        run_folder.write_dataset_record(workdir, root, train_split, val_split)
        skipped_files = run_folder.skipped_files(train_split, val_split)
        skipped = len(skipped_files)
        sizes = f"{image_size[0]}x{image_size[1]}"
        if cfg.early_epochs:
            h, w = cfg.early_size
            sizes += f" (the first {cfg.early_epochs} epochs at {h}x{w})"
        console.print(
            f"[bold]{cfg.model}[/] ({count_params(model):,} parameters) on {n_train} train / "
            f"{len(val_split.index)} val images of {len(classes)} classes at {sizes}; "
            f"{cfg.epochs} epochs x {steps_per_epoch} steps "
            f"on {jax.device_count()} device(s), convolutions by {onednn.short_status()}. "
            f"Skipped {skipped} file(s)"
            + (f" (see {workdir / 'skipped.txt'})." if skipped else ".")
        )
        console.print(class_sizes_line(train_split, val_split, cfg.balance), highlight=False)
        for path, reason in skipped_files[:_SHOW_SKIPPED]:
            console.print(
                f"  skipped {printable(path)}: {printable(reason)}", highlight=False, soft_wrap=True
            )
        if skipped > _SHOW_SKIPPED:
            console.print(f"  ... and {skipped - _SHOW_SKIPPED} more.")

    epoch_rows: list[dict] = list(resumed.get("history") or [])
    if start_step and "history" not in resumed:  # its rows are in metrics.jsonl only
        epoch_rows = history.read_metrics(workdir)
    # A mid-epoch checkpoint carries the steps already done in its epoch.
    sums: list[dict] = history.decode_steps(resumed.get("epoch_steps"))

    def meta(step: int, epoch_steps: list[dict] | None = None) -> dict:
        return {
            "history": list(epoch_rows),
            "epoch_steps": history.encode_steps(epoch_steps or []),
            "step": step,
            "epoch": step // steps_per_epoch,
            "classes": classes,
            "model": cfg.model,
            "image_size": list(image_size),
            "workers": cfg.workers,
            "processes": jax.process_count(),
        }

    writer = None
    if cfg.tensorboard and is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not is_main,
    )
    step = saved = start_step
    checked = len(sums)  # steps whose loss was checked to be finite
    # Ctrl-C / SIGTERM stop the run between steps (see interrupts.py). With several
    # processes they would stop at different steps and hang the others' collectives.
    stop_context = stop_requests(enabled=jax.process_count() == 1)
    try:
        with stop_context as stop, progress:
            task = progress.add_task(
                "train", total=total_steps, completed=step, epoch=1, epochs=cfg.epochs, loss="-"
            )
            while step < total_steps and not stop and not stopped_early(epoch_rows, cfg):
                epoch = step // steps_per_epoch + 1
                epoch_end = epoch * steps_per_epoch
                progress.update(task, epoch=epoch)
                t_epoch, wait, first = time.perf_counter(), 0.0, step
                for _ in range(epoch_end - step):
                    t0 = time.perf_counter()
                    batch = next(data_iter)
                    wait += time.perf_counter() - t0
                    state, m = train_step(state, parallel.shard_batch(batch, mesh), key)
                    sums.append(m)
                    step += 1
                    save_now = (
                        cfg.checkpoint_every > 0
                        and step % cfg.checkpoint_every == 0
                        and step != epoch_end
                    )
                    if step % 10 == 0 or step == epoch_end or save_now or stop:
                        # Reading the loss syncs with the device: only every 10 steps, and
                        # before any checkpoint, so that no checkpoint holds a NaN state.
                        loss = float(m["loss_sum"]) / max(float(m["count"]), 1.0)
                        if not cfg.skip_nonfinite:
                            _check_finite(
                                sums[checked:],
                                step - len(sums) + checked + 1,
                                workdir,
                                cfg.lr,
                                saved,
                            )
                        checked = len(sums)
                        progress.update(task, completed=step, loss=f"{loss:.3f}")
                        if writer is not None:
                            writer.add_scalar("step/loss", loss, step)
                            writer.add_scalar("step/lr", float(schedule(step - 1)), step)
                        if save_now:
                            if not cfg.skip_nonfinite:
                                _check_state(state, step, workdir, cfg.lr, saved)
                            checkpoint.save(manager, step, state, meta(step, sums), data_iter)
                            saved = step
                        if stop:
                            break
                if step != epoch_end:  # stopped mid-epoch
                    break
                seconds = time.perf_counter() - t_epoch
                early = early_val is not None and epoch <= cfg.early_epochs
                _, labels, probs, losses = run_eval(
                    eval_step,
                    eval_params(state),
                    state.rest,
                    early_val if early else val_split,
                    cfg.batch_size,
                    mesh,
                )
                row = _epoch_row(
                    epoch,
                    step,
                    float(schedule(step - 1)),
                    history.epoch_totals(sums),
                    summarise(labels, probs, losses, classes),
                    images=(step - first) * cfg.batch_size,
                    seconds=seconds,
                    wait=wait,
                )
                if cfg.early_epochs:
                    row["image_size"] = list(cfg.early_size if early else image_size)
                if cfg.skip_nonfinite:
                    row["skipped_updates"] = int(state.opt_state.total_notfinite)
                # The row goes into the checkpoint first: a resume rebuilds metrics.jsonl
                # from the checkpoint, so each epoch's row appears exactly once.
                epoch_rows.append(row)
                if not cfg.skip_nonfinite:
                    _check_state(state, step, workdir, cfg.lr, saved)
                checkpoint.save(manager, step, state, meta(step), data_iter)
                saved, sums, checked = step, [], 0
                if is_main:
                    history.append_metrics(workdir, row)
                    if writer is not None:
                        for k, v in row.items():
                            if isinstance(v, int | float):  # not the early epochs' size
                                writer.add_scalar(f"epoch/{k}", v, step)
                    progress.console.print(_epoch_line(row))
        if stop and step < total_steps:
            if saved != step:
                if not cfg.skip_nonfinite:
                    _check_state(state, step, workdir, cfg.lr, saved)
                checkpoint.save(manager, step, state, meta(step, sums), data_iter)
            # The save completes in `finally` below, before the message reaches the user.
            raise Interrupted(
                f"{stop.signal} at step {step}/{total_steps}; a checkpoint of step {step} is "
                f"saved in {workdir / 'checkpoints'}. To resume, run the same command again "
                f"(same --workdir {workdir} and settings)."
            )
    finally:
        if writer is not None:
            writer.flush()
        # On every way out: wait for the save in flight (an exit would lose it), and stop
        # grain's worker processes and free their shared memory now, not at exit.
        try:
            checkpoint.finish(manager)
        finally:
            data_iter.close()

    rows, labels, probs, losses = run_eval(
        eval_step, eval_params(state), state.rest, val_split, cfg.batch_size, mesh
    )
    final = summarise(labels, probs, losses, classes)
    if is_main:
        early = stopped_early(epoch_rows, cfg)
        if early:
            console.print(
                f"Stopped early after epoch {epoch_rows[-1]['epoch']}: validation loss has not "
                f"improved for {cfg.early_stop} epochs (best {early['val_loss']:.4f} at epoch "
                f"{early['epoch']})."
            )
        save_json(final, workdir / "eval.json")
        if cfg.report:
            run_folder.write_report(
                cfg, workdir, train_split, val_split, final, (rows, labels, probs, losses), console
            )
        if writer is not None:
            from springfield.report.tensorboard import log_figures

            log_figures(writer, workdir, step)
            writer.close()
        console.print(
            f"Done: validation accuracy {final['accuracy']:.3f} on "
            f"{final['num_images']} images. Run folder: {workdir}"
        )
    return workdir
