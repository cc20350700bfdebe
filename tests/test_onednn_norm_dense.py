"""oneDNN's batch normalisation and dense layer (matmul): flax's and XLA's results."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from onednn_common import first_results

from springfield import kernels
from springfield.kernels import onednn, xla
from springfield.models import build_model


@pytest.mark.parametrize("act", [None, jax.nn.relu, jax.nn.relu6, jax.nn.gelu])
def test_batch_norm_matches_flax_in_training(act):
    # oneDNN's training BatchNorm (+ ReLU; + ReLU6 in norm.cc's own loops): the output, the
    # gradients of the input, scale and bias, and the running averages equal nnx.BatchNorm's
    # (then the activation). 20 channels: a whole vector of 16 and a part of one.
    k1, k2 = jax.random.split(jax.random.key(8))
    x = 1.0 + 2.0 * jax.random.normal(k1, (6, 5, 7, 20))
    probe = jax.random.normal(k2, x.shape)
    # Scales up to 6 put a part of ReLU6's inputs above 6, another below 0.
    top = 6.0 if act is jax.nn.relu6 else 1.5
    out = {}
    for name, norm in (("xla", xla.norm), ("onednn", kernels.norm())):
        bn = nnx.BatchNorm(20, momentum=0.9, rngs=nnx.Rngs(0))
        bn.scale[...] = jnp.linspace(0.5, top, 20)
        bn.bias[...] = jnp.linspace(-0.3, 0.3, 20)

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
    if act is jax.nn.relu6:  # both ends of the clamp were reached
        y = xla.norm(bn, x, train=True)
        assert float(jnp.mean(y > 6)) > 0.02 and float(jnp.mean(y < 0)) > 0.2


def test_batch_norm_relu6_in_bfloat16_is_near_float32():
    # bfloat16 activations in and out of norm.cc's BatchNorm + ReLU6 loops (float32 inside).
    if not onednn.available():
        pytest.skip(f"oneDNN cannot run here: {onednn.status()}")
    k1, k2 = jax.random.split(jax.random.key(12))
    x = (1.0 + 2.0 * jax.random.normal(k1, (4, 6, 6, 40))).astype(jnp.bfloat16)
    probe = jax.random.normal(k2, x.shape)
    out = {}
    for name, norm, xin in (("xla", xla.norm, x.astype(jnp.float32)),
                            ("ours", kernels.norm(), x)):  # fmt: skip
        bn = nnx.BatchNorm(40, momentum=0.9, rngs=nnx.Rngs(0))
        bn.scale[...] = jnp.linspace(0.5, 6.0, 40)

        def loss(bn, x, norm=norm):
            y = norm(bn, x, train=True, act=jax.nn.relu6)
            return jnp.sum(y.astype(jnp.float32) * probe), y

        (_, y), g_bn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(bn, xin)
        out[name] = (y.astype(jnp.float32), g_bn.scale[...], g_bn.bias[...])
    assert out["ours"][0].dtype == jnp.float32
    for a, b in zip(out["xla"], out["ours"], strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(a))))


def test_resnet_uses_onednn_batch_norm_only_in_training_and_trains_the_same():
    x = jax.random.normal(jax.random.key(9), (4, 16, 16, 3))
    grads, stats = {}, {}
    for fuse in ("1", "0"):
        with kernels.use(fuse_norm=fuse == "1"):
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
    outputs = first_results(hlo, "bn_forward")  # the normalised activations
    assert outputs and all(o.endswith("xbf16>") for o in outputs), outputs
    assert model(x, train=True).dtype == jnp.float32  # the head's logits
    # Evaluation normalises bfloat16 from the running statistics in oneDNN too, with the
    # result XLA's BatchNorm gives (within bfloat16's rounding).
    eval_hlo = nnx.jit(lambda m, x: m(x)).lower(model, x).as_text()
    assert "bn_infer" in eval_hlo and "bn_forward" not in eval_hlo
    bn = model.stem_bn
    bn.mean[...] = jnp.linspace(-0.5, 0.5, bn.mean.shape[0])
    bn.var[...] = jnp.linspace(0.5, 2.0, bn.var.shape[0])
    h = jax.random.normal(jax.random.key(11), (4, 8, 8, bn.mean.shape[0])).astype(jnp.bfloat16)
    a = xla.norm(bn, h, train=False, act=jax.nn.relu).astype(jnp.float32)
    b = kernels.norm()(bn, h, train=False, act=jax.nn.relu).astype(jnp.float32)
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
    got = jax.jit(partial(onednn.matmul, out_type=np.float32, **flags))(a, b)
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


def test_refcnn_in_bfloat16_runs_its_dense_layer_on_onednn_and_trains_like_float32():
    if not (onednn.available() and onednn.bf16_supported()):
        pytest.skip("bfloat16 dense layers need oneDNN on a CPU with bfloat16 instructions")
    with kernels.use(bf16_dense=True):  # the default too, except on AMX
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
                logits = m(x, train=True)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            for _ in range(5):
                loss, grads = nnx.value_and_grad(loss_fn)(model)
                opt.update(model, grads)
            losses[precision] = float(loss)
        assert abs(losses["float32"] - losses["bfloat16"]) < 0.03 * abs(losses["float32"])

    # bf16_dense=False keeps XLA's float32 dot.
    with kernels.use(bf16_dense=False):
        model = build_model("refcnn", 4, image_size=(32, 32), precision="bfloat16")
    assert model.fc.dot_general is lax.dot_general
