"""springfield compare: every variant trained, a summary true to the runs, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from springfield.cli import main

# refcnn compiles in a fraction of resnet's time: most of a tiny run is compilation.
FAST = [
    "--model",
    "refcnn",
    "--image-size",
    "32",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--no-tensorboard",
    "--no-report",
]
USER_ACTIVATION = """
import jax.numpy as jnp


def squareplus(x):
    return (x + jnp.sqrt(x * x + 4.0)) / 2.0
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "myacts.py").write_text(USER_ACTIVATION)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_activations_two_seeds_summary_matches_each_runs_metrics(
    tiny_folder, tmp_path, user_module, capsys
):
    out = tmp_path / "cmp"
    argv = ["compare", "--vary", "activation=relu,myacts:squareplus", "--seeds", "0", "1"]
    argv += ["--data", str(tiny_folder), "--workdir", str(out), "--epochs", "2", *FAST]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    names = [v["name"] for v in summary["variants"]]
    assert names == ["activation=relu", "activation=myacts:squareplus"]
    for v in summary["variants"]:
        runs = [out / v["folder"] / f"seed{s}" for s in (0, 1)]
        cfgs = [json.loads((r / "config.json").read_text()) for r in runs]
        assert [c["seed"] for c in cfgs] == [0, 1]
        assert {c["activation"] for c in cfgs} == {v["name"].split("=", 1)[1]}
        rows = [_rows(r) for r in runs]
        assert [len(r) for r in rows] == [2, 2]
        final = [r[-1]["val_accuracy"] for r in rows]
        best = [max(x["val_accuracy"] for x in r) for r in rows]
        assert v["final_val_accuracy"]["values"] == final
        assert v["final_val_accuracy"]["mean"] == pytest.approx(statistics.fmean(final))
        assert v["final_val_accuracy"]["std"] == pytest.approx(statistics.stdev(final))
        assert v["best_val_accuracy"]["values"] == best
        assert v["final_val_loss"]["values"] == [r[-1]["val_loss"] for r in rows]
        assert v["train_seconds"]["values"] == pytest.approx(
            [sum(x["epoch_seconds"] for x in r) for r in rows]
        )
        assert v["img_s"]["values"] == [
            statistics.median(x["train_img_s"] for x in r) for r in rows
        ]
        reach = [
            next(x["epoch"] for x in r if x["val_accuracy"] >= 0.9 * b)
            for r, b in zip(rows, best, strict=True)
        ]
        assert v["epochs_to_90pct_best"]["values"] == reach
        # The final evaluation of each run is its last epoch's.
        evals = [json.loads((r / "eval.json").read_text())["accuracy"] for r in runs]
        assert evals == pytest.approx(final)
    md = (out / "summary.md").read_text()
    assert "| activation=myacts:squareplus |" in md
    relu = summary["variants"][0]["final_val_accuracy"]
    assert f"{100 * relu['mean']:.1f} ± {100 * relu['std']:.1f}" in md
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "activation=myacts:squareplus" in page
    assert "http://" not in page and "https://" not in page
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _compare_cmd(data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "springfield.cli",
        "compare",
        "--vary",
        "optimizer=adamw,sgd",
        "--data",
        str(data),
        "--workdir",
        str(out),
        "--epochs",
        "6",
        *FAST,
    ]


def test_sigkill_after_the_first_variant_then_rerun_resumes_and_finishes(tiny_folder, tmp_path):
    out = tmp_path / "cmp"
    first, second = out / "optimizer-adamw" / "seed0", out / "optimizer-sgd" / "seed0"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _compare_cmd(tiny_folder, out),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    # Killed once the second variant has saved its first epoch: the first is finished.
    while time.time() < deadline and not (second / "checkpoints" / "5").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (first / "eval.json").exists() and not (second / "eval.json").exists()
    assert not (out / "summary.json").exists()
    first_eval = (first / "eval.json").stat().st_mtime_ns

    # The same folder named relative to another working directory is the same setting.
    done = subprocess.run(
        _compare_cmd(Path(tiny_folder.name), out),
        cwd=tiny_folder.parent,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stderr.split())  # the progress
    assert "[1/2] optimizer=adamw seed 0: finished before, skipped" in text
    assert "Resuming" in text
    assert (first / "eval.json").stat().st_mtime_ns == first_eval
    assert [r["epoch"] for r in _rows(second)] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((out / "summary.json").read_text())
    sgd = summary["variants"][1]
    assert sgd["name"] == "optimizer=sgd"
    assert sgd["final_val_accuracy"]["values"] == [_rows(second)[-1]["val_accuracy"]]


@pytest.mark.parametrize(
    ("vary", "message"),
    [
        (
            "colour=red,blue",
            "--vary 'colour=red,blue': --colour is not a flag of springfield train",
        ),
        ("lr=fast,1e-3", "--vary lr=fast: 'fast' is not a valid value of --lr"),
        (
            "batch-size=8,many",
            "--vary batch_size=many: 'many' is not a valid value of --batch-size",
        ),
        ("activation=relu,nosuch", "variant activation=nosuch: --activation 'nosuch': unknown"),
        ("seed=1,2", "use --seeds 0 1 2"),
        ("epochs", "write NAME=VALUE1,VALUE2"),
    ],
)
def test_bad_vary_is_refused_before_anything_trains(vary, message, tiny_folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--vary", vary, "--data", str(tiny_folder), "--workdir", str(out), *FAST]
    capsys.readouterr()
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_vary_values_parse_as_train_flags_do():
    from springfield.comparison import parse_setting, variants_from_flags
    from springfield.config import TrainConfig
    from springfield.errors import SpringfieldError

    base = TrainConfig()
    assert parse_setting(base, "image_size", "64x48").image_size == (64, 48)
    assert parse_setting(base, "image_size", "96 96").image_size == (96, 96)
    assert parse_setting(base, "tta", "true").tta is True
    assert parse_setting(base, "report", "off").report is False
    assert parse_setting(base, "lr", "auto").lr == "auto"
    assert parse_setting(base, "augment", "standard").augment == "standard"
    with pytest.raises(SpringfieldError, match="'maybe' is not a valid value of --tta"):
        parse_setting(base, "tta", "maybe")
    with pytest.raises(SpringfieldError, match="'huge' is not a valid value of --augment"):
        parse_setting(base, "augment", "huge")
    variants = variants_from_flags(base, ["lr=1e-3,3e-3", "batch-size=16,32"])
    assert [v.name for v in variants] == [
        "lr=1e-3,batch_size=16",
        "lr=1e-3,batch_size=32",
        "lr=3e-3,batch_size=16",
        "lr=3e-3,batch_size=32",
    ]
    assert [(v.config.lr, v.config.batch_size) for v in variants] == [
        (1e-3, 16),
        (1e-3, 32),
        (3e-3, 16),
        (3e-3, 32),
    ]


def test_python_compare_refuses_an_unknown_setting(tmp_path):
    import springfield

    with pytest.raises(springfield.SpringfieldError, match="'colour'.*not a TrainConfig field"):
        springfield.compare(vary={"colour": ["red"]}, workdir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
