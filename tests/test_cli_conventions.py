"""What a user expects of a command line: --version, --config FILE, results on stdout and
progress on stderr."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

import springfield
from springfield.cli import main

FAST = ["--image-size", "32", "32", "--batch-size", "8", "--workers", "0", "--no-tensorboard"]
# Per-epoch numbers that are measurements of time, not results.
TIMINGS = ("img_s", "seconds", "wait", "time")


def _without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(t in k for t in TIMINGS)}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_version_prints_the_installed_version(capsys):
    assert main(["--version"]) == 0
    version = importlib.metadata.version("springfield")
    assert capsys.readouterr().out == f"springfield {version}\n"
    assert springfield.__version__ == version


@pytest.fixture(scope="module")
def run_a(tiny_folder, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("a") / "a"
    argv = ["train", "--data", str(tiny_folder), "--workdir", str(run), "--epochs", "2"]
    assert main([*argv, *FAST, "--no-report", "--seed", "3", "--label-smoothing", "0.1"]) == 0
    return run


def test_a_runs_config_json_reruns_it(run_a, tmp_path, capsys):
    run_b = tmp_path / "b"
    capsys.readouterr()
    assert main(["train", "--config", str(run_a / "config.json"), "--workdir", str(run_b)]) == 0
    out, err = capsys.readouterr()
    # The result on stdout is the run folder; the progress went to stderr.
    assert out.strip() == str(run_b)
    assert "epoch   2" in err
    a, b = (json.loads((r / "config.json").read_text()) for r in (run_a, run_b))
    assert a.pop("workdir") != b.pop("workdir")
    assert a == b and b["seed"] == 3 and b["label_smoothing"] == 0.1
    # The same settings train the same model: every number but the timings is the same.
    assert list(map(_without_timings, _metrics(run_a))) == list(
        map(_without_timings, _metrics(run_b))
    )


def test_flags_override_a_yaml_config(tiny_folder, tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text(
        f"data: {tiny_folder}\nepochs: 5\nimage_size: [32, 32]\nbatch_size: 8\n"
        "workers: 0\ntensorboard: false\nreport: false\nmodel: refcnn\n"
    )
    run = tmp_path / "r"
    assert main(["train", "--config", str(config), "--epochs", "1", "--workdir", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["image_size"] == [32, 32] and cfg["model"] == "refcnn"
    assert len(_metrics(run)) == 1


@pytest.mark.parametrize(
    "text, name, message",
    [
        ('{"epoch": 3}', "c.json", "'epoch' is not a setting (did you mean 'epochs'?)"),
        ('{"epochs": "three"}', "c.json", "epochs='three' is not a value of --epochs"),
        ("[1, 2]", "c.json", "must hold a mapping of settings"),
        ("epochs: 3", "c.json", "not valid JSON"),
        ("epochs: [3", "c.yaml", "not valid YAML"),
        ("optimizer: 5", "c.yml", "optimizer=5 is not a value of --optimizer"),
    ],
)
def test_a_bad_config_file_is_named_with_the_fix(text, name, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    capsys.readouterr()
    assert main(["train", "--config", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--config {path}" in err and message in err
    assert "Traceback" not in err


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["lr-find", "--config", str(tmp_path / "none.json")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--config {tmp_path / 'none.json'}: cannot read it" in err
