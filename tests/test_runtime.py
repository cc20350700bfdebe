"""springfield's process tuning (springfield.kernels.tuning): XLA flags accepted by the
installed jaxlib, glibc's huge pages, the command's re-execution."""

from __future__ import annotations

import os
import subprocess
import sys

from springfield.kernels import tuning
from springfield.kernels.tuning import xla_flags_wanted


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
    env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_malloc_env_asks_glibc_for_huge_pages_once(monkeypatch, tmp_path):
    runtime = tuning
    if not runtime.THP_SETTING.exists() or not sys.platform.startswith("linux"):
        assert runtime.malloc_env({}) == {}
        return
    madvise = "[madvise]" in runtime.THP_SETTING.read_text()
    want = {"GLIBC_TUNABLES": runtime.HUGEPAGE_TUNABLE} if madvise else {}
    assert runtime.malloc_env({}) == want
    # Kept alongside a user's own tunables; never twice.
    mine = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}
    if madvise:
        assert runtime.malloc_env(mine)["GLIBC_TUNABLES"] == (
            "glibc.malloc.trim_threshold=1:" + runtime.HUGEPAGE_TUNABLE
        )
    assert runtime.malloc_env({"GLIBC_TUNABLES": runtime.HUGEPAGE_TUNABLE}) == {}
    # A fake setting file: "always" and "never" need nothing.
    fake = tmp_path / "enabled"
    for text, wanted in (("always [madvise] never", True), ("[always] madvise never", False),
                         ("always madvise [never]", False)):  # fmt: skip
        fake.write_text(text)
        monkeypatch.setattr(runtime, "THP_SETTING", fake)
        assert bool(runtime.malloc_env({})) == wanted


def test_the_command_reexecutes_itself_with_the_malloc_env():
    # The console script's main() replaces its process once by the same command line with
    # the tunable set; main(argv) called from Python never does.
    from springfield.runtime import malloc_env

    code = (
        "import os, sys; from springfield import cli\n"
        "sys.argv = ['springfield', '--help']\n"
        "print('TUNABLES', os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
        "cli.main()\n"
    )
    from springfield.cli import USAGE

    env = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "_SPRINGFIELD_REEXEC")
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("TUNABLES")]
    want = malloc_env(env).get("GLIBC_TUNABLES")
    # Before the re-execution (unset), then once more after it, with the tunable.
    assert lines == (["TUNABLES None", f"TUNABLES {want}"] if want else ["TUNABLES None"])
    assert out.stdout.count(USAGE.splitlines()[0]) == 1
