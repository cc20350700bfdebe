"""oneDNN convolutions (springfield.kernels.onednn): the maths of XLA's, used where they can run."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from springfield.kernels import onednn
from springfield.models import build_model

NHWC = ("NHWC", "HWIO", "NHWC")
IS_LINUX_X86 = os.uname().sysname == "Linux" and os.uname().machine == "x86_64"


def test_kernels_build_and_load_here():
    # On Linux x86_64 (every machine this project runs CI on) the oneDNN path must be the one
    # in use: a silent fallback would hide a 1.2-1.4x slowdown.
    if IS_LINUX_X86:
        assert onednn.available(), onednn.status()
        assert onednn.status().startswith("oneDNN (onednn_conv-")
    else:
        assert not onednn.available()


@pytest.mark.parametrize(
    "x_shape, w_shape, strides, padding",
    [
        ((4, 16, 16, 3), (3, 3, 3, 8), (1, 1), "SAME"),
        ((3, 17, 13, 8), (3, 3, 8, 16), (2, 2), "SAME"),
        ((2, 9, 9, 16), (1, 1, 16, 24), (2, 2), "SAME"),
        ((2, 12, 10, 5), (3, 5, 5, 7), (1, 2), "VALID"),
        ((2, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((2, 0), (1, 3))),
    ],
)
def test_forward_and_both_gradients_match_xla(x_shape, w_shape, strides, padding):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, x_shape)
    w = jax.random.normal(k2, w_shape) * 0.3
    ours = onednn.make_conv(fallback=None)  # type: ignore[arg-type] - must not fall back

    def loss(conv, x, w, probe):
        return jnp.sum(conv(x, w, strides, padding, dimension_numbers=NHWC) * probe)

    y_ref = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
    y = jax.jit(lambda x, w: ours(x, w, strides, padding, dimension_numbers=NHWC))(x, w)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    probe = jax.random.normal(k3, y_ref.shape)
    grads = jax.jit(jax.grad(lambda x, w: loss(ours, x, w, probe), argnums=(0, 1)))(x, w)
    ref = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w, probe), argnums=(0, 1))(x, w)
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_independent_convolutions_in_one_step_match_each_alone():
    # XLA may start independent oneDNN calls side by side from two threads; the kernels take
    # turns and reuse a per-thread scratchpad, which must not leak between calls.
    keys = jax.random.split(jax.random.key(5), 4)
    shapes = [((8, 20, 20, 16), (3, 3, 16, 32)), ((8, 10, 10, 32), (1, 1, 32, 64))]
    xs = [jax.random.normal(k, s[0]) for k, s in zip(keys[:2], shapes, strict=True)]
    ws = [jax.random.normal(k, s[1]) * 0.2 for k, s in zip(keys[2:], shapes, strict=True)]
    ours = onednn.make_conv(fallback=None)  # type: ignore[arg-type] - must not fall back

    def loss(x, w):
        return jnp.sum(jnp.sin(ours(x, w, (1, 1), "SAME", dimension_numbers=NHWC)))

    both = jax.jit(jax.grad(lambda a, b: loss(*a) + loss(*b), argnums=(0, 1)))
    alone = jax.jit(jax.grad(loss, argnums=(0, 1)))
    want = [alone(x, w) for x, w in zip(xs, ws, strict=True)]
    for _ in range(5):
        got = both((xs[0], ws[0]), (xs[1], ws[1]))
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_what_onednn_cannot_run_goes_to_the_fallback():
    calls = []

    def fallback(lhs, rhs, *args, **kwargs):
        calls.append(lhs.dtype)
        return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

    conv = onednn.make_conv(fallback)
    x = jnp.ones((1, 8, 8, 4))
    w = jnp.ones((3, 3, 2, 4))
    conv(x.astype(jnp.bfloat16), jnp.ones((3, 3, 4, 4), jnp.bfloat16), (1, 1), "SAME",
         dimension_numbers=NHWC)  # fmt: skip
    conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)
    conv(x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC)
    assert len(calls) == 3
    # ...and what it can run does not.
    conv(x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME", dimension_numbers=NHWC)
    assert len(calls) == 3 + (not onednn.available())


def test_models_train_the_same_with_onednn_xla_and_lax(monkeypatch):
    # The three convolution paths of a ResNet (with its stride-2 and 1x1 convs, BatchNorm)
    # give the same gradients; ensembles (vmapped members) run through oneDNN too.
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    grads = {}
    for name, env in {
        "lax": {"SPRINGFIELD_CONV": "lax"},
        "xla": {"SPRINGFIELD_ONEDNN": "0"},
        "onednn": {},
    }.items():
        for var in ("SPRINGFIELD_CONV", "SPRINGFIELD_ONEDNN"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        model = build_model("resnet", 3, image_size=(16, 16), ensemble=2)
        grads[name] = nnx.grad(lambda m: jnp.sum(m(x, train=True) ** 2))(model)
    for other in ("xla", "onednn"):
        for a, b in zip(jax.tree.leaves(grads["lax"]), jax.tree.leaves(grads[other]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("SPRINGFIELD_ONEDNN", "0")
    assert not onednn.available()
    assert onednn.status() == "XLA (SPRINGFIELD_ONEDNN=0)"
    assert onednn.make_conv(lax.conv_general_dilated) is lax.conv_general_dilated


def test_several_devices_keep_xla_convolutions():
    # XLA cannot split a custom call over devices: with 2 CPU devices the models use XLA's.
    code = (
        "import jax; from springfield.kernels import onednn\n"
        "print(jax.device_count(), onednn.available(), onednn.status())\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["2", "False"]
    assert "oneDNN needs 1 CPU" in out.stdout


def test_kernels_are_built_once_into_the_cache(tmp_path):
    # A fresh cache folder gets one compiled file; a second process only loads it.
    code = (
        "import time; t = time.perf_counter(); from springfield.kernels import onednn\n"
        "print(onednn.available(), round(time.perf_counter() - t, 2))\n"
    )
    env = {**os.environ, "SPRINGFIELD_CACHE": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[0] == str(IS_LINUX_X86)
    built = list((tmp_path / "kernels").glob("onednn_conv-*.so"))
    assert len(built) == int(IS_LINUX_X86)
    assert not list((tmp_path / "kernels").glob("tmp*"))


def test_bfloat16_products_are_close_to_float32_and_really_bfloat16():
    # bfloat16 keeps 8 bits of mantissa: results within ~1% of float32's, and not equal to
    # them (which would mean the bfloat16 path silently ran in float32).
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (4, 12, 12, 16))
    w = jax.random.normal(k2, (3, 3, 16, 8)) * 0.2
    probe = jax.random.normal(k3, (4, 6, 6, 8))
    out = {}
    for bf16 in (False, True):
        conv = onednn.make_conv(fallback=None, bfloat16=bf16)  # type: ignore[arg-type]

        def loss(x, w, conv=conv):
            y = conv(x, w, (2, 2), "SAME", dimension_numbers=NHWC)
            return jnp.sum(y * probe), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
        out[bf16] = (y, *grads)
        # bfloat16 activations: the output is bfloat16, the gradients have their primal's
        # float32 type.
        want = jnp.bfloat16 if bf16 and onednn.bf16_supported() else jnp.float32
        assert [a.dtype for a in out[bf16]] == [want, jnp.float32, jnp.float32]
    for a, b in zip(out[False], out[True], strict=True):
        scale = float(jnp.max(jnp.abs(a)))
        err = float(jnp.max(jnp.abs(a - b.astype(jnp.float32))))
        assert err < 0.02 * scale
        assert err > 0 or not onednn.bf16_supported()
    if onednn.bf16_supported():
        names = onednn.implementation((4, 12, 12, 16), (3, 3, 16, 8), (2, 2), bfloat16=True)
        # oneDNN names its bfloat16 kernels *_bf16 (AVX512_BF16) or *_amx (AMX tiles, which
        # multiply bfloat16 or int8 only); float32 ones are neither.
        assert all("bf16" in n or "amx" in n for n in names.split(" / ")), names
        f32 = onednn.implementation((4, 12, 12, 16), (3, 3, 16, 8), (2, 2), bfloat16=False)
        assert not any("bf16" in n or "amx" in n for n in f32.split(" / ")), f32


def test_bfloat16_leaves_convolutions_of_few_input_channels_in_float32():
    # Float32 products; only the output is rounded to bfloat16, the activations' type.
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    w = jax.random.normal(jax.random.key(3), (3, 3, 3, 8))
    ys = []
    for bf16 in (False, True):
        conv = onednn.make_conv(None, bfloat16=bf16)  # type: ignore[arg-type]
        ys.append(
            jax.jit(partial(conv, window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC))(
                x, w
            )
        )
    np.testing.assert_array_equal(ys[0].astype(ys[1].dtype), ys[1])
    assert ys[1].dtype == (jnp.bfloat16 if onednn.bf16_supported() else jnp.float32)


def test_bfloat16_activations_flow_between_layers_and_gradients_keep_their_types():
    # A bfloat16 input goes in as it is and its gradient comes back bfloat16; the weights'
    # gradient is float32 and close to the float32 path's.
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(k1, (3, 10, 10, 16))
    w = jax.random.normal(k2, (3, 3, 16, 16)) * 0.2
    probe = jax.random.normal(k3, (3, 10, 10, 16))
    conv = onednn.make_conv(None, bfloat16=True)  # type: ignore[arg-type]
    if not onednn.bf16_supported():
        pytest.skip("this CPU has no bfloat16 instructions: --precision bfloat16 is float32")

    def loss(x, w):
        y = conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
        return jnp.sum(y.astype(jnp.float32) * probe)

    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x.astype(jnp.bfloat16), w)
    assert (gx.dtype, gw.dtype) == (jnp.bfloat16, jnp.float32)
    ref = jax.grad(
        lambda x, w: jnp.sum(
            lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC) * probe
        ),
        argnums=(0, 1),
    )(x.astype(jnp.bfloat16).astype(jnp.float32), w)
    for a, b in zip((gx, gw), ref, strict=True):
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        assert err < 0.02 * float(jnp.max(jnp.abs(b)))


def test_bfloat16_model_trains_like_float32():
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    losses = {}
    for precision in ("float32", "bfloat16"):
        model = build_model("resnet", 3, image_size=(32, 32), precision=precision)
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

        def loss_fn(m):
            return jnp.mean(jax.nn.log_softmax(m(x, train=True))[:, 0] * -1)

        for _ in range(3):
            loss, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
        losses[precision] = float(loss)
    assert abs(losses["float32"] - losses["bfloat16"]) < 0.02 * abs(losses["float32"])


def _reference_block(x, w, b):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC) + b
    return nnx.avg_pool(jax.nn.relu(y), (2, 2), strides=(2, 2))


@pytest.mark.parametrize(
    "x_shape, out_channels",
    [
        ((4, 16, 16, 3), 32),
        ((2, 15, 9, 16), 8),
        ((3, 8, 6, 32), 64),
        ((1, 7, 7, 8), 8),
        ((2, 9, 11, 8), 24),  # 16 channels a vector, then 8
    ],
)
def test_fused_conv_relu_pool_matches_the_separate_layers(x_shape, out_channels):
    # Odd heights and widths: the row and column the pooling drops must get no gradient.
    k1, k2, k3, k4 = jax.random.split(jax.random.key(4), 4)
    x = jax.random.normal(k1, x_shape)
    w = jax.random.normal(k2, (3, 3, x_shape[-1], out_channels)) * 0.3
    b = jax.random.normal(k3, (out_channels,)) * 0.3
    ref = _reference_block(x, w, b)
    fused = jax.jit(onednn.conv_relu_pool)(x, w, b)
    if not onednn.available():
        assert onednn.conv_relu_pool(x, w, b) is None
        return
    np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-5)
    probe = jax.random.normal(k4, ref.shape)

    def loss(block, x, w, b):
        return jnp.sum(block(x, w, b) * probe)

    grads = jax.jit(jax.grad(partial(loss, onednn.conv_relu_pool), argnums=(0, 1, 2)))(x, w, b)
    want = jax.grad(partial(loss, _reference_block), argnums=(0, 1, 2))(x, w, b)
    for g, r in zip(grads, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_fused_block_leaves_output_channels_not_a_multiple_of_8_to_the_separate_layers():
    # ReLU's mask packs 8 output channels to a byte: 12 channels fall back (None), and
    # conv_act_pool then runs the separate layers, with the same result.
    x = jax.random.normal(jax.random.key(14), (2, 8, 8, 3))
    conv = nnx.Conv(3, 12, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    assert onednn.conv_relu_pool(x, conv.kernel[...], conv.bias[...]) is None
    from springfield.models.layers import Conv, conv_act_pool

    layer = Conv(3, 12, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        conv_act_pool(layer, jax.nn.relu, x),
        _reference_block(x, layer.kernel[...], layer.bias[...]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_fused_block_in_bfloat16_matches_the_separate_bfloat16_layers(monkeypatch):
    # Against float32, ReLU's mask flips wherever bfloat16 moves a sum across zero, so the
    # fair reference is the unfused bfloat16 path (the same products, and float32
    # activations, which the block keeps inside); and the result must differ from float32's
    # (else the bfloat16 path silently ran float32).
    monkeypatch.setenv("SPRINGFIELD_BF16_ACTIVATIONS", "0")
    k1, k2, k3, k4 = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(k1, (4, 12, 12, 16))
    w = jax.random.normal(k2, (3, 3, 16, 32)) * 0.2
    b = jax.random.normal(k3, (32,)) * 0.2
    probe = jax.random.normal(k4, (4, 6, 6, 32))
    if not onednn.available():
        assert onednn.conv_relu_pool(x, w, b, bfloat16=True) is None
        return
    conv = onednn.make_conv(None, bfloat16=True)  # type: ignore[arg-type]

    def separate(x, w, b):
        y = conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC) + b
        return nnx.avg_pool(jax.nn.relu(y), (2, 2), strides=(2, 2))

    out = {}
    for name, block in {
        "fused": partial(onednn.conv_relu_pool, bfloat16=True),
        "separate": separate,
        "float32": onednn.conv_relu_pool,
    }.items():

        def loss(x, w, b, block=block):
            y = block(x, w, b)
            return jnp.sum(y * probe), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, b)
        out[name] = (y, *grads)
    for a, c in zip(out["fused"], out["separate"], strict=True):
        # The bias gradient sums bfloat16 output gradients here, float32 ones there.
        np.testing.assert_allclose(a, c, rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(c))))
    assert float(jnp.max(jnp.abs(out["fused"][0] - out["float32"][0]))) > 0 or (
        not onednn.bf16_supported()
    )


@pytest.mark.parametrize("channels, input_grad", [(16, True), (3, False)])
def test_fused_block_hands_bfloat16_activations_on(channels, input_grad):
    # With bfloat16 activations the block reads a bfloat16 input, writes a bfloat16 output
    # and reads its bfloat16 gradient, and gives the input's gradient back in bfloat16 (the
    # image's block of 3 channels takes the float32 image). Its numbers are the separate
    # float32 layers' on the bfloat16-rounded input and weights (the same products, whose
    # ReLU masks then agree), within bfloat16's rounding of the activations.
    if not (onednn.available() and onednn.bf16_supported()):
        pytest.skip("bfloat16 activations need oneDNN on a CPU with bfloat16 instructions")
    k1, k2, k3, k4 = jax.random.split(jax.random.key(12), 4)
    x = jax.random.normal(k1, (4, 12, 10, channels))
    if channels > 3:
        x = x.astype(jnp.bfloat16)
    w = jax.random.normal(k2, (3, 3, channels, 32)) * 0.2
    b = jax.random.normal(k3, (32,)) * 0.2
    probe = jax.random.normal(k4, (4, 6, 5, 32))
    fused = partial(onednn.conv_relu_pool, bfloat16=True, input_grad=input_grad, activations=True)

    def rounded(x, w, b):
        x, w = (a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, w))
        return _reference_block(x if input_grad else lax.stop_gradient(x), w, b)

    out = {}
    for name, block in {"fused": fused, "reference": rounded}.items():

        def loss(x, w, b, block=block):
            y = block(x, w, b)
            return jnp.sum(y.astype(jnp.float32) * probe), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, b)
        out[name] = (y, *grads)
    y, dx, dw, db = out["fused"]
    assert y.dtype == jnp.bfloat16 and dx.dtype == x.dtype
    assert dw.dtype == db.dtype == jnp.float32
    for a, c in zip(out["fused"], out["reference"], strict=True):
        a, c = np.asarray(a, np.float32), np.asarray(c, np.float32)
        np.testing.assert_allclose(a, c, rtol=2e-2, atol=2e-2 * float(np.max(np.abs(c))))
    if not input_grad:
        assert not np.asarray(dx, np.float32).any()


def _first_results(hlo: str, target: str) -> list[str]:
    # The first result type of each `target` custom call in StableHLO text, as in
    # "... -> (tensor<2x16x16x32xbf16>, tensor<...xui8>)" or "... -> tensor<...xbf16>".
    calls = [line for line in hlo.splitlines() if "custom_call" in line and target in line]
    return [line.split("->")[-1].split(",")[0].strip(" ()") for line in calls]


def test_bfloat16_refcnn_hands_bfloat16_between_its_fused_blocks():
    if not (onednn.available() and onednn.bf16_supported()):
        pytest.skip("bfloat16 activations need oneDNN on a CPU with bfloat16 instructions")
    x = jax.random.normal(jax.random.key(13), (2, 32, 32, 3))
    model = build_model("refcnn", 3, image_size=(32, 32), precision="bfloat16")
    loss = lambda m: jnp.sum(m(x, train=True) ** 2)  # noqa: E731
    hlo = nnx.jit(nnx.grad(loss)).lower(model).as_text()
    outputs = _first_results(hlo, "block_forward")  # the pooled outputs
    assert len(outputs) == 3 and all(o.endswith("xbf16>") for o in outputs), outputs
    assert model(x, train=True).dtype == jnp.float32  # the head's logits
    eval_hlo = nnx.jit(lambda m, x: m(x)).lower(model, x).as_text()
    infers = _first_results(eval_hlo, "block_infer")
    assert len(infers) == 3 and all(o.endswith("xbf16>") for o in infers), infers


def test_fused_block_passes_without_avx512_give_the_same_results():
    # The pooling passes have AVX-512 and portable versions; a CPU without AVX-512 runs the
    # latter. The block's tests again, in a process that keeps to the portable ones.
    if not onednn.available():
        pytest.skip("oneDNN cannot run here")
    tests = [
        f"{__file__}::{name}"
        for name in (
            "test_fused_conv_relu_pool_matches_the_separate_layers",
            "test_fused_block_hands_bfloat16_activations_on",
            "test_first_block_without_input_gradient_in_chunks_of_one_image",
        )
    ]
    env = {**os.environ, "SPRINGFIELD_KERNELS_AVX512": "0"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_models_use_the_fused_block_only_for_relu_and_train_the_same(monkeypatch):
    # refcnn and seed run conv -> ReLU -> pool as one oneDNN block; their gradients equal
    # the separate layers'; with another activation the block is not used.
    x = jax.random.normal(jax.random.key(6), (2, 32, 32, 3))
    grads = {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("SPRINGFIELD_FUSE_BLOCKS", fuse)
        model = build_model("refcnn", 3, image_size=(32, 32))
        loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
        hlo = nnx.jit(nnx.grad(loss)).lower(model).as_text()
        assert ("block_forward" in hlo) == (fuse == "1" and onednn.available())
        grads[fuse] = nnx.grad(loss)(model)
    for a, b in zip(jax.tree.leaves(grads["1"]), jax.tree.leaves(grads["0"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    monkeypatch.delenv("SPRINGFIELD_FUSE_BLOCKS")
    gelu = build_model("refcnn", 3, image_size=(32, 32), activation="gelu")
    assert "block_forward" not in nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)))).lower(gelu).as_text()
    # Evaluation (no gradient) runs the block without keeping ReLU's mask.
    seed = build_model("seed", 3, image_size=(64, 48))
    hlo = nnx.jit(lambda m, x: m(x)).lower(seed, jnp.zeros((2, 64, 48, 3))).as_text()
    assert ("block_infer" in hlo) == onednn.available()
    assert "block_forward" not in hlo


CHUNKED_BLOCK_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax import lax
from springfield.kernels import onednn
NHWC = ("NHWC", "HWIO", "NHWC")
k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
x = jax.random.normal(k1, (5, 10, 12, 3))
w = jax.random.normal(k2, (3, 3, 3, 16)) * 0.3
b = jax.random.normal(k3, (16,)) * 0.3
probe = jax.random.normal(k4, (5, 5, 6, 16))
def ref(x, w, b):
    y = lax.conv_general_dilated(lax.stop_gradient(x), w, (1, 1), "SAME", dimension_numbers=NHWC)
    return nnx.avg_pool(jax.nn.relu(y + b), (2, 2), strides=(2, 2))
fused = lambda x, w, b: onednn.conv_relu_pool(x, w, b, input_grad=False)
if not onednn.available():
    fused = ref
for block in (ref, fused):
    y = jax.jit(block)(x, w, b)
    g = jax.jit(jax.grad(lambda x, w, b: jnp.sum(block(x, w, b) * probe), (0, 1, 2)))(x, w, b)
    print(repr([np.asarray(a).tolist() for a in (y, *g)]))
"""


