"""oneDNN's fused convolution + ReLU + pooling block: the separate layers' results, in float32
and bfloat16, with and without AVX-512."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from onednn_common import NHWC, first_results

from springfield import kernels
from springfield.kernels import onednn
from springfield.models import build_model


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


def test_fused_block_in_bfloat16_matches_the_separate_bfloat16_layers():
    # Against float32, ReLU's mask flips wherever bfloat16 moves a sum across zero, so the
    # fair reference is the unfused bfloat16 path (the same products, and float32
    # activations, which the block keeps inside); and the result must differ from float32's
    # (else the bfloat16 path silently ran float32).
    k1, k2, k3, k4 = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(k1, (4, 12, 12, 16))
    w = jax.random.normal(k2, (3, 3, 16, 32)) * 0.2
    b = jax.random.normal(k3, (32,)) * 0.2
    probe = jax.random.normal(k4, (4, 6, 6, 32))
    if not onednn.available():
        assert onednn.conv_relu_pool(x, w, b, bfloat16=True) is None
        return
    conv = onednn.make_conv(None, bfloat16=True, activations=False)  # type: ignore[arg-type]

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


def test_bfloat16_refcnn_hands_bfloat16_between_its_fused_blocks():
    if not (onednn.available() and onednn.bf16_supported()):
        pytest.skip("bfloat16 activations need oneDNN on a CPU with bfloat16 instructions")
    x = jax.random.normal(jax.random.key(13), (2, 32, 32, 3))
    model = build_model("refcnn", 3, image_size=(32, 32), precision="bfloat16")
    loss = lambda m: jnp.sum(m(x, train=True) ** 2)  # noqa: E731
    hlo = nnx.jit(nnx.grad(loss)).lower(model).as_text()
    outputs = first_results(hlo, "block_forward")  # the pooled outputs
    assert len(outputs) == 3 and all(o.endswith("xbf16>") for o in outputs), outputs
    assert model(x, train=True).dtype == jnp.float32  # the head's logits
    eval_hlo = nnx.jit(lambda m, x: m(x)).lower(model, x).as_text()
    infers = first_results(eval_hlo, "block_infer")
    assert len(infers) == 3 and all(o.endswith("xbf16>") for o in infers), infers


def test_kernels_without_avx512_give_the_same_results():
    # The pooling passes and BatchNorm + ReLU6 have AVX-512 and portable versions, and the
    # 5x5 depthwise weight gradients go to oneDNN without AVX-512: a CPU without it runs the
    # others. Their tests again, in a process that keeps to those.
    if not onednn.available():
        pytest.skip("oneDNN cannot run here")
    here = Path(__file__).parent
    tests = [
        f"{__file__}::{name}"
        for name in (
            "test_fused_conv_relu_pool_matches_the_separate_layers",
            "test_fused_block_hands_bfloat16_activations_on",
            "test_first_block_without_input_gradient_in_chunks_of_one_image",
        )
    ] + [
        f"{here / 'test_onednn_norm_dense.py'}::test_batch_norm_matches_flax_in_training",
        f"{here / 'test_onednn_norm_dense.py'}::test_batch_norm_relu6_in_bfloat16_is_near_float32",
        f"{here / 'test_pretrained.py'}::test_depthwise_convolution_and_gradients_equal_xlas",
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


def test_models_use_the_fused_block_only_for_relu_and_train_the_same():
    # refcnn and seed run conv -> ReLU -> pool as one oneDNN block; their gradients equal
    # the separate layers'; with another activation the block is not used.
    x = jax.random.normal(jax.random.key(6), (2, 32, 32, 3))
    grads = {}
    for fuse in ("1", "0"):
        with kernels.use(fuse_blocks=fuse == "1"):
            model = build_model("refcnn", 3, image_size=(32, 32))
        loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
        hlo = nnx.jit(nnx.grad(loss)).lower(model).as_text()
        assert ("block_forward" in hlo) == (fuse == "1" and onednn.available())
        grads[fuse] = nnx.grad(loss)(model)
    for a, b in zip(jax.tree.leaves(grads["1"]), jax.tree.leaves(grads["0"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    gelu = build_model("refcnn", 3, image_size=(32, 32), activation="gelu")
    assert "block_forward" not in nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)))).lower(gelu).as_text()
    # Evaluation (no gradient) runs the block without keeping ReLU's mask.
    seed = build_model("seed", 3, image_size=(64, 48))
    hlo = nnx.jit(lambda m, x: m(x)).lower(seed, jnp.zeros((2, 64, 48, 3))).as_text()
    assert ("block_infer" in hlo) == onednn.available()
    assert "block_forward" not in hlo


def test_first_block_without_input_gradient_in_chunks_of_one_image():
    # The first block (input_grad=False) runs a batch of 5 one image at a time (a 1 KiB
    # chunk budget) and sums the chunks' weight gradients: the same as the separate layers
    # under stop_gradient, with a zero input gradient.
    k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(k1, (5, 10, 12, 3))
    w = jax.random.normal(k2, (3, 3, 3, 16)) * 0.3
    b = jax.random.normal(k3, (16,)) * 0.3
    probe = jax.random.normal(k4, (5, 5, 6, 16))

    def ref(x, w, b):
        y = lax.conv_general_dilated(
            lax.stop_gradient(x), w, (1, 1), "SAME", dimension_numbers=NHWC
        )
        return nnx.avg_pool(jax.nn.relu(y + b), (2, 2), strides=(2, 2))

    def fused(x, w, b):
        return onednn.conv_relu_pool(x, w, b, input_grad=False, chunk_kb=1)

    if not onednn.available():
        pytest.skip(f"oneDNN cannot run here: {onednn.status()}")
    results = {}
    for name, block in (("ref", ref), ("fused", fused)):
        y = jax.jit(block)(x, w, b)
        g = jax.jit(jax.grad(lambda x, w, b, f=block: jnp.sum(f(x, w, b) * probe), (0, 1, 2)))(
            x, w, b
        )
        results[name] = [np.asarray(a) for a in (y, *g)]
    y_ref, dx_ref, dw_ref, db_ref = results["ref"]
    y, dx, dw, db = results["fused"]
    assert not dx_ref.any() and not dx.any()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-4)
