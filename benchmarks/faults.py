"""Fault injection: SIGKILL a real training run N times at random moments, then compare.

    python benchmarks/faults.py --kills 10 [--seed 0] [--out DIR] [train flags ...]

Trains one run straight through, then the same run again in another folder, killing it
with SIGKILL ``--kills`` times at seeded random moments and restarting it with the same
command each time, as a user (or a cluster) would after a crash. Kills land anywhere: while
data is prepared or a checkpoint restored, during train steps, during an asynchronous
checkpoint save, during evaluation. Only the trainer is killed, as the OOM killer would;
its grain worker processes must then exit on their own.

Just before each kill the script asks the trainer for a stack dump (faulthandler, SIGUSR1)
and prints where the kill landed. At the end it loads both runs with
``springfield.trained_run.load_run`` and compares every parameter and BatchNorm leaf with
``np.array_equal``, ``eval.json``, and ``metrics.jsonl`` (minus timings). The last line reads
``survived K/N kills; final parameters identical: yes|no``.

Flags not listed above go to ``springfield train`` after the defaults below (later flags
win), e.g. ``--epochs 2`` or ``--data DIR``. Without ``--data`` the built-in synthetic set
is used (generated into the cache on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_TRAIN_FLAGS = [
    "--epochs",
    "3",
    "--image-size",
    "32",
    "32",
    "--batch-size",
    "32",
    "--checkpoint-every",
    "3",
    "--workers",
    "1",
    "--no-tensorboard",
    "--no-report",
]
# Timing fields differ between any two runs; everything else in metrics.jsonl and eval.json
# must not. Matched by name pattern, not a list, so that a timing added later
# (first_step_seconds was one) does not turn "identical" into "no" again.
TIMING_KEY = re.compile(r"(seconds|_s|_ms|_time|_fraction|^time|timing|elapsed)$|^(time|timing)")


def without_timings(value):
    """``value`` (a JSON document) with every key that names a timing left out, recursively."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not TIMING_KEY.search(k)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


READY = "parameters) on"  # the trainer's summary line: data ready, state restored
# The trainer, with a stack dump on SIGUSR1 so that the script can say where a kill landed.
CHILD = (
    "import faulthandler, signal, sys\n"
    "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
    "from springfield.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def start(workdir: Path, flags: list[str], log: Path) -> subprocess.Popen:
    """Start ``springfield train`` in its own session; stdout and stderr go to ``log``."""
    cmd = [sys.executable, "-c", CHILD, "train", "--workdir", str(workdir), *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float = 600) -> bool:
    """Wait until ``text`` appears in ``log``; False if the process exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return text in log.read_text(errors="replace")
        time.sleep(0.02)
    raise TimeoutError(f"{text!r} did not appear in {log} within {timeout:.0f} s")


def where(dump: str, checkpoints: Path, started: float) -> str:
    """Where the trainer was, from its faulthandler dump and the checkpoint folder: the
    innermost springfield function of the main thread, the innermost frame, and whether it
    had a checkpoint save in flight (an unfinished save folder it created, after
    ``started``, a ``time.time()``)."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump)
    main = next((b for b in blocks if 'File "<string>"' in b), "")
    frames = re.findall(r'File "([^"]+)", line \d+ in (\S+)', main)  # innermost first
    ours = [f"{Path(p).stem}.{fn}" for p, fn in frames if "/springfield/" in p]
    phase = ours[0] if ours else "start-up (imports)"
    if frames and ours and "/springfield/" not in frames[0][0]:
        path, fn = frames[0]
        package = re.search(r"site-packages/(\w+)/", path) or re.search(r"/python3\.\d+/()", path)
        phase += f" -> {package.group(1) + ' ' if package and package.group(1) else ''}"
        phase += f"{Path(path).stem}.{fn}"
    if any(
        "orbax-checkpoint-tmp" in p.name and p.stat().st_mtime >= started
        for p in checkpoints.glob("*")
    ):
        phase += " [async checkpoint save in flight]"
    return phase


def latest_checkpoint(checkpoints: Path) -> int:
    """The newest complete checkpoint's step (0 if none)."""
    steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
    return max(steps, default=0)


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the trainer and any grain workers it left)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(entry.name))
            except (OSError, ProcessLookupError):
                pass
    return pids


