"""oneDNN convolutions (springfield.kernels.onednn): the maths of XLA's, used where they can run;
built once, switched off where they cannot run."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from onednn_common import IS_LINUX_X86, NHWC

from springfield import kernels
from springfield.kernels import onednn
from springfield.models import build_model


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


def test_models_train_the_same_with_onednn_xla_and_lax():
    # The three convolution paths of a ResNet (with its stride-2 and 1x1 convs, BatchNorm)
    # give the same gradients; ensembles (vmapped members) run through oneDNN too.
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    grads = {}
    for name, selection in {
        "lax": kernels.portable(),
        "xla": kernels.use("xla"),
        "onednn": kernels.use("auto"),
    }.items():
        with selection:
            model = build_model("resnet", 3, image_size=(16, 16), ensemble=2)
        grads[name] = nnx.grad(lambda m: jnp.sum(m(x, train=True) ** 2))(model)
    for other in ("xla", "onednn"):
        for a, b in zip(jax.tree.leaves(grads["lax"]), jax.tree.leaves(grads[other]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_kernels_xla_keeps_every_layer_in_xla():
    from springfield.kernels import xla

    with kernels.use("xla"):
        assert kernels.conv() is xla.conv_general_dilated
        assert kernels.conv(materialise=False) is lax.conv_general_dilated
        assert kernels.norm() is xla.norm
        assert kernels.dense_dot() is None
        model = build_model("refcnn", 3, image_size=(32, 32))
    x = jnp.ones((2, 32, 32, 3))
    assert "springfield_onednn" not in jax.jit(lambda x: model(x, train=False)).lower(x).as_text()
    assert kernels.describe("xla") == "XLA (--kernels xla)"
    with kernels.portable(), kernels.use("auto", "bfloat16"):
        assert kernels.conv() is lax.conv_general_dilated


def test_kernels_onednn_is_refused_where_it_cannot_run(monkeypatch):
    from springfield.errors import SpringfieldError

    with pytest.raises(SpringfieldError, match="--kernels 'fast': unknown"):
        kernels.use("fast").__enter__()
    monkeypatch.setattr(onednn, "available", lambda: False)
    monkeypatch.setattr(onednn, "status", lambda: "XLA (no compiler)")
    with kernels.use("onednn"), pytest.raises(SpringfieldError, match="onednn: .*no comp"):
        build_model("resnet", 3, image_size=(16, 16))
    with kernels.use("auto"):
        assert kernels.conv() is not None  # auto falls back to XLA's
    assert kernels.describe("auto") == "XLA (no compiler)"


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
