"""The command line end to end: train, resume, eval, predict, and every user error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from springfield.cli import main

FAST = [
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


@pytest.fixture(scope="module")
def trained_run(tiny_folder, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("run") / "r"
    assert (
        main(
            ["train", "--data", str(tiny_folder), "--workdir", str(workdir), "--epochs", "2", *FAST]
        )
        == 0
    )
    return workdir


def test_train_writes_a_complete_run_folder(trained_run):
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["model"] == "resnet" and cfg["image_size"] == [32, 32]
    assert json.loads((trained_run / "classes.json").read_text()) == [
        "bart_simpson",
        "homer_simpson",
        "lisa_simpson",
        "marge_simpson",
    ]
    rows = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in (
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "train_img_s",
        "input_wait_fraction",
        "lr",
    ):
        assert np.isfinite(rows[-1][key])
    # The command counts from its process's start (here pytest's): the first epoch only.
    assert rows[0]["first_step_seconds"] > 0 and "first_step_seconds" not in rows[1]
    assert (trained_run / "checkpoints").is_dir()
    final = json.loads((trained_run / "eval.json").read_text())
    assert final["num_images"] == 12  # round(14 * 0.2) = 3 per class
    assert (trained_run / "skipped.txt").read_text() == ""


def test_eval_json_counts_every_validation_image(trained_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--json", "--batch-size", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 12
    assert sum(map(sum, result["confusion"])) == 12
    assert set(result["per_class"]) == {
        "bart_simpson",
        "homer_simpson",
        "lisa_simpson",
        "marge_simpson",
    }
    final = json.loads((trained_run / "eval.json").read_text())
    assert result["accuracy"] == pytest.approx(final["accuracy"])
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_eval_on_a_folder_and_the_tables(trained_run, tiny_folder, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--data", str(tiny_folder)]) == 0
    out = capsys.readouterr().out
    assert "56 images" in out and "confusion matrix" in out and "precision" in out
    # Full class names in the confusion matrix, even on an 80-column terminal (pytest's).
    for i, name in enumerate(["bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson"]):
        assert f"{i} {name}" in out


def test_predict_top_k_json_and_csv_including_png_named_jpg(
    trained_run, tiny_folder, tmp_path, capsys
):
    src = next((tiny_folder / "lisa_simpson").iterdir())
    png = tmp_path / "really_a_png.jpg"
    Image.open(src).save(png, "PNG")
    capsys.readouterr()
    csv_path = tmp_path / "out.csv"
    assert (
        main(
            [
                "predict",
                str(trained_run),
                str(png),
                str(tiny_folder / "bart_simpson"),
                "--top-k",
                "2",
                "--json",
                "--csv",
                str(csv_path),
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 15
    assert lines[0]["file"] == str(png)
    top = lines[0]["top"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
    assert sum(1 for _ in csv_path.open()) == 1 + 15 * 2


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return " ".join(captured.err.split())


def test_user_errors_are_one_clear_line(tiny_folder, trained_run, tmp_path, capsys):
    data = str(tiny_folder)
    w = str(tmp_path / "w")
    cases = {
        ("train", "--data", str(tmp_path / "nope"), *FAST): "folder not found",
        (
            "train",
            "--data",
            data,
            "--optimizer",
            "adamz",
            "--workdir",
            w,
            *FAST,
        ): "--optimizer 'adamz': unknown",
        (
            "train",
            "--data",
            data,
            "--activation",
            "swoosh",
            "--workdir",
            w,
            *FAST,
        ): "--activation 'swoosh': unknown",
        ("train", "--data", data, "--model", "vgg", "--workdir", w, *FAST): "--model 'vgg'",
        (
            "train",
            "--data",
            data,
            "--model",
            "seed",
            "--workdir",
            w,
            "--image-size",
            "16",
            "24",
            "--workers",
            "0",
        ): "--image-size 16 24: too small for model 'seed'",
        (
            "train",
            "--data",
            data,
            "--batch-size",
            "1000",
            "--workdir",
            w,
            "--workers",
            "0",
        ): "--batch-size 1000: larger than",
        ("train", "--preset", "fast", "--data", data): "--preset 'fast': unknown",
        (
            "train",
            "--data",
            data,
            "--model",
            "refcnn",
            "--mixstyle",
            "0.5",
            "--workdir",
            w,
        ): "--mixstyle 0.5: only the resnet models have it",
        ("train", "--data", data, "--style", "2", "--workdir", w): "--style 2.0: must be a chance",
        ("eval", str(tmp_path)): "not a springfield run folder",
        ("predict", str(trained_run), str(tmp_path / "missing.jpg")): "no such file",
    }
    for argv, message in cases.items():
        assert message in _error(capsys, list(argv)), argv


def test_run_folder_from_another_class_set_is_refused(trained_run, tiny_folder, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    (other / "homer_simpson").rename(other / "ned_flanders")
    msg = _error(capsys, ["eval", str(trained_run), "--data", str(other)])
    assert "ned_flanders" in msg and "not among the model's classes" in msg
    resumed = tmp_path / "copy"
    shutil.copytree(trained_run, resumed)
    msg = _error(
        capsys, ["train", "--data", str(other), "--workdir", str(resumed), "--epochs", "2", *FAST]
    )
    assert "holds a run with other settings" in msg and "ned_flanders" in msg


def test_eval_on_a_folder_with_some_of_the_classes(trained_run, tiny_folder, tmp_path, capsys):
    # A user's test set (e.g. drawings) may hold only some of the run's classes.
    some = tmp_path / "some"
    for name in ("bart_simpson", "lisa_simpson"):
        shutil.copytree(tiny_folder / name, some / name)
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--data", str(some), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_class"]) == {"bart_simpson", "lisa_simpson"}
    assert result["num_images"] == sum(1 for _ in some.rglob("*.jpg"))
    assert result["classes"] == json.loads((trained_run / "classes.json").read_text())
    recalls = [s["recall"] for s in result["per_class"].values()]
    assert result["balanced_accuracy"] == pytest.approx(sum(recalls) / 2)


def test_help_explains_flags_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--data",
        "--optimizer",
        "--schedule",
        "--activation",
        "--workers",
        "--val-fraction",
        "--preset seed",
    ):
        assert flag in out
    assert "default: adamw" in out or "(default: adamw)" in out