def kill_at_random(
    workdir: Path,
    flags: list[str],
    log: Path,
    rng: random.Random,
    target: int | None,
    ready: float,
    window: float,
) -> tuple[bool, str, int]:
    """Start (or resume) the run and SIGKILL it at a random moment.

    ``target`` None kills during start-up (imports, data preparation, restore); otherwise
    the kill lands a random ``0..window`` seconds after the run has a checkpoint at step
    ``target`` or later. Returns ``(killed, where, orphans)``: whether the kill landed before
    the run ended, where it landed, and how many of its processes outlived it (10 s grace).
    """
    started = time.time()
    proc = start(workdir, flags, log)
    checkpoints = workdir / "checkpoints"
    if target is None:
        time.sleep(rng.uniform(0.0, ready))
    else:
        if not wait_for(proc, log, READY):
            return False, f"exited with {proc.returncode} before the kill", 0
        while latest_checkpoint(checkpoints) < target and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, window))
    if proc.poll() is not None:
        return False, f"exited with {proc.returncode} before the kill", 0
    size = log.stat().st_size
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    phase = where(log.read_bytes()[size:].decode(errors="replace"), checkpoints, started)
    deadline = time.monotonic() + 10.0
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = session_processes(proc.pid)
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    return True, phase, len(orphans)


def metric_rows_raw(workdir: Path) -> list[dict]:
    """The rows of ``workdir``'s metrics.jsonl as written."""
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]


def metric_rows(workdir: Path) -> list[dict]:
    """The rows of ``workdir``'s metrics.jsonl without their timings."""
    return [without_timings(r) for r in metric_rows_raw(workdir)]


def same_parameters(a: Path, b: Path) -> tuple[bool, int]:
    """Whether every parameter and BatchNorm leaf of runs ``a`` and ``b`` is bit-identical."""
    import jax

    from springfield.runtime import setup_runtime
    from springfield.trained_run import load_run

    setup_runtime()

    ta, tb = load_run(a), load_run(b)
    leaves_a = jax.tree.leaves((ta.params, ta.rest))
    leaves_b = jax.tree.leaves((tb.params, tb.rest))
    same = len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )
    return same and ta.step == tb.step, len(leaves_a)


def kill_plan(
    rng: random.Random, kills: int, straight: Path, flags: list[str], train_s: float, ready: float
) -> list[tuple[int | None, float]]:
    """``(target step, window in seconds)`` for each kill, in the order of the run.

    About one kill in seven lands during start-up (target None); one in four just before an
    epoch's end, to catch its last steps, its evaluation and its checkpoint save; the rest
    anywhere, up to two checkpoint intervals after a random step. Sorted by target, so that
    the kills spread over the whole run, the final evaluation included.
    """
    total_steps = latest_checkpoint(straight / "checkpoints")
    epoch_ends = [r["step"] for r in metric_rows(straight)]
    every = _flag(flags, "--checkpoint-every", 0) or epoch_ends[0]
    step_s = train_s / max(total_steps, 1)
    plan: list[tuple[int, int | None, float]] = []  # (order, target, window)
    for _ in range(kills):
        mode = rng.random()
        if mode < 0.15:  # restarted from wherever the run got to by then
            plan.append((rng.randint(0, total_steps), None, ready))
        elif mode < 0.40:
            end = rng.choice(epoch_ends)
            before = max((s for s in range(1, end) if s % every == 0), default=0)
            plan.append((before, before, step_s * (end - before + 3)))
        else:
            target = rng.randint(0, total_steps)
            plan.append((target, target, 2 * every * step_s))
    return [(target, window) for _, target, window in sorted(plan, key=lambda p: p[0])]


