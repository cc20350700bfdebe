"""``--time-budget``: the number of epochs that fits a wall time on this machine.

The same command runs 1.5-2x longer on one 2-core machine than on another (CPU model,
bfloat16 instructions, load), so a fixed ``--epochs`` cannot promise "ten minutes". Before
training, the run's own train and eval steps are compiled and timed on a real batch, on a
copy of the initial state, and the epochs are set from what is left of the budget after
start-up. The learning-rate schedule depends on the epochs, so the real steps are compiled
once more with them (the measured compile time is counted for that).

The probe's few seconds do not predict minutes on a shared machine: on one 2-core VM its
measure of the same step ranged over 545-1,166 ms between runs, and one run's epochs then
went at 580-860 ms a step. So after each epoch the run re-fits its epochs to its own epoch
times (:class:`Refit`): more epochs while it is in the first half of its schedule, fewer
whenever the rest would overrun. The choice is written into ``config.json``; resuming the
run keeps it instead of measuring again.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import jax
import numpy as np

from springfield import parallel
from springfield.errors import SpringfieldError

if TYPE_CHECKING:
    from rich.console import Console

    from springfield.config import TrainConfig
    from springfield.training.inputs import RunData

_UNITS = {"s": 1, "m": 60, "h": 3600}
# The final evaluation, eval.json and the report after the last epoch, beyond one pass of
# the eval step over the validation split (measured: 5-15 s on 2 cores).
FINAL_OVERHEAD_S = 20.0
# Untimed steps after the first: what the input workers prefetched while it compiled.
DRAIN = 10
# The loop's steps take longer than the probe's: six classes at 160 px on a 2-core Zen 5, with
# oneDNN's depthwise kernels, the probe measured 708 ms a step and the loop's nine epochs
# ran 0.98-1.43x that (1.19x on average; epochs of 46-66 s for 59 steps), which with a 1.1
# margin ended the run 48 s past its 10 minutes. (Before those kernels, at 991 ms a step,
# the loop matched the probe.) The spread is the machine's: the same steps alone
# (benchmarks/profile_step.py --step-times 30) had a slowest step 2.3x the median.
MARGIN = 1.3
# With the run's own epochs measured, the margin covers only their spread around the mean
# (six runs' epochs went at 0.64-1.24x their run's mean speed; over the epochs left, less).
REFIT_MARGIN = 1.1


def parse_budget(text: str) -> float:
    """Seconds in ``text``: ``600``, ``600s``, ``10m``, ``1.5h`` or ``1h30m``."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    elif re.fullmatch(r"(\d+(\.\d+)?[smh])+", s):
        seconds = sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([smh])", s))
    else:
        raise SpringfieldError(
            f"--time-budget {text!r}: write a duration such as 600s, 10m, 1.5h or 1h30m."
        )
    if seconds <= 0:
        raise SpringfieldError(f"--time-budget {text!r}: must be more than zero.")
    return seconds


@dataclass(frozen=True)
class Measured:
    """Seconds per train step (and per frozen step of a fine-tune's first epochs, else
    0), per evaluation pass, and per compilation of the train steps."""

    step_s: float
    frozen_s: float
    eval_s: float
    compile_s: float


def measure(cfg: TrainConfig, data: RunData, mesh, steps_per_epoch: int) -> Measured:
    """Time the train and eval steps ``cfg`` would run, on a batch of the training split."""
    from springfield.training.assembly import assemble
    from springfield.training.inputs import train_iterator

    built = assemble(cfg, data, mesh, steps_per_epoch=steps_per_epoch)
    n = parallel.local_batch_size(cfg.batch_size, mesh)
    # Batches from a pipeline of its own, as training will have it: on a 2-core machine the
    # input workers take CPU from the step (timed on a fixed batch, an epoch came out 1.5x
    # shorter than it then took). The run's own iterator is untouched.
    # Enough batches for any split size.
    probe = replace(cfg, epochs=64, early_epochs=0)
    batches = train_iterator(probe, data.train, n, steps_per_epoch, 64)
    key = jax.random.key(0)
    state = built.state

    def timed(step, count: int) -> tuple[float, float]:
        # (the first call, with its compilation; the mean step of the last `count`). While
        # the first call compiles, the workers fill their prefetch buffers (up to 8 batches
        # here): steps served from them run without the workers' competition, so they are
        # left out of the mean (they made a 63 s epoch look like 47 s).
        nonlocal state
        t0 = time.perf_counter()
        state, metrics = step(state, parallel.shard_batch(next(batches), mesh), key)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - t0
        for i in range(DRAIN + count):
            if i == DRAIN:
                t0 = time.perf_counter()
            state, metrics = step(state, parallel.shard_batch(next(batches), mesh), key)
            jax.block_until_ready(metrics)
        return first, (time.perf_counter() - t0) / count

    try:
        first, step_s = timed(built.train_step, 8)
        compile_s = first - step_s
        frozen_s = 0.0
        if built.frozen_step is not None:
            first, frozen_s = timed(built.frozen_step, 6)
            compile_s += first - frozen_s
        batch = parallel.shard_batch(next(batches), mesh)
    finally:
        batches.close()
    eval_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(built.eval_step(state.params, state.rest, batch))
        eval_times.append(time.perf_counter() - t0)
    eval_passes = math.ceil(len(data.val.index) / n)
    return Measured(step_s, frozen_s, eval_passes * float(np.median(eval_times[1:])), compile_s)