def test_first_block_without_input_gradient_in_chunks_of_one_image():
    # The first block (input_grad=False) runs a batch of 5 one image at a time (a 1 KiB
    # chunk budget) and sums the chunks' weight gradients: the same as the separate layers
    # under stop_gradient, with a zero input gradient.
    env = {**os.environ, "SPRINGFIELD_BLOCK_CHUNK_KB": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHUNKED_BLOCK_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ref, fused = (eval(line) for line in out.stdout.splitlines()[-2:])  # noqa: S307 - our output
    y_ref, dx_ref, dw_ref, db_ref = (np.asarray(a) for a in ref)
    y, dx, dw, db = (np.asarray(a) for a in fused)
    assert not dx_ref.any() and not dx.any()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [None, jax.nn.relu, jax.nn.gelu])
def test_batch_norm_matches_flax_in_training(act):
    # oneDNN's training BatchNorm (+ ReLU): the output, the gradients of the input, scale and
    # bias, and the running averages equal nnx.BatchNorm's (then the activation).
    from springfield.models import layers

    k1, k2 = jax.random.split(jax.random.key(8))
    x = 1.0 + 2.0 * jax.random.normal(k1, (6, 5, 7, 16))
    probe = jax.random.normal(k2, x.shape)
    out = {}
    for name, norm in (("xla", layers.xla_norm), ("onednn", layers.onednn_norm)):
        bn = nnx.BatchNorm(16, momentum=0.9, rngs=nnx.Rngs(0))
        bn.scale[...] = jnp.linspace(0.5, 1.5, 16)
        bn.bias[...] = jnp.linspace(-0.3, 0.3, 16)

        def loss(bn, x, norm=norm):
            return jnp.sum(norm(bn, x, train=True, act=act) * probe)

        value, (g_bn, g_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(bn, x)
        hlo = nnx.jit(nnx.grad(loss)).lower(bn, x).as_text()
        assert ("bn_forward" in hlo) == (name == "onednn" and onednn.available())
        out[name] = (value, g_x, g_bn.scale[...], g_bn.bias[...], bn.mean[...], bn.var[...])
    for a, b in zip(out["xla"], out["onednn"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(a))))
    # The running averages moved from their initial zeros and ones.
    assert float(jnp.max(jnp.abs(out["onednn"][4]))) > 0.05


