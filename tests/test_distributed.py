"""Data parallelism over virtual CPU devices and over two real processes on 127.0.0.1.

The device count and ``jax.distributed`` must be set before JAX starts, so those parts run
in fresh Python processes: this file is also their entry point (``python test_distributed.py
WORKER ...``), and the assertions stay here in the test process, which holds the
single-device reference.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

FAST = ["--image-size", "32", "32", "--workers", "0", "--no-tensorboard", "--no-report"]
SIZE = (32, 32)
GLOBAL_BATCH = 8
STEPS = 3
# Bounds a wait on a child process that is stuck, so a broken build fails instead of hanging.
CHILD_LIMIT_S = 300


# -- worker side (fresh processes) -------------------------------------------------------


def _splits(data: Path):
    from springfield.data.prepare import prepare_splits

    return prepare_splits(data, image_size=SIZE, val_fraction=0.2, seed=0)


def _grad_probe():
    """An optimizer that applies nothing and keeps the last gradient as its state, so a
    step's gradient can be read back from the train state exactly as the step computed it."""
    import jax
    import jax.numpy as jnp
    import optax

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        return jax.tree.map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(init, update)


def _sgd():
    import optax

    from springfield.training.optim import make_optimizer

    return make_optimizer("sgd", optax.constant_schedule(0.1), weight_decay=5e-4)


def _leaves(tree) -> list[np.ndarray]:
    # This process's own copy of each (replicated) leaf.
    import jax

    return [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(tree)]


def worker_devices(data: str, workdir: str, out: str) -> None:
    """4 virtual devices: the CLI's batch-size check, then one step on 1 and on 4 devices."""
    from springfield.cli import main

    status = main(
        [
            "train",
            "--data",
            data,
            "--workdir",
            workdir,
            "--cpu-devices",
            "4",
            "--batch-size",
            "10",
            *FAST,
        ]
    )
    import jax
    from jax.sharding import Mesh

    from springfield import parallel
    from springfield.data.pipeline import to_iterator, train_dataset
    from springfield.models import build_model
    from springfield.training.steps import init_state, make_train_step

    train, _ = _splits(Path(data))
    batch = next(
        to_iterator(
            train_dataset(
                train.npy, train.labels, batch_size=GLOBAL_BATCH, epochs=1, seed=0, augment="light"
            ),
            workers=0,
        )
    )
    tx = _grad_probe()
    graphdef, state = init_state(build_model("resnet", 4, image_size=SIZE), tx)
    # Plain, and with MixStyle in every batch (its partners are drawn over the global batch).
    steps = {"": make_train_step(graphdef, tx), "ms": make_train_step(graphdef, tx, mixstyle=1.0)}
    key = jax.random.key(0)
    result: dict[str, np.ndarray] = {"status": np.int32(status)}
    for name, mesh in (("one", Mesh(jax.devices()[:1], ("data",))), ("four", parallel.make_mesh())):
        sharded = parallel.shard_batch(batch, mesh)
        result[f"{name}_devices"] = np.int32(len(sharded["image"].sharding.device_set))
        for tag, step in steps.items():
            # The step donates its state; on one device, replicate may hand back the same
            # buffers, so each step gets a copy.
            fresh = jax.tree.map(lambda x: x.copy(), state)
            new, metrics = step(parallel.replicate(fresh, mesh), sharded, key)
            result[f"{name}_{tag}loss"] = np.asarray(metrics["loss_sum"])
            for i, g in enumerate(jax.tree.leaves(new.opt_state)):
                result[f"{name}_{tag}grad{i}"] = np.asarray(g)
            for i, r in enumerate(jax.tree.leaves(new.rest)):
                result[f"{name}_{tag}rest{i}"] = np.asarray(r)
    np.savez(out, **result)