@dataclass
class Refit:
    """The budget's account while the run trains: after each epoch, :meth:`after_epoch`
    gives the epochs that fit at the pace of the epochs measured so far.

    The machines springfield is measured on change pace from minute to minute (a run's
    epochs went at 0.64-1.24x their mean), and a change of plan costs more than its
    recompilation (the schedule and input stream are rebuilt too): re-fitting to the mean
    alone once changed a run's epochs six times (13, 12, 13, 12, 11, 10, 9) and ended it 4 s
    past its budget. So the pace is the slower of the mean and the last two epochs', a
    change's cost is the most a change has cost in this run (at least the compilation the
    budget measured), and a run that had to shrink never grows again."""

    budget_s: float
    started: float
    """``time.perf_counter()`` when the budget began (the command's start)."""
    compile_s: float
    """What a change costs at least: the train steps compile again for the new schedule."""
    unmeasured: int
    """Epochs that do not tell the speed of the rest: frozen ones, ones at ``--early-size``."""
    epoch_s: list[float] = field(default_factory=list)
    changes: list[dict] = field(default_factory=list)
    """Each change, for ``config.json``: after which epoch, from and to how many epochs."""
    kept: bool = False
    """A resumed run: its epochs were chosen in an earlier process (and its budget began
    there), so they stay."""
    change_costs: list[float] = field(default_factory=list)
    """What each change cost, measured: the epoch after it took that much longer than its
    steady pace."""
    _last: float | None = None  # time.perf_counter() at the previous after_epoch
    _changed: bool = False  # the previous after_epoch changed the plan

    def pace(self) -> float:
        """The seconds an epoch is expected to take: the slower of the mean of the epochs
        measured and the mean of the last two."""
        return max(float(np.mean(self.epoch_s)), float(np.mean(self.epoch_s[-2:])))

    def change_s(self) -> float:
        """What a change is expected to cost: the most one has cost in this run, at least
        the budget's measured compilation."""
        return max([self.compile_s, *self.change_costs])

    def after_epoch(self, epoch: int, epochs: int, epoch_s: float, now: float | None = None) -> int:
        """The epochs to train now that ``epoch`` of ``epochs`` took ``epoch_s`` seconds
        (train steps without compilation, evaluation, checkpoint) and it is ``now``
        (``time.perf_counter()`` if None)."""
        if self.kept:
            return epochs
        now = time.perf_counter() if now is None else now
        if self._changed and self._last is not None:
            self.change_costs.append(max(0.0, now - self._last - epoch_s))
        self._last, self._changed = now, False
        if epoch > self.unmeasured:
            self.epoch_s.append(epoch_s)
        if not self.epoch_s:
            return epochs
        left = self.budget_s - (now - self.started)
        shrunk = any(c["epochs"][1] < c["epochs"][0] for c in self.changes)
        pace = self.pace()
        new = refit_epochs(epochs, epoch, left, pace, self.change_s(), grow=not shrunk)
        if new != epochs:
            self._changed = True
            self.changes.append(
                {"after_epoch": epoch, "epochs": [epochs, new], "epoch_s": round(pace, 1)}
            )
        return new

    def record(self, extra: dict | None) -> dict | None:
        """``config.json``'s extra keys ``extra`` with the changes made so far."""
        if not self.changes:
            return extra
        return {**(extra or {}), "time_budget_changes": self.changes}


