"""The learning-rate range test (Smith, 2017; fastai's ``lr_find``).

From a fresh model (the model, optimizer and data of the given train flags), the rate grows
exponentially from ``start_lr`` to ``end_lr`` over ``steps`` train steps, one batch each,
and the training loss is recorded. The sweep stops once the loss diverges: the smoothed loss
exceeds ``diverge`` times its minimum, or a loss is not finite.

The suggestion follows fastai's "valley" rule: on the smoothed loss (the first 10% and the
last 5 points left out), take the longest stretch over which the loss keeps falling and
suggest the rate a little past its middle (at 1/3 + 1/6 of its length). It lies where the
loss falls fastest and steadily, well below the divergence. ``lr_find.json`` also records
two other common rules: steepest descent of the smoothed loss, and the minimum's rate / 10.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax
import numpy as np
import optax
from rich.console import Console

from springfield import parallel
from springfield.config import TrainConfig, save_json
from springfield.errors import SpringfieldError
from springfield.training.assembly import assemble
from springfield.training.checks import check_config, check_steps_per_epoch
from springfield.training.inputs import load_data, train_iterator
from springfield.training.optim import lr_of_step

RULE = (
    "valley: the rate a little past the middle of the longest stretch where the smoothed "
    "loss keeps falling (fastai's default)"
)


@dataclass(frozen=True)
class LrFind:
    """The sweep's record: rates, raw and smoothed losses, and the suggestions."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str
    steepest: float
    min_over_10: float
    diverged_at: float | None  # the rate at which the sweep stopped, if it diverged
    start_lr: float
    end_lr: float
    steps: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def exponential_schedule(start_lr: float, end_lr: float, steps: int) -> optax.Schedule:
    """``start_lr * (end_lr / start_lr) ** (count / (steps - 1))``: ``start_lr`` at the
    first update, ``end_lr`` at the last."""
    ratio = end_lr / start_lr
    span = max(1, steps - 1)
    return lambda count: start_lr * ratio ** (count / span)


def valley(lrs: list[float], smoothed: list[float]) -> float:
    """fastai's valley rule on an already trimmed sweep (see the module docstring)."""
    n = len(smoothed)
    longest = [1] * n  # longest falling subsequence ending at each point
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if smoothed[i] < smoothed[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end, start = i, i - longest[i]
    third = (end - start) / 3
    return lrs[start + int(third) + int(third / 2)]


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float, float]:
    """``(valley, steepest, min / 10)`` of a sweep."""
    lo, hi = len(lrs) // 10, len(lrs) - 5
    if hi - lo < 5:  # too short to trim
        lo, hi = 0, len(lrs)
    lrs_t, sm_t = lrs[lo:hi], smoothed[lo:hi]
    slopes = np.gradient(np.asarray(sm_t), np.log(np.asarray(lrs_t)))
    steepest = lrs_t[int(np.argmin(slopes))]
    at_min = lrs[int(np.argmin(smoothed))]
    return valley(lrs_t, sm_t), steepest, at_min / 10