def worker_process(data: str, port: str, process_id: str, out: str) -> None:
    """One of two processes: STEPS SGD steps on its shard, then the exact evaluation."""
    import jax

    from springfield import parallel
    from springfield.data.pipeline import to_iterator, train_dataset
    from springfield.models import build_model
    from springfield.training.loop import run_eval
    from springfield.training.steps import init_state, make_eval_step, make_train_step

    parallel.setup(
        cpu_devices=None,
        distributed=True,
        coordinator=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=int(process_id),
        workdir=Path(out).parent,
        timeout=60,
    )
    mesh = parallel.make_mesh()
    local = parallel.local_batch_size(GLOBAL_BATCH, mesh)
    train, val = _splits(Path(data))
    ds = train_dataset(
        train.npy,
        train.labels,
        batch_size=local,
        epochs=1,
        seed=0,
        augment="light",
        shard_index=jax.process_index(),
        shard_count=2,
    )
    batches = to_iterator(ds, workers=0)
    tx = _sgd()
    graphdef, state = init_state(build_model("resnet", 4, image_size=SIZE), tx)
    state = parallel.replicate(state, mesh)
    step = make_train_step(graphdef, tx)
    key = jax.random.key(0)
    result: dict[str, np.ndarray] = {"processes": np.int32(jax.process_count())}
    for t in range(STEPS):
        batch = next(batches)
        state, metrics = step(state, parallel.shard_batch(batch, mesh), key)
        result[f"loss{t}"] = np.float32(metrics["loss_sum"]) / np.float32(metrics["count"])
        for k, v in batch.items():
            result[f"{k}{t}"] = v
    for i, p in enumerate(_leaves(state.params)):
        result[f"param{i}"] = p
    rows, labels, probs, losses = run_eval(
        make_eval_step(graphdef), state.params, state.rest, val, GLOBAL_BATCH, mesh
    )
    result.update(eval_rows=rows, eval_labels=labels, eval_probs=probs, eval_losses=losses)
    np.savez(out, **result)


# -- test side ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(*args: str) -> list[str]:
    return [sys.executable, __file__, *args]


