"""examples/quickstart.py runs as a user runs it: a plain script, start to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[1] / "examples" / "quickstart.py"


def test_quickstart_trains_plots_and_predicts(tmp_path):
    env = {
        **os.environ,
        "QUICKSTART_EPOCHS": "1",
        "QUICKSTART_PER_CLASS": "24",
        "QUICKSTART_WORKDIR": str(tmp_path / "run"),
        "MPLBACKEND": "Agg",
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    run = tmp_path / "run"
    accuracy = json.loads((run / "eval.json").read_text())["accuracy"]
    assert f"final validation accuracy: {accuracy}" in out
    assert (run / "quickstart_curves.png").read_bytes()[:4] == b"\x89PNG"
    # One prediction line per class, then the PIL image and the array, then the evaluation.
    for name in ("bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson"):
        assert f"{name:>14} -> " in out
    assert "'file': '<image 0>'" in out and "'file': '<image 1>'" in out
    assert f"accuracy {accuracy:.3f} on" in out
