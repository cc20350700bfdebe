"""``--time-budget``: the epochs chosen from this machine's measured speed, recorded and kept
on resume, and the mistakes a user can make with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_faults import FAST, _child_env, _error, _rows

from springfield.cli import main
from springfield.errors import SpringfieldError
from springfield.training.budget import (
    FINAL_OVERHEAD_S,
    MARGIN,
    REFIT_MARGIN,
    Measured,
    Refit,
    epochs_that_fit,
    parse_budget,
    refit_epochs,
    steady_epoch_seconds,
)


@pytest.mark.parametrize(
    "text,seconds", [("600", 600), ("600s", 600), ("10m", 600), ("1.5h", 5400), ("1h30m", 5400)]
)
def test_budgets_read_as_a_person_writes_them(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10 x", "0s", "-5m", ""])
def test_unreadable_budgets_name_the_flag(text):
    with pytest.raises(SpringfieldError, match="--time-budget"):
        parse_budget(text)


def test_the_epochs_that_fit_follow_the_measured_speeds():
    m = Measured(step_s=0.5, frozen_s=0.1, eval_s=4.0, compile_s=10.0)
    overhead = 10 + 4 + FINAL_OVERHEAD_S  # one more compilation, the final evaluation, report
    epoch_s = 10 * 0.5 * MARGIN + 4  # 10 steps and an evaluation
    assert epochs_that_fit(overhead + 9 * epoch_s + 0.1, m, 10, frozen=0) == 9
    assert epochs_that_fit(overhead + 9 * epoch_s - 0.1, m, 10, frozen=0) == 8
    # A frozen epoch costs its own, cheaper steps.
    frozen_s = 10 * 0.1 * MARGIN + 4
    assert epochs_that_fit(overhead + frozen_s + 3 * epoch_s + 0.1, m, 10, frozen=1) == 4
    # Twice the step time: about half the epochs.
    slow = Measured(step_s=1.0, frozen_s=0.2, eval_s=4.0, compile_s=10.0)
    assert epochs_that_fit(overhead + 9 * epoch_s + 0.1, slow, 10, frozen=0) == int(
        9 * epoch_s // (10 * MARGIN + 4)
    )
    # Never fewer than one epoch after the frozen ones.
    assert epochs_that_fit(5, slow, 10, frozen=2) == 3


def test_a_run_refits_its_epochs_to_its_own_pace():
    # 10 epochs planned, 2 done, epochs of 30 s: 240 s keep the plan.
    spare = FINAL_OVERHEAD_S + 8 * 30 * REFIT_MARGIN
    assert refit_epochs(10, 2, spare + 1, 30.0, compile_s=10) == 10
    # Faster than planned, in the first half: as many more as fit after a recompilation.
    assert refit_epochs(10, 2, spare + 10 + 4 * 33 + 1, 30.0, compile_s=10) == 14
    # ... but not when the one more epoch that fits does not pay for the recompilation.
    assert refit_epochs(10, 2, spare + 33 + 1, 30.0, compile_s=10) == 10
    # Past the half, a longer schedule would raise an annealed learning rate: kept.
    assert refit_epochs(10, 6, spare + 1000, 30.0, compile_s=10) == 10
    # Slower than planned: fewer epochs at any point, at least one more.
    assert refit_epochs(10, 2, spare - 1, 30.0, compile_s=10) == 9
    assert refit_epochs(10, 8, 10.0, 30.0, compile_s=10) == 9
    # A finished run stays finished.
    assert refit_epochs(10, 10, 0.0, 30.0, compile_s=10) == 10


def test_a_refit_learns_what_a_change_costs_and_never_grows_after_shrinking():
    # The flip-flop a wandering machine caused (13, 12, 13, 12, ... epochs, 4 s past the
    # budget): a change costs what it measured, and a run that shrank does not grow again.
    r = Refit(budget_s=600.0, started=0.0, compile_s=8.0, unmeasured=0)
    # Epoch 1 of 15 took 40 s and ended 140 s in: 460 s left fit 1 + 9 epochs of 44 s
    # after a recompilation and the final evaluation.
    assert r.after_epoch(1, 15, 40.0, now=140.0) == 10
    # Epoch 2 ran at 30 s but took 55 s of wall time: the change cost 25 s. At the faster
    # pace one more epoch would fit, but the run has shrunk once: it keeps 10.
    assert r.after_epoch(2, 10, 30.0, now=195.0) == 10
    assert r.change_costs == [25.0] and r.change_s() == 25.0
    assert [c["epochs"] for c in r.changes] == [[15, 10]]
    # Without the shrink, the same pace grows the plan (first half of the schedule).
    assert refit_epochs(10, 2, 405.0, 35.0, compile_s=25.0) == 11
    # The pace is the slower of the mean and the last two epochs'.
    r.epoch_s = [30.0, 50.0, 20.0]
    assert r.pace() == pytest.approx(35.0)
    r.epoch_s = [50.0, 20.0, 20.0]
    assert r.pace() == pytest.approx(30.0)


def test_an_epochs_pace_leaves_out_its_compilation():
    # 11 steps in 14 s, the first (compiling) 4 s of them; then 3 s of evaluation.
    assert steady_epoch_seconds(17.0, 14.0, 4.0, 11) == pytest.approx(17 - 4 + 1)
    assert steady_epoch_seconds(17.0, 14.0, None, 11) == 17.0


def test_a_budget_sets_the_epochs_refits_them_and_a_resume_keeps_them(tiny_folder, tmp_path):
    workdir = tmp_path / "run"
    # A checkpoint after every step: time the probe's few steps do not see (it measured
    # about 20 ms a step here, and a step with its checkpoint took 10x that), so the run's
    # first epoch tells it that far fewer epochs fit. A process of its own: the budget
    # counts from the command's start. XLA's kernels: with this test's empty cache, the
    # oneDNN ones would first be built, for longer than the budget.
    cmd = [sys.executable, "-m", "springfield.cli", "train", "--data", str(tiny_folder),
           "--workdir", str(workdir), *FAST, "--time-budget", "40s",
           "--checkpoint-every", "1", "--kernels", "xla"]  # fmt: skip

    def run() -> str:
        done = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return " ".join(done.stderr.split())

    err = run()
    config = json.loads((workdir / "config.json").read_text())
    assert "time_budget_changes" in config, err
    epochs, changes = config["epochs"], config["time_budget_changes"]
    planned = changes[0]["epochs"][0]
    assert f"--time-budget 40s: {planned} epochs of about" in err
    assert changes[0]["after_epoch"] == 1 and changes[0]["epochs"][1] < planned
    for change in changes:
        a, b = change["epochs"]
        assert f"--time-budget 40s: {b} epochs instead of {a}" in err
    assert changes[-1]["epochs"][1] == epochs
    # The epochs recorded are the ones trained.
    assert [r["epoch"] for r in _rows(workdir)] == list(range(1, epochs + 1))
    # The same command again finds the run complete: no new measurement, no other epochs,
    # the record of the changes kept.
    assert "--time-budget 40s:" not in run()
    again = json.loads((workdir / "config.json").read_text())
    assert again["epochs"] == epochs and again["time_budget_changes"] == changes


def test_a_budget_too_small_trains_one_epoch_and_says_so(tiny_folder, tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "--data", str(tiny_folder), "--workdir", str(workdir), *FAST,
            "--time-budget", "1s"]  # fmt: skip
    assert main(argv) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "is too short for this run" in err
    assert json.loads((workdir / "config.json").read_text())["epochs"] == 1


def test_budget_mistakes_are_one_line_errors(tiny_folder, tmp_path, capsys):
    base = ["train", "--data", str(tiny_folder), "--workdir", str(tmp_path / "r"), *FAST]
    assert "--time-budget" in _error(capsys, [*base, "--time-budget", "soon"])
    msg = _error(capsys, [*base, "--model", "efficientnet-lite0", "--activation", "gelu"])
    assert "ReLU6" in msg