def test_resnet_uses_onednn_batch_norm_only_in_training_and_trains_the_same(monkeypatch):
    x = jax.random.normal(jax.random.key(9), (4, 16, 16, 3))
    grads, stats = {}, {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("SPRINGFIELD_FUSE_BN", fuse)
        model = build_model("resnet", 3, image_size=(16, 16))
        loss = lambda m: jnp.sum(m(x, train=True) ** 2)  # noqa: E731
        assert ("bn_forward" in nnx.jit(nnx.grad(loss)).lower(model).as_text()) == (
            fuse == "1" and onednn.available()
        )
        assert "bn_forward" not in nnx.jit(lambda m, x: m(x)).lower(model, x).as_text()
        grads[fuse] = nnx.grad(loss)(model)
        stats[fuse] = nnx.state(model, nnx.BatchStat)
    for a, b in zip(jax.tree.leaves(grads["1"]), jax.tree.leaves(grads["0"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(stats["1"]), jax.tree.leaves(stats["0"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_resnet_hands_bfloat16_activations_to_batch_norm():
    # With --precision bfloat16, the convolutions write bfloat16 and BatchNorm (+ ReLU) reads
    # and writes bfloat16 in oneDNN; the loss stays within 2% of float32's (above).
    if not (onednn.available() and onednn.bf16_supported()):
        pytest.skip("bfloat16 activations need oneDNN on a CPU with bfloat16 instructions")
    x = jax.random.normal(jax.random.key(10), (4, 16, 16, 3))
    model = build_model("resnet", 3, image_size=(16, 16), precision="bfloat16")
    loss = lambda m: jnp.sum(m(x, train=True) ** 2)  # noqa: E731
    hlo = nnx.jit(nnx.grad(loss)).lower(model).as_text()
    outputs = _first_results(hlo, "bn_forward")  # the normalised activations
    assert outputs and all(o.endswith("xbf16>") for o in outputs), outputs
    assert model(x, train=True).dtype == jnp.float32  # the head's logits
    # Evaluation normalises bfloat16 from the running statistics in oneDNN too, with the
    # result XLA's BatchNorm gives (within bfloat16's rounding).
    eval_hlo = nnx.jit(lambda m, x: m(x)).lower(model, x).as_text()
    assert "bn_infer" in eval_hlo and "bn_forward" not in eval_hlo
    from springfield.models import layers

    bn = model.stem_bn
    bn.mean[...] = jnp.linspace(-0.5, 0.5, bn.mean.shape[0])
    bn.var[...] = jnp.linspace(0.5, 2.0, bn.var.shape[0])
    h = jax.random.normal(jax.random.key(11), (4, 8, 8, bn.mean.shape[0])).astype(jnp.bfloat16)
    a = layers.xla_norm(bn, h, train=False, act=jax.nn.relu).astype(jnp.float32)
    b = layers.onednn_norm(bn, h, train=False, act=jax.nn.relu).astype(jnp.float32)
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_matmul_reads_transposed_operands_in_place(trans_a, trans_b, bf16):
    if not onednn.available():
        pytest.skip(f"oneDNN cannot run here: {onednn.status()}")
    if bf16 and not onednn.bf16_supported():
        pytest.skip("bfloat16 products need a CPU with bfloat16 instructions")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 24) if trans_a else (24, 40), np.float32)
    b = rng.standard_normal((16, 40) if trans_b else (40, 16), np.float32)
    flags = {"trans_a": trans_a, "trans_b": trans_b, "bf16": bf16}
    got = jax.jit(partial(onednn._matmul, out_type=np.float32, **flags))(a, b)
    # With bf16 the kernel rounds float32 operands to bfloat16 itself.
    a64, b64 = (_bf16(a), _bf16(b)) if bf16 else (a.astype(np.float64), b.astype(np.float64))
    want = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    assert got.shape == (24, 16) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    if bf16:  # ...and really multiplies bfloat16, not float32
        exact = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
        assert np.abs(np.asarray(got) - exact).max() > 1e-3


def _bf16(a: jax.Array) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def test_bfloat16_dense_layer_multiplies_bfloat16_operands_both_ways():
    # The forward product and both gradients are those of the bfloat16-rounded operands,
    # summed in float32 (so within float32's rounding of float64 sums of the same products),
    # and clearly not float32's own products (which would mean it silently ran in float32).
    if not (onednn.available() and onednn.bf16_supported()):
        pytest.skip("bfloat16 dense layers need oneDNN on a CPU with bfloat16 instructions")
    dot = onednn.make_dense_dot()
    assert dot is not lax.dot_general
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (12, 512))
    w = jax.random.normal(k2, (512, 160)) * 0.05
    r = jax.random.normal(k3, (12, 160))
    dims = (((1,), (0,)), ((), ()))

    def loss(x, w):
        return jnp.sum(dot(x, w, dims) * r)

    y = jax.jit(lambda x, w: dot(x, w, dims))(x, w)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    assert (y.dtype, gx.dtype, gw.dtype) == (jnp.float32,) * 3
    ref = {"y": _bf16(x) @ _bf16(w), "gx": _bf16(r) @ _bf16(w).T, "gw": _bf16(x).T @ _bf16(r)}
    f32 = {
        "y": np.asarray(x, np.float64) @ np.asarray(w, np.float64),
        "gx": np.asarray(r, np.float64) @ np.asarray(w, np.float64).T,
        "gw": np.asarray(x, np.float64).T @ np.asarray(r, np.float64),
    }
    for name, got in (("y", y), ("gx", gx), ("gw", gw)):
        scale = np.abs(ref[name]).max()
        np.testing.assert_allclose(np.asarray(got), ref[name], atol=1e-5 * scale, err_msg=name)
        assert np.abs(f32[name] - ref[name]).max() > 1e-4 * scale, name

    # A bfloat16 input (the activations of a bfloat16 model) gets its gradient in bfloat16.
    gxb = jax.jit(jax.grad(loss))(x.astype(jnp.bfloat16), w)
    assert gxb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gxb, np.float64), ref["gx"], rtol=1e-2, atol=1e-2)

    # A head of fewer weights than MIN_BF16_DENSE_WEIGHTS stays XLA's float32 dot.
    small = jax.random.normal(k2, (512, 4))
    assert small.size < onednn.MIN_BF16_DENSE_WEIGHTS
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda x, w: dot(x, w, dims))(x, small)),
        np.asarray(jax.jit(lambda x, w: x @ w)(x, small)),
    )


