"""Recipe options for small data: mixup, cutmix, erasing, ensembles, TTA, EMA, presets."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image

from springfield.cli import main
from springfield.config import preset_config
from springfield.data.augment import _colour_jitter, make_augment
from springfield.data.pipeline import to_iterator, train_dataset
from springfield.models import build_model
from springfield.models.ensemble import Ensemble
from springfield.trained_run import load_run
from springfield.training import checkpoint
from springfield.training.optim import averaged_params, params_ema
from springfield.training.steps import (
    cutmix,
    init_state,
    make_eval_step,
    make_train_step,
    mixup,
    preprocess,
)


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


def test_cutmix_pastes_one_box_from_a_partner_and_mixes_targets_by_its_area():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 16, 12, 3)), jnp.float32)
    targets = jax.nn.one_hot(jnp.arange(6), 6)
    for seed in range(5):
        mixed, mixed_targets = cutmix(jax.random.key(seed), x, targets, alpha=1.0)
        mixed, t = np.asarray(mixed), np.asarray(mixed_targets)
        np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
        changed = np.any(mixed != np.asarray(x), axis=-1)  # (6, 16, 12)
        box = changed.any(axis=0)
        # One rectangle, the same for every image of the batch.
        rows, cols = np.where(box)
        if len(rows):
            assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        kept = 1.0 - box.mean()
        for i in range(6):
            partner = int(np.argmax(np.where(np.arange(6) == i, -1, t[i])))
            if t[i, i] < 1.0:
                np.testing.assert_allclose(t[i, i], kept, rtol=1e-5)
                np.testing.assert_allclose(mixed[i][box], np.asarray(x)[partner][box])
            np.testing.assert_array_equal(mixed[i][~box], np.asarray(x)[i][~box])


def test_random_erasing_fills_one_box_with_noise_and_leaves_the_rest():
    aug = make_augment("none", erase=1.0)
    img = np.full((32, 40, 3), 7, np.uint8)
    img.setflags(write=False)  # the decode cache hands out read-only views
    areas = []
    for seed in range(20):
        out = aug({"image": img, "label": 0}, np.random.default_rng(seed))["image"]
        changed = np.any(out != 7, axis=-1)
        rows, cols = np.where(changed)
        assert len(rows) > 0
        box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.mean() > 0.9  # a filled rectangle (noise may hit 7 by chance)
        areas.append(box.size / changed.size)
    assert 0.015 < min(areas) and max(areas) < 0.3
    assert make_augment("none") is None and make_augment("light", erase=0.5).erase == 0.5
    assert make_augment("light", erase=0.5).crop_scale == make_augment("light").crop_scale


def test_random_greyscale_keeps_luma_in_three_equal_channels_at_its_rate():
    aug = make_augment("none", gray=0.5)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img.setflags(write=False)
    grey = np.asarray(Image.fromarray(img).convert("L"))  # Pillow's luma, the reference
    turned = 0
    for seed in range(200):
        out = aug({"image": img, "label": 0}, np.random.default_rng(seed))["image"]
        assert out.shape == img.shape and out.dtype == np.uint8
        if np.array_equal(out, img):
            continue
        turned += 1
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        assert np.abs(out[..., 0].astype(int) - grey).max() <= 1
    assert 70 < turned < 130  # about half of 200
    light = make_augment("light", gray=0.2)
    assert light.gray == 0.2 and light.crop_scale == make_augment("light").crop_scale


def test_ensemble_members_learn_from_their_own_losses_and_predict_together():
    model = build_model("resnet", 3, image_size=(16, 16), ensemble=2)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    a, b = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in model.members)
    # Different initial weights (BatchNorm's ones and zeros aside).
    assert not any(np.allclose(u, v) for u, v in zip(a, b, strict=True) if u.ndim > 1)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    x = preprocess(jnp.asarray(images))
    assert model(x, train=True).shape == (2, 4, 3)
    expected = 0.5 * sum(jax.nn.log_softmax(m(x, train=False)) for m in model.members)
    np.testing.assert_allclose(model(x, train=False), expected, rtol=1e-5, atol=1e-6)

    # One train step gives each member the gradient of its own loss alone: the same update
    # as a step on that member by itself (SGD, no momentum).
    tx = optax.sgd(0.1)
    batch = {"image": images, "label": np.array([0, 1, 2, 1], np.int32)}
    batch["mask"] = np.ones(4, np.float32)
    graphdef, state = init_state(model, tx)
    # The step donates (consumes) its state: it gets a copy, the original is compared below.
    step_input = jax.tree.map(jnp.copy, state)
    new, metrics = make_train_step(graphdef, tx)(step_input, batch, jax.random.key(0))
    merged = nnx.merge(graphdef, new.params, new.rest)
    for i, member in enumerate(nnx.merge(graphdef, state.params, state.rest).members):
        g, s = init_state(member, tx)
        alone, _ = make_train_step(g, tx)(jax.tree.map(jnp.copy, s), batch, jax.random.key(0))
        got = jax.tree.leaves(nnx.state(merged.members[i], nnx.Param))
        # The ensemble's loss is the members' mean, so its gradients are half of each one's.
        want = [
            p0 + 0.5 * (p1 - p0)
            for p0, p1 in zip(jax.tree.leaves(s.params), jax.tree.leaves(alone.params), strict=True)
        ]
        for u, v in zip(got, want, strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    assert metrics["count"] == 4 and np.isfinite(metrics["loss_sum"])


def test_training_an_ensemble_with_cutmix_and_erasing_then_eval_and_resume_checks(
    tiny_folder, tmp_path, capsys
):
    workdir = tmp_path / "run"
    args = ["--data", str(tiny_folder), "--workdir", str(workdir), "--epochs", "2"]
    args += ["--image-size", "32", "32", "--batch-size", "8", "--workers", "0"]
    args += ["--ensemble", "2", "--cutmix", "1.0", "--mixup", "0.2", "--erase", "0.5"]
    args += ["--grayscale", "0.5"]
    assert main(["train", *args, "--no-report", "--no-tensorboard"]) == 0
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["ensemble"], saved["cutmix"], saved["erase"]) == (2, 1.0, 0.5)
    assert saved["grayscale"] == 0.5
    trained_eval = json.loads((workdir / "eval.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(workdir), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["num_images"] == trained_eval["num_images"] == 12
    np.testing.assert_allclose(again["loss"], trained_eval["loss"], rtol=1e-5)
    # The checkpoint holds two models: resuming as one (or three) is refused by name.
    assert main(["train", *args[:-10], "--no-tensorboard"]) == 2
    assert "--ensemble 2 (run) vs 1 (now)" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--ensemble", "0"], "--ensemble 0: must be 1"),
        (["--cutmix", "-1"], "--cutmix -1.0: must be 0"),
        (["--erase", "1.5"], "--erase 1.5: must be a chance between 0 and 1"),
        (["--grayscale", "-0.1"], "--grayscale -0.1: must be a chance between 0 and 1"),
        (["--early-epochs", "3"], "--early-epochs 3: needs --early-size H W"),
        (
            ["--early-size", "24", "24", "--early-epochs", "99"],
            "--early-epochs 99: more than --epochs 15",
        ),
        (
            ["--model", "refcnn", "--early-size", "24", "24", "--early-epochs", "1"],
            "needs a model with global pooling",
        ),
        (["--early-size", "4", "4", "--early-epochs", "1"], "--early-size 4 4: too small"),
        (
            ["--image-size", "32", "32", "--early-size", "40", "32", "--early-epochs", "1"],
            "--early-size 40 32: larger than --image-size 32 32",
        ),
    ],
)
def test_bad_recipe_values_are_refused_by_name(tiny_folder, tmp_path, capsys, flag, message):
    args = ["train", "--data", str(tiny_folder), "--workdir", str(tmp_path / "run"), *flag]
    assert main(args) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_tta_averages_the_logits_of_the_image_and_its_mirror():
    model = build_model("resnet", 3, image_size=(16, 16))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    batch = {"image": images, "label": np.zeros(2, np.int32), "mask": np.ones(2, np.float32)}
    plain, _ = make_eval_step(graphdef)(params, rest, batch)
    both, _ = make_eval_step(graphdef, tta=True)(params, rest, batch)
    mirrored = model(preprocess(jnp.asarray(images[:, :, ::-1])), train=False)
    np.testing.assert_allclose(both, 0.5 * (plain + mirrored), rtol=1e-4, atol=1e-5)
    assert not np.allclose(both, plain)


def test_training_with_mixup_and_tta_and_the_simpsons_preset(tiny_folder, tmp_path, capsys):
    from springfield.kernels import onednn

    cfg = preset_config("simpsons")
    assert cfg.model == "resnet4" and cfg.augment == "light" and cfg.label_smoothing == 0.1
    assert cfg.mixstyle == 0.5 and cfg.style == 0.25  # so this run trains through both
    assert preset_config("simpsons-quick").style == 0.0  # it cost the six classes' frames
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
                "--early-size",
                "24",
                "24",
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
    # --epochs alone scales the preset's early epochs: 60 of 100 -> 1 of 2.
    assert saved["early_epochs"] == round(cfg.early_epochs * 2 / cfg.epochs) == 1
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["image_size"] for r in rows] == [[24, 24], [32, 32]]
    # The preset asks for bfloat16 products: the header says when this CPU cannot give them.
    header = " ".join(capsys.readouterr().err.split())
    fallback = onednn.available() and not onednn.bf16_supported()
    assert ("needs a CPU with AVX512_BF16 or AMX" in header) == fallback
    result = json.loads((workdir / "eval.json").read_text())
    assert result["num_images"] == 12 and np.isfinite(result["loss"])


def test_the_simpsons_preset_scales_its_early_epochs_with_epochs_unless_they_are_given(
    tmp_path, capsys
):
    missing = ["--data", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "run")]
    assert main(["train", "--preset", "simpsons", "--epochs", "30", *missing]) == 2
    out = " ".join(capsys.readouterr().err.split())
    assert "--early-epochs 18 of --epochs 30" in out and '"early_epochs": 18' in out
    zero = ["--epochs", "30", "--early-epochs", "0", *missing]
    assert main(["train", "--preset", "simpsons", *zero]) == 2
    assert '"early_epochs": 0' in " ".join(capsys.readouterr().err.split())
    one = ["--epochs", "1", *missing]  # at least the last epoch at full size
    assert main(["train", "--preset", "simpsons", *one]) == 2
    assert '"early_epochs": 0' in " ".join(capsys.readouterr().err.split())
    # The preset's own length is left as it is.
    assert main(["train", "--preset", "simpsons", *missing]) == 2
    assert '"early_epochs": 60' in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("name", ["seed", "simpsons"])
def test_presets_are_complete_configs(name):
    cfg = preset_config(name)
    assert cfg.epochs > 0 and cfg.lr > 0


def test_params_ema_follows_its_recurrence_and_is_skipped_on_nonfinite_steps():
    tx = optax.chain(optax.sgd(0.1), params_ema(0.9))
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    expected_ema, p = np.array([1.0, -2.0]), np.array([1.0, -2.0])
    for t in range(30):
        grads = {"w": params["w"] * 2.0}  # gradient of |w|^2
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        p = p - 0.1 * 2.0 * p
        d = min(0.9, (1 + t) / (10 + t))
        expected_ema = d * expected_ema + (1 - d) * p
    np.testing.assert_allclose(params["w"], p, rtol=1e-6)
    np.testing.assert_allclose(averaged_params(state)["w"], expected_ema, rtol=1e-5)
    assert not np.allclose(expected_ema, p)

    guarded = optax.apply_if_finite(tx, max_consecutive_errors=5)
    gstate = guarded.init(params)
    before = averaged_params(gstate)["w"]
    _, gstate = guarded.update({"w": jnp.array([jnp.nan, 0.0])}, gstate, params)
    np.testing.assert_array_equal(averaged_params(gstate)["w"], before)


def test_training_with_ema_evaluates_and_saves_the_average(tiny_folder, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["--data", str(tiny_folder), "--workdir", str(workdir), "--epochs", "2"]
    args += ["--image-size", "32", "32", "--batch-size", "8", "--workers", "0", "--ema", "0.9"]
    assert main(["train", *args, "--no-report", "--no-tensorboard"]) == 0
    trained = load_run(workdir)
    manager = checkpoint.open_manager(workdir)
    state_only = ocp.args.Composite(state=ocp.args.StandardRestore())
    raw = manager.restore(manager.latest_step(), args=state_only)["state"]["params"]
    manager.close()
    # load_run hands out the average, which differs from the raw weights...
    leaves = jax.tree.leaves(trained.params)
    assert not all(np.allclose(a, b) for a, b in zip(leaves, jax.tree.leaves(raw), strict=True))
    # ...and the final evaluation of training is the evaluation of that average.
    capsys.readouterr()
    assert main(["eval", str(workdir), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    trained_eval = json.loads((workdir / "eval.json").read_text())
    assert again["num_images"] == trained_eval["num_images"] == 12
    np.testing.assert_allclose(again["loss"], trained_eval["loss"], rtol=1e-5)
    assert main(["train", *args[:-2], "--ema", "1.5"]) == 2
    # Resuming with another average (or none) would not match the checkpoint's state.
    capsys.readouterr()
    assert main(["train", *args[:-2], "--ema", "0.5", "--no-tensorboard"]) == 2
    assert "--ema 0.9 (run) vs 0.5 (now)" in " ".join(capsys.readouterr().err.split())


def test_early_stop_ends_the_run_and_a_rerun_stays_stopped(tiny_folder, tmp_path, capsys):
    # With a zero learning rate and no BatchNorm (refcnn) the validation loss never
    # changes, so it stops improving after the first epoch.
    workdir = tmp_path / "run"
    args = ["train", "--data", str(tiny_folder), "--workdir", str(workdir), "--model", "refcnn"]
    args += ["--image-size", "32", "32", "--batch-size", "8", "--workers", "0", "--epochs", "6"]
    args += ["--lr", "0", "--schedule", "constant", "--early-stop", "2", "--no-report"]
    assert main([*args, "--no-tensorboard"]) == 0
    out = capsys.readouterr().err
    assert "Stopped early after epoch 3" in out and "at epoch 1" in out
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert main([*args, "--no-tensorboard"]) == 0
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 and "Stopped early after epoch 3" in capsys.readouterr().err
    assert main([*args[:-3], "--early-stop", "-1"]) == 2


def test_colour_jitter_matches_brightness_contrast_saturation_applied_in_turn():
    rng = np.random.default_rng(0)
    differing = 0
    for seed in range(50):
        img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        b, c, sat = np.random.default_rng(seed).uniform(0.75, 1.25, size=3)
        x = img.astype(np.float64) * b
        x = (x - x.mean()) * c + x.mean()
        grey = x.mean(axis=2, keepdims=True)
        want = np.clip((x - grey) * sat + grey, 0, 255).astype(np.uint8)
        got = _colour_jitter(img, np.random.default_rng(seed), 0.25)
        assert np.abs(got.astype(int) - want).max() <= 1  # float32 vs float64 rounding
        differing += int((got != want).sum())
    assert differing < 0.001 * 50 * img.size
    assert not np.array_equal(got, img)


def _stream(npy, labels, **kw):
    ds = train_dataset(npy, labels, batch_size=4, epochs=2, seed=3, **kw)
    it = to_iterator(ds, workers=0)
    out = [next(it) for _ in range(6)]
    it.close()
    return out


@pytest.mark.parametrize("augment", ["none", "light"])
def test_early_size_gives_the_first_batches_smaller_and_keeps_the_order(tmp_path, augment):
    from PIL import Image

    # Smooth images, so that resampling the same crop at two sizes agrees closely.
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    phases = np.random.default_rng(0).uniform(0, 6, (12, 3))
    images = np.stack(
        [np.stack([127 + 120 * np.sin(2 * xx + 3 * yy + p) for p in ph], axis=-1) for ph in phases]
    ).astype(np.uint8)
    npy = tmp_path / "images.npy"
    np.save(npy, images)
    labels = np.arange(12) % 3
    plain = _stream(npy, labels, augment=augment)
    early = _stream(npy, labels, augment=augment, early_steps=2, early_size=(24, 20))
    assert [b["image"].shape[1:3] for b in early] == [(24, 20)] * 2 + [(32, 32)] * 4
    for p, e in zip(plain, early, strict=True):
        np.testing.assert_array_equal(p["index"], e["index"])
        np.testing.assert_array_equal(p["label"], e["label"])
        assert sorted(e) == sorted(p)  # the size tag does not reach the batch
    for p, e in zip(plain[2:], early[2:], strict=True):
        np.testing.assert_array_equal(p["image"], e["image"])

    # An early image is the plain stream's image (same crop, flip and jitter) at 24x20.
    def shrink(img):
        return np.asarray(Image.fromarray(img).resize((20, 24), Image.BILINEAR)).astype(int)

    for p, e in zip(plain[:2], early[:2], strict=True):
        for i, small in enumerate(e["image"]):
            own = np.abs(shrink(p["image"][i]) - small).mean()
            other = np.abs(shrink(p["image"][(i + 1) % 4]) - small).mean()
            assert own < 3 and other > 3 * max(own, 1), (own, other)


def test_training_with_early_size_then_full_size(tiny_folder, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["train", "--data", str(tiny_folder), "--workdir", str(workdir), "--epochs", "2"]
    args += ["--image-size", "32", "32", "--batch-size", "8", "--workers", "0"]
    args += ["--early-size", "16", "24", "--early-epochs", "1"]
    assert main(args) == 0  # with TensorBoard files and the report, as a user runs it
    out = " ".join(capsys.readouterr().err.split())
    assert "at 32x32 (the first 1 epochs at 16x24)" in out
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["early_size"], saved["early_epochs"]) == ([16, 24], 1)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["image_size"] for r in rows] == [[16, 24], [32, 32]]  # validated at that size
    assert json.loads((workdir / "eval.json").read_text())["num_images"] == 12
    # The run's model evaluates at the full size, as trained last.
    assert main(["eval", str(workdir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 12
    assert (workdir / "report.html").is_file() and any((workdir / "tensorboard").iterdir())
    # Resuming with a different early phase would change the run: refused by name.
    assert main([*args[:-5], "--epochs", "3", "--no-report"]) == 2
    assert "--early-epochs 1 (run) vs 0 (now)" in " ".join(capsys.readouterr().err.split())
