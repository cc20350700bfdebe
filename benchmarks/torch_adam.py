"""PyTorch's Adam as a practitioner gets it (``foreach``, the default) and ``fused=True``.

The framework race (``frameworks.py``) and the end-to-end race (``torch_train.py``) give
PyTorch its fastest Adam; this measures which that is, in one process, the two optimizers
interleaved over 5 rounds of 10 steps, for eager and ``torch.compile``, float32 and
autocast bfloat16, on ``frameworks.py``'s networks and random batches::

    python benchmarks/torch_adam.py --configs refcnn:64:32,refcnn:128:128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="refcnn:64:32,refcnn:128:128")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from race.common import LR, parse_config
    from race.run_torch import TorchRunner

    print("| network | mode | precision | foreach img/s | fused img/s |\n|---|---|---|---:|---:|")
    for cfg in (parse_config(c, 4) for c in args.configs.split(",")):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (cfg.batch, *cfg.size, 3), dtype=np.uint8)
        labels = rng.integers(0, 4, cfg.batch).astype(np.int32)
        for compiled in (False, True):
            for bf16 in (False, True):
                runs = {}
                for fused in (False, True):
                    r = TorchRunner(cfg, images, labels, compiled=compiled, bf16=bf16)
                    r.opt = torch.optim.Adam(r.model.parameters(), lr=LR, fused=fused)
                    r.train(3)  # compilation and warm-up
                    runs[fused] = (r, [])
                for _ in range(args.rounds):
                    for r, rates in runs.values():
                        t0 = time.perf_counter()
                        r.train(10)
                        rates.append(10 * cfg.batch / (time.perf_counter() - t0))
                mode = "torch.compile" if compiled else "eager"
                precision = "bfloat16" if bf16 else "float32"
                foreach, fused_rate = (np.median(runs[f][1]) for f in (False, True))
                print(f"| {cfg.key} | {mode} | {precision} | {foreach:.0f} | {fused_rate:.0f} |")


if __name__ == "__main__":
    main()
