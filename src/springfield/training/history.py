"""The per-step and per-epoch record of a run, kept exact across kills and resumes.

A resumed run must end with the same ``metrics.jsonl`` as an uninterrupted one: every epoch
exactly once, with the same numbers. The checkpoint's JSON record carries what that needs:
the rows of the finished epochs (``history``) and the per-step sums of the epoch in
progress (``epoch_steps``, for checkpoints taken mid-epoch). On resume the file is rewritten
from the record, so a kill between saving a checkpoint and appending its row, or after
appending a row whose checkpoint never completed, leaves no gap and no duplicate.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def encode_steps(sums: Sequence[Mapping]) -> dict[str, list[float]]:
    """Per-step metric sums (device scalars) as JSON lists, one list per metric."""
    if not sums:
        return {}
    return {k: [float(m[k]) for m in sums] for k in sums[0]}


def decode_steps(encoded: Mapping[str, list[float]] | None) -> list[dict]:
    """Inverse of :func:`encode_steps`; float32 again, as the train step returned them."""
    if not encoded:
        return []
    keys = list(encoded)
    return [{k: np.float32(encoded[k][i]) for k in keys} for i in range(len(encoded[keys[0]]))]


def epoch_totals(sums: Sequence[Mapping]) -> dict[str, float]:
    """Sums over the epoch's steps.

    Summed in one float32 reduction over all steps, so the totals do not depend on where a
    kill split the epoch (adding two partial sums would round differently).
    """
    return {k: float(np.sum(np.asarray([m[k] for m in sums], dtype=np.float32))) for k in sums[0]}


def first_nonfinite(sums: Sequence[Mapping], first_step: int) -> tuple[int, float] | None:
    """``(step, loss)`` of the first step in ``sums`` whose loss is NaN or infinite.

    ``sums[i]`` is the metrics of step ``first_step + i`` (steps count from 1).
    """
    for i, m in enumerate(sums):
        loss = float(m["loss_sum"])
        if not math.isfinite(loss):
            return first_step + i, loss
    return None


def write_metrics(workdir: Path, rows: Sequence[Mapping]) -> None:
    """Replace ``<workdir>/metrics.jsonl`` by ``rows``, atomically."""
    path = Path(workdir) / "metrics.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def append_metrics(workdir: Path, row: Mapping) -> None:
    """Add one epoch's row to ``<workdir>/metrics.jsonl``."""
    with open(Path(workdir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(workdir: Path) -> list[dict]:
    """The rows of ``<workdir>/metrics.jsonl`` (none if it does not exist)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
