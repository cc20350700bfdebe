"""Whether two run folders trained the same model: every metrics.jsonl number but the timings,
eval.json, and every parameter and BatchNorm statistic of the latest checkpoint, bit for bit.

    python benchmarks/same_run.py RUN_A RUN_B

For a change that must not change what a user gets (a refactoring): train the same command
before and after it into two folders, then compare them. Exits 0 when they are the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

# Per-epoch numbers that measure time, not the model (matched by name).
TIMINGS = ("img_s", "seconds", "wait", "time")


def _without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(t in k for t in TIMINGS)}


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [_without_timings(json.loads(x)) for x in lines if x.strip()]


def _leaves(run: Path) -> tuple[int, list[tuple[str, np.ndarray]]]:
    from springfield.trained_run import load_run

    trained = load_run(run)
    flat = jax.tree_util.tree_flatten_with_path((trained.params, trained.rest))[0]
    return trained.step, [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in flat]


def differences(a: Path, b: Path) -> list[str]:
    """What differs between run folders ``a`` and ``b`` (empty: the same run)."""
    out = []
    if _metrics(a) != _metrics(b):
        out.append("metrics.jsonl (timings aside)")
    ev_a, ev_b = (_without_timings(json.loads((r / "eval.json").read_text())) for r in (a, b))
    if ev_a != ev_b:
        out.append("eval.json")
    (step_a, leaves_a), (step_b, leaves_b) = _leaves(a), _leaves(b)
    if step_a != step_b:
        out.append(f"checkpoint step {step_a} vs {step_b}")
    if [k for k, _ in leaves_a] != [k for k, _ in leaves_b]:
        out.append("parameter structure")
    for (key, x), (_, y) in zip(leaves_a, leaves_b, strict=False):
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            out.append(f"parameter {key}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args()
    diffs = differences(args.run_a, args.run_b)
    if diffs:
        print("different: " + ", ".join(diffs))
        return 1
    n = len(_leaves(args.run_a)[1])
    print(f"same: metrics.jsonl (timings aside), eval.json, all {n} parameter arrays bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