@pytest.fixture
def spawn(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """``spawn(cmd)`` starts a child process, its output going to files (a pipe that fills
    up would block a process that its peer waits for)."""
    env = {
        **os.environ,
        # CPU even on a GPU machine: virtual devices and gloo collectives are what is tested.
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        # Children share compiled programs, so a restarted run does not compile them again.
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    count = itertools.count()

    def start(cmd: list[str]) -> subprocess.Popen:
        n = next(count)
        with open(logs / f"{n}.out", "w") as out, open(logs / f"{n}.err", "w") as err:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        proc.logs = (logs / f"{n}.out", logs / f"{n}.err")
        return proc

    return start


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """``(status, stdout, stderr)`` of each process once all have exited."""
    deadline = time.monotonic() + CHILD_LIMIT_S
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a child process did not finish within {CHILD_LIMIT_S} s")
    return [(p.returncode, p.logs[0].read_text(), p.logs[1].read_text()) for p in procs]


def test_four_devices_give_the_one_device_loss_and_gradients_with_and_without_mixstyle(
    tiny_folder, tmp_path, spawn
):
    out = tmp_path / "devices.npz"
    [(status, _, err)] = _finish(
        [spawn(_worker("devices", str(tiny_folder), str(tmp_path / "w"), str(out)))]
    )
    assert status == 0, err
    r = np.load(out)
    # The CLI refused a global batch that 4 devices cannot share, naming the flag and a fix.
    assert int(r["status"]) == 2
    message = " ".join(err.split())
    assert "--batch-size 10" in message and "multiple of 4" in message and "8 or 12" in message
    assert int(r["one_devices"]) == 1 and int(r["four_devices"]) == 4
    np.testing.assert_allclose(r["four_loss"], r["one_loss"], rtol=1e-5)
    np.testing.assert_allclose(r["four_msloss"], r["one_msloss"], rtol=1e-5)
    assert abs(float(r["one_msloss"]) - float(r["one_loss"])) > 1e-4
    grads = sorted(k for k in r.files if k.startswith(("one_grad", "one_msgrad")))
    rests = sorted(k for k in r.files if k.startswith(("one_rest", "one_msrest")))
    assert len(grads) > 20 and len(rests) > 20
    for k in grads + rests:
        # Gradients and BatchNorm statistics over the global batch, not per device.
        np.testing.assert_allclose(r["four" + k[3:]], r[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_two_processes_match_one_process_on_the_same_global_batches(tiny_folder, tmp_path, spawn):
    import jax

    from springfield.models import build_model
    from springfield.training.loop import run_eval
    from springfield.training.steps import init_state, make_eval_step, make_train_step

    port = str(_free_port())
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    procs = [
        spawn(_worker("process", str(tiny_folder), port, str(i), str(outs[i]))) for i in (0, 1)
    ]
    for status, _, err in _finish(procs):
        assert status == 0, err
    p0, p1 = (np.load(o) for o in outs)
    assert int(p0["processes"]) == 2 and int(p1["processes"]) == 2
    params = sorted((k for k in p0.files if k.startswith("param")), key=lambda k: int(k[5:]))
    for k in params:
        # Replicated parameters stay identical, bit for bit, on both processes.
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)

    # The reference: one process, one device, fed the global batches the two processes
    # assembled (process 0's half, then process 1's), from the same initialisation.
    tx = _sgd()
    graphdef, state = init_state(build_model("resnet", 4, image_size=SIZE), tx)
    step = make_train_step(graphdef, tx)
    for t in range(STEPS):
        # Each process read only its own shard: rows i::2 of the training images.
        assert np.all(p0[f"index{t}"] % 2 == 0) and np.all(p1[f"index{t}"] % 2 == 1)
        batch = {
            k: np.concatenate([p0[f"{k}{t}"], p1[f"{k}{t}"]]) for k in ("image", "label", "mask")
        }
        state, metrics = step(state, batch, jax.random.key(0))
        loss = float(metrics["loss_sum"]) / float(metrics["count"])
        assert float(p0[f"loss{t}"]) == pytest.approx(loss, rel=1e-5)
        assert float(p1[f"loss{t}"]) == pytest.approx(loss, rel=1e-5)
    reference = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    assert len(reference) == len(params)
    for k, ref in zip(params, reference, strict=True):
        np.testing.assert_allclose(p0[k], ref, rtol=1e-4, atol=1e-5, err_msg=k)

    # Exact evaluation over both processes: 12 images, a global batch of 8 (padded to 16,
    # 8 per process), every image once, in order, as one process computes them.
    _, val = _splits(tiny_folder)
    assert len(val.index) == 12
    rows, labels, probs, losses = run_eval(
        make_eval_step(graphdef), state.params, state.rest, val, GLOBAL_BATCH
    )
    for p in (p0, p1):
        np.testing.assert_array_equal(p["eval_rows"], np.arange(12))
        np.testing.assert_array_equal(p["eval_labels"], labels)
        np.testing.assert_allclose(p["eval_probs"], probs, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(p["eval_losses"], losses, rtol=1e-4, atol=1e-5)


# A run of 3 epochs x 5 steps, checkpointed after each epoch; refcnn compiles fastest.
RUN = ["--epochs", "3", "--batch-size", str(GLOBAL_BATCH), "--model", "refcnn", *FAST]


def _train_cmd(data: Path, workdir: Path, port: int, process_id: int) -> list[str]:
    distributed = f"--distributed --coordinator 127.0.0.1:{port} --num-processes 2"
    return [
        *(sys.executable, "-m", "springfield.cli", "train"),
        *("--data", str(data), "--workdir", str(workdir), *RUN),
        *distributed.split(),
        *("--process-id", str(process_id), "--distributed-timeout", "20"),
    ]


def test_killing_one_process_stops_the_other_and_both_resume(tiny_folder, tmp_path, capsys, spawn):
    from springfield.cli import main

    run = tmp_path / "run"
    port = _free_port()
    procs = [spawn(_train_cmd(tiny_folder, run, port, i)) for i in (0, 1)]
    deadline = time.monotonic() + CHILD_LIMIT_S
    while time.monotonic() < deadline and not (run / "checkpoints" / "5").exists():
        time.sleep(0.05)
    if not (run / "checkpoints" / "5").exists():
        # Seen once in ~15 runs, cause unknown. Not reproduced since: the same two-process
        # training (3 epochs, refcnn, --distributed-timeout 20) ran 71 times in a loop with a
        # py-spy dump armed for a hang after 240 s, the last 50 in a row in 21.5 min on the
        # 2-core AMD EPYC machine under a load of ~8 (issue 39). Keep what both processes said.
        for p in procs:
            p.kill()
            p.wait()
        said = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for p in procs for f in p.logs)
        pytest.fail(f"no checkpoint 5 within {CHILD_LIMIT_S} s; the processes said:\n{said}")
    procs[1].send_signal(signal.SIGKILL)
    (status0, _, err0), (status1, _, _) = _finish(procs)
    assert status1 == -signal.SIGKILL
    # The survivor stops with one clear message, not a hang or a C++ abort.
    assert status0 == 2, err0
    message = " ".join(err0.split())
    assert "process 0 of 2 lost contact with the others" in message
    assert "Run the same command on every process again to resume" in message
    assert not (run / "eval.json").exists(), "the run finished before it was killed"

    port = _free_port()
    (s0, _, e0), (s1, _, e1) = _finish(
        [spawn(_train_cmd(tiny_folder, run, port, i)) for i in (0, 1)]
    )
    assert s0 == 0 and s1 == 0, e0 + e1
    assert "Resuming" in e0 and "Resuming" not in e1  # only process 0 reports
    rows = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]
    final = json.loads((run / "eval.json").read_text())
    assert final["num_images"] == 12 and sum(map(sum, final["confusion"])) == 12

    # One process evaluating the same checkpoint agrees with the two-process evaluation.
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--batch-size", "5"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["confusion"] == final["confusion"]
    assert single["loss"] == pytest.approx(final["loss"], rel=1e-5)

    # Resuming with another process count is refused: shards and iterator states differ.
    assert main(["train", "--data", str(tiny_folder), "--workdir", str(run), *RUN]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "--num-processes 2 (run) vs 1 (now)" in message


def test_processes_started_with_different_settings_are_refused(tiny_folder, tmp_path, spawn):
    port = _free_port()
    cmds = [_train_cmd(tiny_folder, tmp_path / "run", port, i) for i in (0, 1)]
    cmds[1] += ["--lr", "0.1"]
    for status, _, err in _finish([spawn(cmd) for cmd in cmds]):
        assert status == 2, err
        message = " ".join(err.split())
        assert "the processes disagree on the settings" in message, message
        assert "process(es) 1" in message


def test_flag_mistakes_are_refused_before_anything_starts(tiny_folder, tmp_path, capsys):
    import jax

    from springfield.cli import main

    jax.devices()  # this test process's backend runs, as it does after any other test
    base = ["train", "--data", str(tiny_folder), *FAST]
    cases = {
        ("--process-id", "1"): "--process-id: only used by multi-process runs; add --distributed",
        ("--distributed",): "--distributed needs --workdir",
        ("--cpu-devices", "4", "--workdir", str(tmp_path / "w")): (
            "--cpu-devices 4: JAX has already started in this process with 1 device(s)"
        ),
        ("--cpu-devices", "0", "--workdir", str(tmp_path / "w")): "--cpu-devices 0: must be",
    }
    for extra, expected in cases.items():
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        assert expected in " ".join(captured.err.split()), extra
    assert not (tmp_path / "w").exists()


def test_processes_decoding_the_same_split_at_once_share_one_good_cache(tiny_folder, tmp_path):
    from springfield.data.cache import decode_index
    from springfield.data.index import scan_folder

    index = scan_folder(tiny_folder)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: decode_index(index, SIZE, cache_dir=cache), range(4)))
    reference, _ = decode_index(index, SIZE, cache_dir=tmp_path / "alone")
    assert len({str(npy) for npy, _ in results}) == 1
    np.testing.assert_array_equal(np.load(results[0][0]), np.load(reference))
    assert all(kept.paths == index.paths for _, kept in results)
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy"]


WORKERS = {"devices": worker_devices, "process": worker_process}

if __name__ == "__main__":
    from springfield.runtime import setup_runtime

    setup_runtime()
    WORKERS[sys.argv[1]](*sys.argv[2:])
