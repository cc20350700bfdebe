"""oneDNN's bfloat16 convolutions: close to float32, really bfloat16, and models that train
alike."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from onednn_common import NHWC

from springfield.kernels import onednn
from springfield.models import build_model


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
