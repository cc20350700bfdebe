"""``--time-budget``: the epochs chosen from this machine's measured speed, recorded and kept
on resume, and the mistakes a user can make with it."""

from __future__ import annotations

import json

import pytest
from test_faults import FAST, _error, _rows

from springfield.cli import main
from springfield.errors import SpringfieldError
from springfield.training.budget import FINAL_OVERHEAD_S, Measured, epochs_that_fit, parse_budget


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
    # 10 steps an epoch: 5 s train * 1.05 + 4 s eval = 9.25 s; after 10 s compile, 4 s final
    # eval and the report's allowance, 100 s hold 10 epochs and 60 s hold 6.
    assert epochs_that_fit(100 + 10 + 4 + FINAL_OVERHEAD_S, m, 10, frozen=0) == 10
    assert epochs_that_fit(60 + 10 + 4 + FINAL_OVERHEAD_S, m, 10, frozen=0) == 6
    # A frozen epoch costs its own (cheaper) steps: 1 s * 1.05 + 4 s.
    assert epochs_that_fit(60 + 10 + 4 + FINAL_OVERHEAD_S, m, 10, frozen=1) == 6
    # Twice the step time (14.5 s an epoch): 6; never fewer than one after the frozen.
    slow = Measured(step_s=1.0, frozen_s=0.2, eval_s=4.0, compile_s=10.0)
    assert epochs_that_fit(100 + 10 + 4 + FINAL_OVERHEAD_S, slow, 10, frozen=0) == 6
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
