"""--kernels: a config field (saved, printed, checked) that reaches the model and the step."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from springfield import kernels
from springfield.config import TrainConfig, from_json, to_json
from springfield.errors import SpringfieldError
from springfield.training.checks import check_config


def test_kernels_is_saved_and_an_older_config_without_it_loads_as_auto():
    cfg = replace(TrainConfig(), kernels="xla", image_size=(64, 64))
    assert from_json(json.loads(json.dumps(to_json(cfg)))).kernels == "xla"
    older = {k: v for k, v in to_json(cfg).items() if k != "kernels"}
    assert from_json(older).kernels == "auto"


def test_an_unknown_kernels_value_is_refused_with_the_choices():
    cfg = replace(TrainConfig(), kernels="fast", image_size=(64, 64))
    with pytest.raises(SpringfieldError, match="--kernels 'fast': unknown; choose one of auto"):
        check_config(cfg)


def test_a_run_with_kernels_xla_says_so_and_saves_it(tiny_folder, tmp_path, capsys):
    from springfield.cli import main

    workdir = tmp_path / "run"
    argv = ["train", "--data", str(tiny_folder), "--workdir", str(workdir), "--epochs", "1",
            "--image-size", "32", "32", "--batch-size", "8", "--workers", "0",
            "--no-tensorboard", "--no-report", "--kernels", "xla"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((workdir / "config.json").read_text())["kernels"] == "xla"
    printed = capsys.readouterr()
    assert "layers by XLA (--kernels xla)" in " ".join((printed.out + printed.err).split())


def test_selections_nest_and_restore():
    assert kernels.selected() == kernels.Selection()
    with kernels.use("xla", "bfloat16", fuse_norm=False):
        with kernels.use(fused_adam=False) as inner:
            assert (inner.kernels, inner.precision) == ("xla", "bfloat16")
            assert not inner.options.fuse_norm and not inner.options.fused_adam
        with kernels.portable(), kernels.use("auto") as inner:
            assert inner.portable and inner.kernels == "auto"
    assert kernels.selected() == kernels.Selection()
