"""MixStyle (``--mixstyle``): what it keeps, what it moves, and that inference ignores it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from springfield.models import build_model
from springfield.models.mixstyle import mix_style
from springfield.training.steps import init_state, make_train_step


def _batch(n: int = 16) -> jax.Array:
    # Every image its own style: a per-image, per-channel offset and scale on shared content.
    rng = np.random.default_rng(0)
    content = rng.normal(size=(n, 6, 5, 4))
    scale = rng.uniform(0.5, 3.0, size=(n, 1, 1, 4))
    offset = rng.uniform(-2.0, 2.0, size=(n, 1, 1, 4))
    return jnp.asarray(content * scale + offset, jnp.float32)


def _stats(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    return x.mean(axis=(1, 2)), x.std(axis=(1, 2))


def test_mixstyle_keeps_the_content_blends_the_styles_and_is_seeded():
    x = _batch()
    out = mix_style(x, jax.random.key(1), 1.0)
    mu, sig = _stats(x)
    mu_out, sig_out = _stats(out)
    normalised = lambda a, m, s: (np.asarray(a) - m[:, None, None]) / s[:, None, None]  # noqa: E731
    np.testing.assert_allclose(normalised(out, mu_out, sig_out), normalised(x, mu, sig), atol=1e-4)
    # Blends of the batch's own statistics: inside their range, and not all the image's own.
    assert np.all(mu_out >= mu.min(0) - 1e-5) and np.all(mu_out <= mu.max(0) + 1e-5)
    assert np.all(sig_out >= sig.min(0) - 1e-5) and np.all(sig_out <= sig.max(0) + 1e-5)
    moved = np.abs(mu_out - mu).max(axis=1) > 0.1
    assert moved.sum() >= 4, moved
    np.testing.assert_array_equal(out, mix_style(x, jax.random.key(1), 1.0))
    assert not np.array_equal(out, mix_style(x, jax.random.key(2), 1.0))
    np.testing.assert_array_equal(mix_style(x, jax.random.key(1), 0.0), x)


def test_mixstyle_treats_the_statistics_as_constants_and_keeps_bfloat16():
    x = _batch()
    r = jax.random.normal(jax.random.key(3), x.shape)
    out, vjp = jax.vjp(lambda a: mix_style(a, jax.random.key(1), 1.0), x)
    (dx,) = vjp(r)
    # d out / d x = sig_mix / sig per image and channel, the statistics held fixed.
    ratio = _stats(out)[1] / _stats(x)[1]
    np.testing.assert_allclose(dx, np.asarray(r) * ratio[:, None, None], rtol=1e-3, atol=1e-5)
    assert mix_style(x.astype(jnp.bfloat16), jax.random.key(1), 1.0).dtype == jnp.bfloat16


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def test_resnet_mixes_styles_in_the_train_step_only():
    tx = optax.sgd(0.1)
    model = build_model("resnet", 3, image_size=(32, 32))
    images = np.asarray(np.clip(_batch(8)[..., :3] * 40 + 128, 0, 255), np.uint8)
    batch = {
        "image": jnp.asarray(np.tile(images, (1, 6, 7, 1))[:, :32, :32]),
        "label": jnp.arange(8) % 3,
        "mask": jnp.ones(8),
    }
    graphdef, state = init_state(model, tx)
    key = jax.random.key(0)
    # The step donates (consumes) its state: each call gets a copy.
    losses = {
        p: float(make_train_step(graphdef, tx, mixstyle=p)(_copy(state), batch, key)[1]["loss_sum"])
        for p in (0.0, 1.0)
    }
    assert np.isfinite(losses[1.0]) and abs(losses[1.0] - losses[0.0]) > 1e-4, losses
    # Inference never mixes: the option changes nothing outside training.
    x = jnp.asarray(batch["image"], jnp.float32) / 255
    np.testing.assert_array_equal(model(x, train=False, mixstyle=1.0), model(x, train=False))