def lr_find(
    cfg: TrainConfig,
    out_dir: Path,
    console: Console | None = None,
    *,
    start_lr: float = 1e-6,
    end_lr: float = 10.0,
    steps: int = 100,
    beta: float = 0.9,
    diverge: float = 4.0,
) -> LrFind:
    """Run the range test for ``cfg``'s model, optimizer and data; write ``lr_find.json``
    and ``lr_find.png`` into ``out_dir`` and return the record. ``cfg.image_size`` must be
    resolved; ``cfg.lr`` is not used (the sweep sets the rate)."""
    import time

    if not 0 < start_lr < end_lr:
        raise SpringfieldError(
            f"--start-lr {start_lr:g} / --end-lr {end_lr:g}: need 0 < start < end."
        )
    if steps < 10:
        raise SpringfieldError(f"--steps {steps}: use at least 10 (100-300 is usual).")
    if jax.process_count() > 1:
        raise SpringfieldError(
            "--lr auto / lr-find: run the finder on one process (springfield lr-find), then "
            "pass its suggestion as --lr to the --distributed run."
        )
    cfg = replace(cfg, lr=start_lr, early_epochs=0, ema=0.0)
    check_config(cfg)
    t0 = time.perf_counter()
    data = load_data(cfg, console)
    steps_per_epoch = check_steps_per_epoch(cfg, len(data.train.index))
    epochs = math.ceil(steps / steps_per_epoch)
    mesh = parallel.make_mesh()
    schedule = exponential_schedule(start_lr, end_lr, steps)
    lr_at = lr_of_step(schedule)
    # Training's own assembly, so the sweep follows the loss training minimises (class
    # weights included). skip_nonfinite off: a NaN is the sweep's answer, not a step to skip.
    built = assemble(replace(cfg, skip_nonfinite=False), data, mesh, schedule=schedule)
    state, train_step = built.state, built.train_step
    key = jax.random.key(cfg.seed)
    data_iter = train_iterator(
        replace(cfg, epochs=epochs),
        data.train,
        parallel.local_batch_size(cfg.batch_size, mesh),
        steps_per_epoch,
        steps,
    )
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    diverged_at = None
    avg = 0.0
    try:
        for i in range(steps):
            lr = lr_at(i)
            state, m = train_step(state, parallel.shard_batch(next(data_iter), mesh), key)
            loss = float(m["loss_sum"]) / max(float(m["count"]), 1.0)
            if not math.isfinite(loss):
                diverged_at = lr
                break
            avg = beta * avg + (1 - beta) * loss
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(avg / (1 - beta ** (i + 1)))
            if smoothed[-1] > diverge * min(smoothed):
                diverged_at = lr
                break
    finally:
        data_iter.close()
    if len(lrs) < 10:
        raise SpringfieldError(
            f"the loss diverged within {len(lrs)} steps of the sweep, at a rate of "
            f"{diverged_at:g}: pass a lower --start-lr (now {start_lr:g})."
        )
    suggestion, steepest, min_over_10 = suggest(lrs, smoothed)
    result = LrFind(
        lrs,
        losses,
        smoothed,
        suggestion,
        RULE,
        steepest,
        min_over_10,
        diverged_at,
        start_lr,
        end_lr,
        steps,
        round(time.perf_counter() - t0, 2),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(result.to_json(), out_dir / "lr_find.json")
    from springfield.report.lr_find import plot_lr_find

    plot_lr_find(result, out_dir / "lr_find.png")
    if console is not None:
        stop = (
            f"stopped at {diverged_at:.2g} (diverged)"
            if diverged_at
            else f"no divergence up to {end_lr:g}"
        )
        console.print(
            f"Learning-rate finder: {len(lrs)} steps from {start_lr:g}, {stop}, "
            f"{result.seconds:.0f} s. Suggested --lr [bold]{suggestion:.2e}[/] by the {RULE} "
            f"(steepest descent {steepest:.2e}, minimum/10 {min_over_10:.2e}). "
            f"Plot: {out_dir / 'lr_find.png'}"
        )
    return result


def auto_lr(cfg: TrainConfig, console: Console | None) -> tuple[TrainConfig, dict]:
    """``cfg`` with ``lr="auto"`` replaced by the finder's suggestion, and the record for
    ``config.json``. The finder runs once per run folder: a resumed run reuses its
    ``lr_find.json``."""
    import json

    path = cfg.workdir / "lr_find.json"
    if path.exists():
        found = json.loads(path.read_text())
        if console is not None:
            console.print(f"--lr auto: {found['suggestion']:.2e}, found before ({path}).")
    else:
        found = lr_find(cfg, cfg.workdir, console).to_json()
    record = {
        "lr_find": {
            "requested": "auto",
            "suggestion": found["suggestion"],
            "rule": found["rule"],
            "plot": "lr_find.png",
        }
    }
    return replace(cfg, lr=found["suggestion"]), record
