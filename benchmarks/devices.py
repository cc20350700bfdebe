"""Training throughput of ``springfield train`` on 1 device, 2 virtual CPU devices, 2 processes.

    python benchmarks/devices.py [--variants 1dev,2dev,2proc] [--repeats 1] [train flags ...]

Every variant is the same ``springfield train`` command (same model, global batch, data and
input workers) in fresh processes, because the device count is fixed when JAX starts:

* ``1dev``: one process, one CPU device (the default);
* ``2dev``: one process, ``--cpu-devices 2`` (the batch sharded over two virtual devices);
* ``2proc``: two processes on 127.0.0.1 with ``--distributed``, one device each, gloo
  collectives between them (what a 2-host run does, on one machine).

The table shows the median ``train_img_s`` of the epochs after the first (the first one
compiles) over all repeats, and the input-wait fraction. Repeats alternate the variants so
each sees the same machine load. Flags not listed above go to ``springfield train`` after
the defaults below (later flags win), e.g. ``--model refcnn`` or ``--data DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULTS = [
    "--model", "resnet", "--image-size", "64", "64", "--batch-size", "32", "--epochs", "3",
    "--no-tensorboard", "--no-report",
]  # fmt: skip
VARIANTS = {
    "1dev": "1 process x 1 device",
    "2dev": "1 process x 2 virtual devices (--cpu-devices 2)",
    "2proc": "2 processes x 1 device (--distributed, gloo)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant: str, workdir: Path, train_flags: list[str]) -> list[dict]:
    """Train once as ``variant`` into ``workdir``; its metrics rows."""
    base = [sys.executable, "-m", "springfield.cli", "train", "--workdir", str(workdir)]
    base += DEFAULTS + train_flags
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if variant == "2proc":
        port = _free_port()
        cmds = [
            base
            + ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
            + ["--process-id", str(i)]
            for i in (0, 1)
        ]
    else:
        cmds = [base + (["--cpu-devices", "2"] if variant == "2dev" else [])]
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            sys.exit(f"{variant}: springfield train failed ({p.returncode}):\n{err[-2000:]}")
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    """Parse flags, run the variants, print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="1dev,2dev,2proc", help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant (median over all)")
    args, train_flags = p.parse_known_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    speeds: dict[str, list[float]] = {v: [] for v in variants}
    waits: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for k, v in enumerate(variants[r % len(variants) :] + variants[: r % len(variants)]):
                rows = run_variant(v, Path(tmp) / f"{v}-{r}-{k}", train_flags)[1:]
                if not rows:
                    sys.exit("need --epochs 2 or more: the first epoch includes compilation")
                speeds[v] += [row["train_img_s"] for row in rows]
                waits[v] += [row["input_wait_fraction"] for row in rows]
                print(f"repeat {r + 1} {v}: {[round(x) for x in speeds[v][-len(rows) :]]} img/s")
    flags = " ".join(DEFAULTS + train_flags)
    print(f"\n`springfield train {flags}`, {os.cpu_count()} CPUs\n")
    print(f"| variant | train img/s (median) | vs {variants[0]} | input wait |")
    print("|---|---:|---:|---:|")
    first = statistics.median(speeds[variants[0]])
    for v in variants:
        s = statistics.median(speeds[v])
        w = statistics.median(waits[v])
        print(f"| {VARIANTS[v]} | {s:.0f} | {s / first:.2f}x | {w:.0%} |")


if __name__ == "__main__":
    main()
