"""The end of a run: the final exact evaluation, ``eval.json``, the report and the last line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.console import Console

from springfield.config import save_json
from springfield.training.epoch import stopped_early
from springfield.training.evaluation import run_eval
from springfield.training.inputs import RunData, augmented_samples
from springfield.training.metrics import summarise
from springfield.training.resume import Position, Setup
from springfield.training.steps import eval_params


def finish(
    setup: Setup,
    pos: Position,
    eval_step: Callable,
    data: RunData,
    writer: Any | None,
    console: Console,
) -> dict:
    """Evaluate the final weights on the validation split (at ``--image-size``), write
    ``eval.json``, the report and the TensorBoard figures; returns the eval result."""
    cfg, workdir = setup.cfg, setup.cfg.workdir
    predictions = run_eval(
        eval_step, eval_params(pos.state), pos.state.rest, data.val, cfg.batch_size, setup.mesh
    )
    final = summarise(*predictions[1:], setup.classes)
    if not setup.is_main:
        return final
    early = stopped_early(pos.history, cfg)
    if early:
        console.print(
            f"Stopped early after epoch {pos.history[-1]['epoch']}: validation loss has not "
            f"improved for {cfg.early_stop} epochs (best {early['val_loss']:.4f} at epoch "
            f"{early['epoch']})."
        )
    save_json(final, workdir / "eval.json")
    if cfg.report:
        write_report(setup, data, final, predictions, console)
    if writer is not None:
        from springfield.report.tensorboard import log_figures

        log_figures(writer, workdir, pos.step)
        writer.close()
    console.print(
        f"Done: validation accuracy {final['accuracy']:.3f} on "
        f"{final['num_images']} images. Run folder: {workdir}"
    )
    return final


def write_report(
    setup: Setup, data: RunData, final: dict, predictions: tuple, console: Console
) -> None:
    """Figures and report.html of a finished run (``report/``), timed on the console."""
    from springfield.report.run import write_run_report

    cfg, workdir = setup.cfg, setup.cfg.workdir
    t0 = time.perf_counter()
    write_run_report(
        workdir,
        run_dir=workdir,
        classes=setup.classes,
        eval_result=final,
        images=np.load(data.val.npy, mmap_mode="r"),
        predictions=predictions,
        samples=augmented_samples(cfg, data.train),
        config=json.loads((workdir / "config.json").read_text()),
        dataset=json.loads((workdir / "dataset.json").read_text()),
    )
    console.print(f"Report: {workdir / 'report.html'} ({time.perf_counter() - t0:.1f} s)")