def test_refcnn_in_bfloat16_runs_its_dense_layer_on_onednn_and_trains_like_float32(
    monkeypatch,
):
    if not (onednn.available() and onednn.bf16_supported()):
        pytest.skip("bfloat16 dense layers need oneDNN on a CPU with bfloat16 instructions")
    monkeypatch.setenv("SPRINGFIELD_BF16_DENSE", "1")  # the default too, except on AMX
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    labels = jnp.arange(8) % 4
    losses = {}
    for precision in ("float32", "bfloat16"):
        model = build_model("refcnn", 4, image_size=(32, 32), precision=precision)
        on_onednn = model.fc.dot_general is not lax.dot_general
        assert on_onednn == (precision == "bfloat16")
        text = jax.jit(lambda m, x: m(x)).lower(model, x).as_text()
        assert ("springfield_onednn_conv_matmul" in text) == (precision == "bfloat16")
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x, train=True), labels).mean()

        for _ in range(5):
            loss, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
        losses[precision] = float(loss)
    assert abs(losses["float32"] - losses["bfloat16"]) < 0.03 * abs(losses["float32"])

    # SPRINGFIELD_BF16_DENSE=0 keeps XLA's float32 dot.
    monkeypatch.setenv("SPRINGFIELD_BF16_DENSE", "0")
    model = build_model("refcnn", 4, image_size=(32, 32), precision="bfloat16")
    assert model.fc.dot_general is lax.dot_general
