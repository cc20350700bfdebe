"""Recipe options for small data: mixup, test-time augmentation, presets."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from springfield.cli import main
from springfield.config import preset_config
from springfield.models import build_model
from springfield.training.steps import _normalise, make_eval_step, mixup


def test_mixup_blends_each_image_with_one_partner_and_its_target():
    x = jnp.arange(4 * 2 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 2, 3)
    targets = jax.nn.one_hot(jnp.array([0, 1, 2, 3]), 4)
    mixed, mixed_targets = mixup(jax.random.key(3), x, targets, alpha=0.4)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    # Labels are 0..3, so row i mixes e_i (weight lam) with e_partner (weight 1 - lam).
    lams = np.asarray(mixed_targets)[np.arange(4), np.arange(4)]
    assert np.allclose(lams[lams < 1], lams[lams < 1][0])
    for i in range(4):
        row = np.asarray(mixed_targets[i]).copy()
        row[i] = 0
        partner = int(row.argmax()) if row.max() > 0 else i
        lam = lams[i] if partner != i else 1.0
        np.testing.assert_allclose(mixed[i], lam * x[i] + (1 - lam) * x[partner], rtol=1e-5)


def test_tta_averages_the_logits_of_the_image_and_its_mirror():
    model = build_model("resnet", 3, image_size=(16, 16))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    batch = {"image": images, "label": np.zeros(2, np.int32), "mask": np.ones(2, np.float32)}
    plain, _ = make_eval_step(graphdef)(params, rest, batch)
    both, _ = make_eval_step(graphdef, tta=True)(params, rest, batch)
    mirrored = model(_normalise(jnp.asarray(images[:, :, ::-1])), train=False)
    np.testing.assert_allclose(both, 0.5 * (plain + mirrored), rtol=1e-4, atol=1e-5)
    assert not np.allclose(both, plain)


def test_training_with_mixup_and_tta_and_the_simpsons_preset(tiny_folder, tmp_path):
    cfg = preset_config("simpsons")
    assert cfg.model == "resnet" and cfg.augment == "light" and cfg.label_smoothing == 0.1
    workdir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "simpsons",
                "--data",
                str(tiny_folder),
                "--workdir",
                str(workdir),
                "--epochs",
                "2",
                "--image-size",
                "32",
                "32",
                "--batch-size",
                "8",
                "--workers",
                "0",
                "--mixup",
                "0.3",
                "--tta",
                "--no-report",
                "--no-tensorboard",
            ]
        )
        == 0
    )
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["mixup"] == 0.3 and saved["tta"] is True and saved["lr"] == cfg.lr
    result = json.loads((workdir / "eval.json").read_text())
    assert result["num_images"] == 12 and np.isfinite(result["loss"])


@pytest.mark.parametrize("name", ["seed", "simpsons"])
def test_presets_are_complete_configs(name):
    cfg = preset_config(name)
    assert cfg.epochs > 0 and cfg.lr > 0