def _flag(flags: list[str], name: str, default: int) -> int:
    """The last value given for ``name`` in ``flags``."""
    values = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name]
    return int(values[-1]) if values else default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="how many times to SIGKILL the run")
    parser.add_argument("--seed", type=int, default=0, help="seed for the kill moments")
    parser.add_argument("--out", type=Path, default=None, help="keep both runs in this folder")
    args, train_flags = parser.parse_known_args()
    flags = DEFAULT_TRAIN_FLAGS + train_flags
    out = args.out or Path(tempfile.mkdtemp(prefix="springfield-faults-"))
    out.mkdir(parents=True, exist_ok=True)
    straight, faulted, logs = out / "straight", out / "faulted", out / "logs"
    for d in (straight, faulted, logs):
        shutil.rmtree(d, ignore_errors=True)
    logs.mkdir()
    print(f"springfield train {' '.join(flags)}", flush=True)

    t0 = time.monotonic()
    proc = start(straight, flags, logs / "straight.log")
    wait_for(proc, logs / "straight.log", READY)
    ready = time.monotonic() - t0
    if proc.wait() != 0:
        print((logs / "straight.log").read_text()[-3000:])
        print(f"survived 0/{args.kills} kills; final parameters identical: no")
        return 1
    total = time.monotonic() - t0
    total_steps = latest_checkpoint(straight / "checkpoints")
    print(
        f"uninterrupted run: {total:.1f} s, {total_steps} steps (ready after {ready:.1f} s)",
        flush=True,
    )

    rng = random.Random(args.seed)
    plan = kill_plan(rng, args.kills, straight, flags, total - ready, ready)
    kills = orphans = failures = attempt = 0
    for aim, window in plan:
        for tries in range(4):
            attempt += 1
            log = logs / f"attempt-{attempt:02d}.log"
            # The run may end before the kill (a kill aimed at its very end): aim again,
            # sooner, then at start-up, which always lands.
            killed, phase, left = kill_at_random(
                faulted, flags, log, rng, aim if tries < 3 else None, ready, window / 2**tries
            )
            orphans += left
            if killed:
                break
            if "exited with 0" not in phase:
                failures += 1
                print(f"  restart failed, the run {phase}; see {log}", flush=True)
        kills += killed
        step = latest_checkpoint(faulted / "checkpoints")
        print(
            f"  kill {kills:>2}: after step {step:>3}, during {phase}"
            + (f" ({left} processes left behind)" if left else ""),
            flush=True,
        )
    final_log = logs / "final.log"
    done = start(faulted, flags, final_log).wait()
    final_text = final_log.read_text(errors="replace")
    # Each restart after a kill resumed (or, killed before any checkpoint, started again)
    # and the last one finished: then every kill was survived.
    survived = max(0, kills - failures) if done == 0 else 0
    if done != 0:
        print(final_text[-3000:])

    same, n_leaves = same_parameters(straight, faulted) if done == 0 else (False, 0)
    same_eval = done == 0 and without_timings(
        json.loads((straight / "eval.json").read_text())
    ) == without_timings(json.loads((faulted / "eval.json").read_text()))
    rows_a, rows_b = metric_rows(straight), metric_rows(faulted) if done == 0 else []
    timings_left_out = sorted(
        {k for r in metric_rows_raw(straight) for k in r if TIMING_KEY.search(k)}
    )
    epochs = [r["epoch"] for r in rows_b]
    print(f"final run: exit {done}; {'resumed' if 'Resuming' in final_text else 'started fresh'}")
    print(f"orphaned worker processes after kills: {orphans}")
    print(
        f"metrics.jsonl epochs {epochs}; rows identical (timings aside: "
        f"{', '.join(timings_left_out)}): {rows_a == rows_b}"
    )
    print(f"eval.json identical: {same_eval}; {n_leaves} parameter/statistics leaves compared")
    print(f"runs in {out}")
    print(
        f"survived {survived}/{args.kills} kills; final parameters identical: "
        f"{'yes' if same and same_eval and rows_a == rows_b else 'no'}"
    )
    return 0 if survived == args.kills and same else 1


if __name__ == "__main__":
    sys.exit(main())
