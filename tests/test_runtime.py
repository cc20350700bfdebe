"""springfield's XLA flags: accepted by the installed jaxlib, and switchable off."""

from __future__ import annotations

import os
import subprocess
import sys

from springfield.runtime import xla_flags_wanted


def test_flags_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SPRINGFIELD_XLA_FLAGS", "0")
    assert xla_flags_wanted() == []


def test_installed_jaxlib_accepts_the_flags():
    # An unknown XLA flag (or value) aborts the process at start-up: check in a child.
    flags = xla_flags_wanted()
    code = (
        "import jax, jax.numpy as jnp\n"
        "x = jnp.ones((2, 8, 8, 3)); w = jnp.ones((3, 3, 3, 4))\n"
        "f = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',"
        " dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()\n"
        "print(float(jax.jit(jax.grad(f))(w).sum()))\n"
    )
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "SPRINGFIELD_XLA_FLAGS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