def refit_epochs(
    epochs: int, done: int, left_s: float, epoch_s: float, compile_s: float, grow: bool = True
) -> int:
    """How many epochs a run of ``epochs`` should train, ``done`` of them finished, with
    ``left_s`` of its budget left and epochs of ``epoch_s`` seconds. A change costs
    ``compile_s``; it is made only if the run would overrun, or if ``grow`` and at least one
    more epoch fits while the run is in its first half (later, a longer schedule would raise
    a learning rate already annealed). At least one more epoch is trained."""
    if done >= epochs:
        return epochs

    def fits(extra_s: float) -> int:
        spare = left_s - extra_s - FINAL_OVERHEAD_S
        return done + max(1, int(spare // (epoch_s * REFIT_MARGIN)))

    if fits(0.0) == epochs:
        return epochs
    new = fits(compile_s)
    if new > epochs and (2 * done > epochs or not grow):
        return epochs
    return new


def fit_epochs(
    cfg: TrainConfig,
    data: RunData,
    mesh,
    steps_per_epoch: int,
    started: float,
    console: Console | None,
) -> tuple[TrainConfig, Refit]:
    """``cfg`` with ``epochs`` set so that the run ends within ``--time-budget`` of
    ``started`` (a ``time.perf_counter()`` reading), and the :class:`Refit` that adjusts
    them as the run goes. A run folder that already chose keeps its choice and the record
    of its changes (a :class:`Refit` that changes nothing). At least one epoch (after a
    fine-tune's frozen ones) is trained even when the budget is too small, with a warning."""
    budget = parse_budget(cfg.time_budget)
    old = _recorded(cfg)
    if old is not None:
        changes = old.get("time_budget_changes", [])
        return replace(cfg, epochs=int(old["epochs"])), Refit(
            budget, started, 0.0, 0, changes=changes, kept=True
        )
    from springfield.models import starts_pretrained

    frozen = cfg.freeze_epochs if starts_pretrained(cfg) and cfg.freeze_epochs > 0 else 0
    m = measure(replace(cfg, epochs=frozen + 1), data, mesh, steps_per_epoch)
    left = budget - (time.perf_counter() - started)
    epochs = epochs_that_fit(left, m, steps_per_epoch, frozen)
    epoch_s = _epoch_seconds(m.step_s, m, steps_per_epoch)
    if console is not None:
        console.print(
            f"--time-budget {cfg.time_budget}: {epochs} epochs of about {epoch_s:.0f} s "
            f"({m.step_s * 1000:.0f} ms a step, {m.eval_s:.1f} s to evaluate, "
            f"{m.compile_s:.0f} s to compile, measured on this machine just now)."
        )
        short = epoch_s - _spare_seconds(left, m, steps_per_epoch, frozen)
        if short > 0:
            console.print(
                f"[yellow]--time-budget {cfg.time_budget} is too short for this run: "
                f"{frozen + 1} epoch(s) take about {short:.0f} s more than it leaves.[/yellow]"
            )
    refit = Refit(budget, started, m.compile_s, max(frozen, cfg.early_epochs))
    return replace(cfg, epochs=epochs), refit


def _recorded(cfg: TrainConfig) -> dict | None:
    """The run folder's ``config.json`` when it holds a budget's choice for ``cfg``'s
    ``--time-budget`` (a resumed run), else None."""
    record = cfg.workdir / "config.json"
    if not record.exists():
        return None
    old = json.loads(record.read_text())
    if old.get("time_budget") == cfg.time_budget and old.get("epochs"):
        return old
    return None


def steady_epoch_seconds(wall_s: float, train_s: float, first_s: float | None, steps: int) -> float:
    """An epoch's seconds as the next epochs will take them: ``wall_s`` (its train steps,
    evaluation and checkpoint), less its first step's compilation when that step ran
    ``first_s`` of the ``train_s`` the steps took; the first step counts as an average one."""
    if first_s is None or steps < 2:
        return wall_s
    return wall_s - first_s + (train_s - first_s) / (steps - 1)


def epochs_that_fit(left_s: float, m: Measured, steps_per_epoch: int, frozen: int) -> int:
    """How many epochs fit in ``left_s`` seconds at the speeds ``m``: ``frozen`` epochs at
    the frozen step's speed first, at least one epoch after them. The real train steps
    compile once more (their schedule depends on the answer; the eval step's program comes
    from JAX's cache), and the final evaluation and report follow the last epoch."""
    spare = _spare_seconds(left_s, m, steps_per_epoch, frozen)
    return frozen + max(1, int(spare // _epoch_seconds(m.step_s, m, steps_per_epoch)))


def _epoch_seconds(step_s: float, m: Measured, steps_per_epoch: int) -> float:
    return steps_per_epoch * step_s * MARGIN + m.eval_s


def _spare_seconds(left_s: float, m: Measured, steps_per_epoch: int, frozen: int) -> float:
    # What `left_s` leaves for the unfrozen epochs.
    overhead = m.compile_s + m.eval_s + FINAL_OVERHEAD_S
    return left_s - overhead - frozen * _epoch_seconds(m.frozen_s, m, steps_per_epoch)
