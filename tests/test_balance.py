"""Imbalanced classes: the class-balanced sampler and the class-weighted loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from springfield.data.cache import decode_index
from springfield.data.index import scan_folder
from springfield.data.pipeline import class_weights, loss_weights, to_iterator, train_dataset
from springfield.training.steps import init_state, make_train_step

SMALL = 4  # images in the small class; the others keep tiny_folder's 14


@pytest.fixture(scope="module")
def imbalanced(tiny_folder):
    """tiny_folder with its last class cut to SMALL images: decoded ``(npy, labels)``."""
    index = scan_folder(tiny_folder)
    labels = np.asarray(index.labels)
    small = len(index.classes) - 1
    rows = [i for i in range(len(index)) if labels[i] != small]
    rows += list(np.flatnonzero(labels == small)[:SMALL])
    npy, kept = decode_index(index.subset(sorted(rows)), (16, 16))
    return npy, np.asarray(kept.labels)


def _stream(npy, labels, *, balanced, epochs=3, seed=0, workers=0):
    ds = train_dataset(
        npy, labels, batch_size=6, epochs=epochs, seed=seed, augment="none", balanced=balanced
    )
    it = to_iterator(ds, workers=workers)
    return it, len(ds)


def test_the_balanced_sampler_draws_every_class_equally_often(imbalanced):
    npy, labels = imbalanced
    n, k = len(labels), 4
    assert np.bincount(labels).tolist() == [14, 14, 14, SMALL]
    it, steps = _stream(npy, labels, balanced=True)
    batches = [next(it) for _ in range(steps)]
    drawn = np.concatenate([b["label"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert len(drawn) == steps * 6 == (3 * n) // 6 * 6  # epochs keep their length
    first_epoch = np.bincount(drawn[:n], minlength=k)
    assert first_epoch.max() - first_epoch.min() <= 1  # 46 draws: 12, 12, 11, 11 in some order
    counts = np.bincount(drawn, minlength=k)
    assert counts.max() - counts.min() <= 3
    # The small class's images take turns: each drawn as often as the others, +-1.
    per_image = np.bincount(index[drawn == k - 1])
    per_image = per_image[per_image > 0]
    assert len(per_image) == SMALL and per_image.max() - per_image.min() <= 1
    # Without it, draws follow the class sizes: the small class gets 4 of every 46.
    plain, steps = _stream(npy, labels, balanced=False, epochs=1)
    plain_drawn = np.concatenate([next(plain)["label"] for _ in range(steps)])
    assert np.bincount(plain_drawn, minlength=k)[-1] <= SMALL


def test_the_balanced_stream_is_seeded_worker_independent_and_resumable(imbalanced):
    npy, labels = imbalanced
    it, _ = _stream(npy, labels, balanced=True)
    a = [next(it) for _ in range(10)]
    again, _ = _stream(npy, labels, balanced=True, workers=1)
    for x, y in zip(a, [next(again) for _ in range(10)], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["index"], y["index"])
    again.close()
    other, _ = _stream(npy, labels, balanced=True, seed=1)
    assert any(
        not np.array_equal(x["index"], next(other)["index"]) for x in a
    )  # another seed, another order
    # The iterator state (what a checkpoint stores) resumes the very same stream.
    it, _ = _stream(npy, labels, balanced=True)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    fresh, _ = _stream(npy, labels, balanced=True)
    fresh.set_state(state)
    for x, y in zip(expected, [next(fresh) for _ in range(5)], strict=True):
        np.testing.assert_array_equal(x["index"], y["index"])


class _Prior(nnx.Module):
    """Logits that ignore the image: the model can only learn how often each class occurs."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs) -> None:
        self.head = nnx.Linear(1, num_classes, rngs=rngs)

    def __call__(self, x, train: bool = False, rngs=None):
        return self.head(jnp.mean(x, axis=(1, 2, 3))[:, None])


def _learned_prior(labels: np.ndarray, weights) -> np.ndarray:
    tx = optax.sgd(1.0)
    graphdef, state = init_state(_Prior(2, nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, tx, class_weights=weights)
    batch = {
        "image": np.zeros((len(labels), 2, 2, 3), np.uint8),
        "label": labels.astype(np.int32),
        "mask": np.ones(len(labels), np.float32),
    }
    for _ in range(300):
        state, _ = step(state, batch, jax.random.key(0))
    model = nnx.merge(graphdef, state.params, state.rest)
    return np.asarray(jax.nn.softmax(model(jnp.full((1, 2, 2, 3), -1.0))))[0]


def test_class_weights_enter_the_loss():
    # 90 images of class 0, 10 of class 1. Cross-entropy's optimum for a constant prediction
    # is the class frequencies, (0.9, 0.1); with "balanced" weights (100 / (2 * n_c)) each
    # class carries the same total weight, so the optimum moves to (0.5, 0.5).
    labels = np.array([0] * 90 + [1] * 10)
    weights = class_weights(labels, 2)
    np.testing.assert_allclose(weights, [100 / 180, 100 / 20], rtol=1e-6)
    np.testing.assert_allclose(_learned_prior(labels, None), [0.9, 0.1], atol=1e-3)
    np.testing.assert_allclose(_learned_prior(labels, weights), [0.5, 0.5], atol=1e-3)


def test_balance_loss_leaves_classes_of_equal_size_on_the_plain_loss():
    # The presets ask for --balance loss; a folder whose classes are the same size (the
    # four-class Simpsons split: 360 each) must train exactly as it did without it.
    equal = np.repeat(np.arange(4), 360)
    np.testing.assert_array_equal(class_weights(equal, 4), np.ones(4, np.float32))
    assert loss_weights(equal, 4) is None
    unequal = np.concatenate([equal, np.full(104, 4)])
    np.testing.assert_array_equal(loss_weights(unequal, 5), class_weights(unequal, 5))
    assert loss_weights(unequal, 5)[4] > 3 * loss_weights(unequal, 5)[0]
