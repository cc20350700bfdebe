"""``--time-budget``: the epochs chosen from this machine's measured speed, recorded and kept
on resume, and the mistakes a user can make with it."""

from __future__ import annotations

import json

import pytest
from test_faults import FAST, _error, _rows

from springfield.cli import main
from springfield.errors import SpringfieldError
from springfield.training.budget import (
    FINAL_OVERHEAD_S,
    MARGIN,
    Measured,
    epochs_that_fit,
    parse_budget,
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


def test_a_budget_sets_the_epochs_records_them_and_a_resume_keeps_them(
    tiny_folder, tmp_path, capsys
):
    workdir = tmp_path / "run"
    argv = ["train", "--data", str(tiny_folder), "--workdir", str(workdir), *FAST,
            "--time-budget", "1m", "--epochs", "1"]  # fmt: skip
    assert main(argv) == 0
    err = " ".join(capsys.readouterr().err.split())
    epochs = json.loads((workdir / "config.json").read_text())["epochs"]
    # The epochs announced are the ones recorded and trained (how many depends on this
    # machine's speed: epochs_that_fit's test checks the arithmetic).
    assert f"--time-budget 1m: {epochs} epochs of about" in err
    assert [r["epoch"] for r in _rows(workdir)] == list(range(1, epochs + 1))
    # The same command again finds the run complete: no new measurement, no other epochs.
    assert main(argv) == 0
    assert "--time-budget 1m:" not in " ".join(capsys.readouterr().err.split())
    assert json.loads((workdir / "config.json").read_text())["epochs"] == epochs


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
