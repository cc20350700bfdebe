"""The exported model prepares its input as training does: the same normalisation and the same
test-time augmentation as the eval step, so an export cannot drift from its run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from springfield.cli import main
from springfield.export_reader import load_export
from springfield.trained_run import load_run
from springfield.training.steps import make_eval_step, preprocess


@pytest.fixture(scope="module")
def tta_run(small_run, tmp_path_factory) -> Path:
    """``small_run`` evaluated with test-time augmentation (an evaluation-time setting: the
    same checkpoint)."""
    run = tmp_path_factory.mktemp("tta") / "run"
    shutil.copytree(small_run, run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "tta": True}))
    return run


def test_preprocess_json_states_the_train_steps_normalisation(small_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(small_run), str(out), "--platform", "cpu"]) == 0
    spec = json.loads((out / "preprocess.json").read_text())["normalisation"]
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    by_spec = pixels.astype(np.float32) * np.float32(spec["scale"]) + np.float32(spec["offset"])
    np.testing.assert_array_equal(by_spec, np.asarray(preprocess(pixels)))


@pytest.mark.parametrize("tta", [False, True])
def test_the_exported_model_gives_the_eval_steps_logits(small_run, tta_run, tta, tmp_path):
    run = tta_run if tta else small_run
    out = tmp_path / "export"
    assert main(["export", str(run), str(out), "--platform", "cpu"]) == 0
    trained = load_run(run)
    assert trained.config.tta is tta
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    batch = {
        "image": images,
        "label": np.zeros(4, np.int32),
        "mask": np.ones(4, np.float32),
    }
    expected, _ = make_eval_step(trained.graphdef, tta=tta)(trained.params, trained.rest, batch)
    exported = np.asarray(load_export(out).logits(images))
    # Far closer than what a different normalisation or a missing mirror image would give
    # (the mirror alone moves these logits by more than 1e-2).
    np.testing.assert_allclose(exported, np.asarray(expected), atol=1e-5, rtol=1e-5)
    if tta:
        plain, _ = make_eval_step(trained.graphdef, tta=False)(trained.params, trained.rest, batch)
        assert np.abs(np.asarray(plain) - exported).max() > 1e-3
