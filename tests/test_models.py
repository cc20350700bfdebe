"""Models, activations and optimizers: shapes, parameter counts, registries, errors."""

from __future__ import annotations

import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from springfield.errors import SpringfieldError
from springfield.models import MODELS, build_model, count_params
from springfield.models.activations import get_activation
from springfield.training.optim import make_optimizer, make_schedule


def test_seed_model_is_the_tutorial_network():
    model = build_model("seed", 4, image_size=(160, 120))
    assert count_params(model) == 326_452
    x = jnp.zeros((2, 160, 120, 3))
    assert model(x).shape == (2, 4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_images_to_logits(name):
    size = (32, 32) if name != "seed" else (64, 48)
    model = build_model(name, 5, image_size=size)
    out = model(jnp.ones((3, *size, 3)), train=False)
    assert out.shape == (3, 5)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_image_size_too_small_is_refused():
    with pytest.raises(SpringfieldError, match="--image-size 16 16: too small for model 'seed'"):
        build_model("seed", 4, image_size=(16, 16))


def test_unknown_model_lists_choices():
    with pytest.raises(SpringfieldError, match="--model 'vgg': unknown; choose one of resnet"):
        build_model("vgg", 4, image_size=(64, 64))


def test_activation_registry_and_unknown_name():
    assert get_activation("relu")(jnp.array(-1.0)) == 0.0
    assert get_activation("mish")(jnp.array(0.0)) == 0.0
    with pytest.raises(SpringfieldError, match="--activation 'swoosh': unknown"):
        get_activation("swoosh")


def test_custom_activation_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_acts.py").write_text(
        textwrap.dedent("""
        import jax.numpy as jnp

        def squareplus(x):
            return 0.5 * (x + jnp.sqrt(x * x + 4.0))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_activation("my_acts:squareplus")
    assert float(fn(jnp.array(0.0))) == pytest.approx(1.0)
    model = build_model("resnet", 4, image_size=(32, 32), activation="my_acts:squareplus")
    assert model(jnp.ones((1, 32, 32, 3))).shape == (1, 4)
    with pytest.raises(SpringfieldError, match="has no function 'nope'"):
        get_activation("my_acts:nope")
    with pytest.raises(SpringfieldError, match="cannot import module 'no_such_mod'"):
        get_activation("no_such_mod:f")
    sys.modules.pop("my_acts", None)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw", "lion", "rmsprop"])
def test_optimizers_by_name_take_a_step(name):
    params = {"w": jnp.ones(3)}
    tx = make_optimizer(
        name, make_schedule("cosine", lr=0.1, total_steps=10, warmup_steps=2), weight_decay=1e-4
    )
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.ones(3)}, state, params)
    assert jax.tree.leaves(updates)[0].shape == (3,)


def test_unknown_optimizer_and_schedule_are_refused():
    with pytest.raises(SpringfieldError, match="--optimizer 'adamz': unknown; choose one of"):
        make_optimizer("adamz", make_schedule("constant", lr=0.1, total_steps=1, warmup_steps=0))
    with pytest.raises(SpringfieldError, match="--schedule 'wavy'"):
        make_schedule("wavy", lr=0.1, total_steps=1, warmup_steps=0)


def test_onecycle_schedule_peaks_at_lr():
    s = make_schedule("onecycle", lr=0.5, total_steps=100, warmup_steps=0)
    peak = max(float(s(i)) for i in range(100))
    assert peak == pytest.approx(0.5, rel=1e-3)
    assert float(s(99)) < 0.01


def test_fast_conv_has_the_same_gradients_as_lax():
    # springfield.kernels.xla's convolution only changes how XLA schedules the weight
    # gradient; a portable model has lax's own.
    from flax import nnx

    from springfield import kernels

    grads = {}
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    for impl, selection in (("lax", kernels.portable()), ("springfield", kernels.use("xla"))):
        with selection:
            model = build_model("resnet", 3, image_size=(16, 16))
        grads[impl] = nnx.grad(lambda m: jnp.sum(m(x, train=True) ** 2))(model)
    leaves = [jax.tree.leaves(grads[k]) for k in ("lax", "springfield")]
    for a, b in zip(*leaves, strict=True):
        # The two schedules sum in another order: float32 results then differ by up to ~1e-6
        # of the leaf's largest entry (measured on an AMD EPYC machine, where an absolute
        # 1e-6 failed for leaves of size ~2), while a wrong gradient differs by its own size.
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * scale)


def test_bfloat16_conv_rounds_its_operands_and_keeps_float32_results_and_gradients():
    # --precision bfloat16 on GPUs/TPUs: the convolution (forward and both gradients)
    # multiplies bfloat16 copies; its result, the weights and their gradients stay float32.
    from springfield.kernels.xla import bfloat16_conv

    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16)) / 8
    dims = ("NHWC", "HWIO", "NHWC")

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME", dimension_numbers=dims)))

    def rounded(x, w, *args, **kwargs):  # what the products see, computed in float32
        r = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
        return jax.lax.conv_general_dilated(r(x), r(w), *args, **kwargs)

    y = bfloat16_conv(x, w, (1, 1), "SAME", dimension_numbers=dims)
    exact = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, rounded(x, w, (1, 1), "SAME", dimension_numbers=dims), atol=1e-5)
    assert float(jnp.max(jnp.abs(y - exact))) > 1e-4  # the operands were rounded
    g = jax.grad(loss, argnums=(1, 2))(bfloat16_conv, x, w)
    g_exact = jax.grad(loss, argnums=(1, 2))(jax.lax.conv_general_dilated, x, w)
    for a, b in zip(g, g_exact, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.max(jnp.abs(b))))


def test_resnet_hires_adds_one_stride_2_conv_and_keeps_resnet_parameter_names():
    from flax import nnx

    base = build_model("resnet", 4, image_size=(64, 64))
    hires = build_model("resnet-hires", 4, image_size=(128, 128))
    # A 16-channel 3x3 conv + BatchNorm in front; the old stem now reads 16 channels, not 3.
    extra = (3 * 3 * 3 * 16 + 2 * 16) + 3 * 3 * (16 - 3) * 32
    assert count_params(hires) - count_params(base) == extra
    # Twice the input, the same feature map size at the first block.
    stem_out = {}
    for name, model, size in (("base", base, 64), ("hires", hires, 128)):
        x = jnp.ones((1, size, size, 3))
        if model.pre_stem is not None:
            for conv in model.pre_stem:
                x = conv(x)
        stem_out[name] = model.stem(x).shape
    assert stem_out["base"] == stem_out["hires"] == (1, 32, 32, 32)
    # resnet's checkpoints keep loading: its parameter paths did not change.
    paths = {p[0] for p, _ in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    assert paths == {"stem", "stem_bn", "blocks", "head"}


def test_resnet4_adds_a_256_channel_stage_at_a_sixteenth_of_the_input():
    base = build_model("resnet", 4, image_size=(64, 64))
    deep = build_model("resnet4", 4, image_size=(112, 112))
    # One more basic block (128 -> 256, with a 1x1 projection shortcut) and a wider head.
    block = 3 * 3 * 128 * 256 + 3 * 3 * 256 * 256 + 128 * 256 + 3 * 2 * 256
    assert count_params(deep) - count_params(base) == block + 4 * (256 - 128)
    x = deep.act(deep.stem(jnp.ones((1, 112, 112, 3))))
    for blk in deep.blocks:
        x = blk(x, train=False)
    assert x.shape == (1, 7, 7, 256)
    with pytest.raises(SpringfieldError, match="too small for model 'resnet4'"):
        build_model("resnet4", 4, image_size=(8, 8))
