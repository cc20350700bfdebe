"""The fused Adam update (springfield.kernels.fused_adam): optax's numbers, in one pass."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from springfield import kernels
from springfield.config import TrainConfig
from springfield.kernels import onednn
from springfield.kernels.fused_adam import make_fused_update
from springfield.models import build_model
from springfield.training.optim import (
    OPTIMIZERS,
    build_optimizer,
    build_update,
    make_optimizer,
    make_schedule,
)
from springfield.training.steps import init_state, make_train_step

needs_kernel = pytest.mark.skipif(
    not onednn.adam_available(), reason="the fused Adam kernel cannot run here"
)


def _train(name: str, weight_decay: float, fused: bool, precision: str = "float32"):
    """Four real train steps of a small refcnn (a 2M-weight dense layer) under a warm-up +
    cosine schedule; the final state."""
    schedule = make_schedule("cosine", lr=3e-3, total_steps=20, warmup_steps=3)
    tx = make_optimizer(name, schedule, weight_decay=weight_decay)
    model = build_model("refcnn", 4, image_size=(32, 32), precision=precision)
    graphdef, state = init_state(model, tx)
    update = kernels.optimizer_update(
        tx, "auto" if fused else "xla", name=name, schedule=schedule, weight_decay=weight_decay
    )
    assert getattr(update, "fused", False) == fused
    step = make_train_step(graphdef, tx, update=update)
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = {
            "image": jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)),
            "label": jnp.asarray(rng.integers(0, 4, 8).astype(np.int32)),
            "mask": jnp.ones(8, jnp.float32),
        }
        state, metrics = step(state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss_sum"]))
    return state


@needs_kernel
@pytest.mark.parametrize(
    "name, weight_decay", [("adam", 0.0), ("adam", 5e-4), ("adamw", 5e-4)], ids=str
)
def test_fused_update_gives_optax_numbers_bit_for_bit(name, weight_decay):
    # adam, adam with L2 decay on the gradient, adamw's decoupled decay: parameters, both
    # moments and the counts exactly as optax computes them under jit, in optax's structure
    # (so checkpoints of either path restore into the other).
    want = _train(name, weight_decay, fused=False)
    got = _train(name, weight_decay, fused=True)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    adam_states = [
        s
        for s in jax.tree.leaves(
            got.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert [int(s.count) for s in adam_states] == [4]


@needs_kernel
def test_fused_update_without_avx512_gives_the_same_numbers():
    # A CPU without AVX-512 runs the AVX2 loop: the test above again, in a process kept to it.
    env = {**os.environ, "SPRINGFIELD_KERNELS_AVX512": "0"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
         f"{__file__}::test_fused_update_gives_optax_numbers_bit_for_bit"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
    assert "3 passed" in out.stdout


@needs_kernel
def test_fused_update_hands_other_parameters_back_to_optax():
    # Not every parameter float32: the fused update declines, and the step uses optax's.
    schedule = optax.constant_schedule(1e-3)
    update = make_fused_update("adam", schedule, weight_decay=0.0)
    params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    opt_state = make_optimizer("adam", schedule).init(params)
    assert update(params, opt_state, params) is None
    # Nor does it touch a state that is not Adam's.
    sgd_state = optax.sgd(0.1).init({"w": jnp.ones(3)})
    assert update({"w": jnp.ones(3)}, sgd_state, {"w": jnp.ones(3)}) is None


def test_which_runs_get_the_fused_update(monkeypatch):
    schedule = optax.constant_schedule(1e-3)

    def fused(cfg: TrainConfig) -> bool:
        update = build_update(cfg, build_optimizer(cfg, schedule), schedule)
        return getattr(update, "fused", False)

    cfg = TrainConfig()
    assert cfg.optimizer == "adamw"  # the default: fused where the kernel runs
    assert fused(cfg) == onednn.adam_available()
    # Everything else keeps optax's update: other optimizers, an average or a skip guard
    # around the update, a name registered over optax's, and XLA's kernels.
    for other in (
        replace(cfg, optimizer="momentum"),
        replace(cfg, optimizer="lion"),
        replace(cfg, ema=0.99),
        replace(cfg, skip_nonfinite=True),
        replace(cfg, kernels="xla"),
    ):
        assert not fused(other), other
    with kernels.use(fused_adam=False):
        assert not fused(cfg)
    monkeypatch.setitem(OPTIMIZERS, "adam", lambda lr: optax.adam(lr, b1=0.5))
    assert not fused(replace(cfg, optimizer="adam"))
