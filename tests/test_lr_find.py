"""The learning-rate finder: a suggestion below the divergence, and train --lr auto end to end."""

from __future__ import annotations

import json
import shutil

import springfield
from springfield.cli import main

FAST = ["--image-size", "32", "32", "--batch-size", "8", "--workers", "0", "--no-tensorboard"]


def test_suggestion_lies_below_where_a_far_too_high_rate_diverges(tiny_folder, tmp_path):
    # Plain SGD on a tiny CNN: rates near 1e3 blow the loss up, so the sweep must stop.
    result = springfield.lr_find(
        data=tiny_folder,
        workdir=tmp_path / "f",
        model="refcnn",
        optimizer="sgd",
        weight_decay=0.0,
        image_size=(32, 32),
        batch_size=8,
        workers=0,
        start_lr=1e-4,
        end_lr=1e3,
        steps=60,
        quiet=True,
    )
    assert result.diverged_at is not None and result.diverged_at < 1e3
    assert len(result.lrs) < 60  # it stopped at the divergence
    assert result.lrs[0] <= result.suggestion < result.diverged_at
    # At the suggestion the smoothed loss is on its way down, below where it started.
    i = result.lrs.index(result.suggestion)
    assert result.smoothed[i] < result.smoothed[0]
    assert result.smoothed[-1] > 4 * min(result.smoothed) or result.diverged_at == result.lrs[-1]
    saved = json.loads((tmp_path / "f" / "lr_find.json").read_text())
    assert saved["suggestion"] == result.suggestion and saved["lrs"] == result.lrs
    assert (tmp_path / "f" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_train_lr_auto_records_the_suggestion_and_shows_the_plot(tiny_folder, tmp_path, capsys):
    run = tmp_path / "auto"
    argv = ["train", "--data", str(tiny_folder), "--workdir", str(run), "--epochs", "1", *FAST]
    assert main([*argv, "--lr", "auto"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(run)  # the result; the progress goes to stderr
    found = json.loads((run / "lr_find.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr"] == found["suggestion"] and cfg["lr"] != 3e-3
    assert cfg["lr_find"]["requested"] == "auto"
    assert cfg["lr_find"]["suggestion"] == found["suggestion"]
    assert "Suggested --lr" in err and "valley" in err
    assert (run / "lr_find.png").exists()
    assert "Learning-rate finder" in (run / "report.html").read_text()
    # The peak of the one-cycle schedule is the suggestion: the first epoch's lr is below it.
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[0]["lr"] < cfg["lr"]

    # Running the same command again reuses the suggestion instead of sweeping again.
    assert main([*argv, "--lr", "auto"]) == 0
    assert "found before" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["lr"] == found["suggestion"]


def test_lr_find_command_prints_the_rule_and_refuses_a_bad_sweep(tiny_folder, tmp_path, capsys):
    argv = ["lr-find", "--data", str(tiny_folder), "--workdir", str(tmp_path / "f"), *FAST]
    assert main([*argv, "--steps", "20"]) == 0
    out, err = capsys.readouterr()
    suggestion = json.loads((tmp_path / "f" / "lr_find.json").read_text())["suggestion"]
    assert f"Suggested --lr {suggestion:.2e}" in " ".join(err.split())
    assert out == f"{suggestion:.2e}\n"  # the result alone on stdout
    assert main([*argv, "--start-lr", "1", "--end-lr", "0.1"]) == 2
    assert "--start-lr 1 / --end-lr 0.1: need 0 < start < end" in capsys.readouterr().err


def test_lr_find_balance_loss_sweeps_the_class_weighted_loss(tiny_folder, tmp_path):
    # One class cut to a few images: --balance loss then weights it up in training's loss,
    # and the sweep must follow that loss, not the plain one.
    data = tmp_path / "imbalanced"
    shutil.copytree(tiny_folder, data)
    for path in sorted((data / "bart_simpson").iterdir())[:8]:
        path.unlink()
    sweep = dict(
        data=data,
        model="refcnn",
        image_size=(32, 32),
        batch_size=8,
        workers=0,
        start_lr=1e-4,
        end_lr=1e-2,
        steps=12,
        quiet=True,
    )
    plain = springfield.lr_find(workdir=tmp_path / "plain", **sweep)
    weighted = springfield.lr_find(workdir=tmp_path / "weighted", balance="loss", **sweep)
    # The same fresh model and first batch: the first loss (reported unweighted) is the same;
    # the weighted gradients then move the model elsewhere.
    assert weighted.losses[0] == plain.losses[0]
    assert weighted.losses[1:] != plain.losses[1:]
