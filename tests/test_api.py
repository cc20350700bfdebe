"""The Python API as a notebook uses it: springfield.train / load, and the registries."""

from __future__ import annotations

import json
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import springfield
from springfield.training.optim import make_optimizer

FAST = dict(image_size=[32, 32], batch_size=8, workers=0, tensorboard=False, report=False)


def squareplus(x):
    """Squareplus (Barron, 2021): a smooth ReLU without exponentials."""
    return (x + jnp.sqrt(x * x + 4.0)) / 2.0


def test_train_with_a_registered_activation_then_load_and_predict(tiny_folder, tmp_path):
    springfield.register_activation(squareplus)
    t0 = time.perf_counter()
    run = springfield.train(
        data=str(tiny_folder), workdir=tmp_path / "r", epochs=1, activation="squareplus", **FAST
    )
    wall = time.perf_counter() - t0
    assert isinstance(run, springfield.Run)
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert run.metrics == [json.loads(x) for x in lines] and len(run.metrics) == 1
    assert run.result == json.loads((run.path / "eval.json").read_text())
    assert run.config.activation == "squareplus" and run.config.image_size == (32, 32)
    assert run.accuracy == run.result["accuracy"]
    # In Python the first step is timed from the train() call: within the call.
    first = run.metrics[0]["first_step_seconds"]
    assert 0 < first < wall

    clf = run.load()
    path = next((tiny_folder / "homer_simpson").iterdir())
    pil = Image.open(path)
    preds = clf.predict([path, pil, np.asarray(pil)], top_k=2)
    assert [p["file"] for p in preds] == [str(path), "<image 1>", "<image 2>"]
    # The same picture as a file, a PIL image and an array gets the same answer.
    assert preds[0]["top"] == preds[1]["top"] == preds[2]["top"]
    assert preds[0]["label"] in clf.classes and len(preds[0]["top"]) == 2
    assert clf.evaluate()["accuracy"] == pytest.approx(run.accuracy)
    assert springfield.load(run.path).classes == clf.classes


def test_unknown_setting_is_refused_with_the_closest_field(tmp_path):
    with pytest.raises(
        springfield.SpringfieldError,
        match="epoch=2: not a TrainConfig field .did you mean 'epochs'",
    ):
        springfield.train(epoch=2, workdir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_builtin_activation_names_cannot_be_replaced():
    with pytest.raises(springfield.SpringfieldError, match="springfield's own"):
        springfield.register_activation(squareplus, name="relu")
    assert springfield.ACTIVATIONS["relu"] is not squareplus


def test_registered_optimizer_is_used_by_name():
    @springfield.register_optimizer
    def sgd_half(lr):
        return optax.sgd(lr, momentum=0.5)

    assert "sgd_half" in springfield.optimizer_names()
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    mine = make_optimizer("sgd_half", optax.constant_schedule(0.1))
    ref = optax.sgd(0.1, momentum=0.5)
    s1, s2 = mine.init(params), ref.init(params)
    for _ in range(3):
        u1, s1 = mine.update(grads, s1, params)
        u2, s2 = ref.update(grads, s2, params)
        np.testing.assert_allclose(u1["w"], u2["w"])
    assert float(jnp.abs(u1["w"]).sum()) > 0
