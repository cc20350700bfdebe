"""Where the benchmarks write their tables and rows by default: ``bench-out/`` at the
repository root, which git ignores. A result worth keeping goes into the docs page that
discusses it, with its command and machine."""

from __future__ import annotations

import time
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "bench-out"


def default_output(name: str, suffix: str) -> Path:
    """``bench-out/<name>-<date>-<time>.<suffix>`` (the folder made if missing)."""
    OUT_DIR.mkdir(exist_ok=True)
    return OUT_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.{suffix}"
