"""Faults during training: kills, Ctrl-C, a full disk, NaN losses, mismatched resumes, and
run folders that try to run code. Each ends with a clear message, nothing half-written, and a
resumed run that is bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from springfield.cli import main
from springfield.paths import cache_root
from springfield.trained_run import load_run

FAST = [
    "--image-size",
    "32",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--no-tensorboard",
    "--no-report",
]
EPOCHS = 3  # 44 training images / batch 8 = 5 steps per epoch, 15 steps in all
TIMING_KEYS = {"train_img_s", "epoch_seconds", "input_wait_fraction", "first_step_seconds"}
# Bounds every wait on a child, so that a broken build fails instead of hanging.
CHILD_LIMIT_S = 300


def _child_env() -> dict[str, str]:
    # At call time: the private cache (conftest) is set per test. Wide console: messages are
    # checked as printed, without wrapping.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "1000"}


def _train_args(data: Path, workdir: Path, *extra: str) -> list[str]:
    """``springfield train`` arguments; flags in ``extra`` override FAST's."""
    return [
        "train",
        "--data",
        str(data),
        "--workdir",
        str(workdir),
        "--epochs",
        str(EPOCHS),
        *FAST,
        *extra,
    ]


def _cmd(data: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "springfield.cli", *_train_args(data, workdir, *extra)]


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    # Without whitespace: the console wraps long lines at any "/" of a path.
    return "".join(captured.err.split())


def _squash(text: str) -> str:
    return "".join(text.split())


def _rows(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]


def checkpoint_steps(workdir: Path) -> list[int]:
    """Steps with a complete checkpoint (a save in progress has a suffixed folder name)."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _leaves(workdir: Path) -> list[np.ndarray]:
    run = load_run(workdir)
    return [np.asarray(x) for x in jax.tree.leaves((run.params, run.rest))]


def assert_same_run(expected: Path, actual: Path) -> None:
    """Bit-identical parameters and BatchNorm statistics, same eval.json, same metrics rows
    (timings aside), every epoch exactly once."""
    a, b = _leaves(expected), _leaves(actual)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert json.loads((expected / "eval.json").read_text()) == json.loads(
        (actual / "eval.json").read_text()
    )
    assert [r["epoch"] for r in _rows(actual)] == list(range(1, EPOCHS + 1))
    assert _rows(expected) == _rows(actual)


def _wait_until(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + CHILD_LIMIT_S
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {CHILD_LIMIT_S} s"
        time.sleep(0.005)


def _session_processes(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        pids.append(int(entry.name))
            except (OSError, ProcessLookupError):
                pass
    return pids


@pytest.fixture(scope="module")
def straight(tiny_folder, tmp_path_factory) -> Path:
    """The uninterrupted run every faulted run must reproduce exactly. Checkpoints every 2
    steps change nothing in the result; they leave a mid-epoch checkpoint (14) behind."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    assert main(_train_args(tiny_folder, workdir, "--checkpoint-every", "2")) == 0
    return workdir


def test_ctrl_c_with_worker_processes_saves_a_checkpoint_and_resumes_exactly(
    tiny_folder, tmp_path, straight
):
    workdir = tmp_path / "run"
    cmd = _cmd(tiny_folder, workdir, "--workers", "1")
    proc = subprocess.Popen(
        cmd,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_until((workdir / "checkpoints" / "5").is_dir, proc, "the first epoch's checkpoint")
    # As Ctrl-C in a terminal does: SIGINT to the trainer and its grain workers alike.
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=CHILD_LIMIT_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    m = re.search(r"stopped: SIGINT at step (\d+)/15; a checkpoint of step \1 is saved", err)
    assert m, err
    step = int(m.group(1))
    assert 5 <= step < 15
    assert "To resume, run the same command again" in err
    assert (workdir / "checkpoints" / str(step)).is_dir()
    assert not list((workdir / "checkpoints").glob("*tmp*")), "a save was left unfinished"
    deadline = time.monotonic() + 10
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session_processes(proc.pid) == [], "worker processes outlived the trainer"

    done = subprocess.run(
        cmd, env=_child_env(), capture_output=True, text=True, timeout=CHILD_LIMIT_S
    )
    assert done.returncode == 0, done.stderr
    assert f"Resuming {workdir} at step {step}/15." in done.stderr
    assert_same_run(straight, workdir)


def test_a_second_run_takes_its_compiled_programs_from_the_cache_and_is_identical(
    tiny_folder, tmp_path, straight
):
    env = {**_child_env(), "SPRINGFIELD_CACHE": str(tmp_path / "cache")}
    xla = tmp_path / "cache" / "xla"
    # The oneDNN kernels `straight` built (30 s on 2 cores): this test is about XLA's cache.
    if (cache_root() / "kernels").is_dir():
        shutil.copytree(cache_root() / "kernels", tmp_path / "cache" / "kernels")

    def train(workdir: Path, extra_env: dict[str, str]) -> str:
        cmd = _cmd(tiny_folder, workdir, "--checkpoint-every", "2")
        done = subprocess.run(
            cmd, env={**env, **extra_env}, capture_output=True, text=True, timeout=CHILD_LIMIT_S
        )
        assert done.returncode == 0, done.stderr
        assert "Error reading persistent compilation cache" not in done.stderr
        assert "Error writing persistent compilation cache" not in done.stderr
        return done.stderr

    train(tmp_path / "first", {})
    entries = {p.name: p.stat().st_mtime_ns for p in xla.glob("*-cache")}
    assert any(name.startswith("jit_train_step") for name in entries), entries
    assert any(name.startswith("jit_eval_step") for name in entries), entries
    # JAX logs each cache hit at debug level: the second run says which programs it read.
    err = train(tmp_path / "second", {"JAX_DEBUG_LOG_MODULES": "jax._src.compiler"})
    hits = re.findall(r"Persistent compilation cache hit for '(\w+)'", err)
    assert "jit_train_step" in hits and "jit_eval_step" in hits, err[-3000:]
    # The steps were not compiled again. Which millisecond eager operations cross the
    # cache's compile-time bar depends on the machine's speed, so new entries for them are
    # allowed; nothing written by the first run is replaced.
    after = {p.name: p.stat().st_mtime_ns for p in xla.glob("*-cache")}
    assert {n: after.get(n) for n in entries} == entries
    new = [n for n in after if n not in entries]
    assert not [n for n in new if n.startswith(("jit_train_step", "jit_eval_step"))], new
    # ...and computes what the compiler's fresh programs computed, to the bit.
    assert_same_run(straight, tmp_path / "first")
    assert_same_run(straight, tmp_path / "second")


def test_sigkill_during_an_async_checkpoint_save_then_resume_is_bit_identical(
    tiny_folder, tmp_path, straight
):
    workdir = tmp_path / "run"
    cmd = _cmd(tiny_folder, workdir, "--checkpoint-every", "1")
    checkpoints = workdir / "checkpoints"
    proc = subprocess.Popen(
        cmd, env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def saving_mid_epoch() -> bool:
        # orbax writes step N into "N.orbax-checkpoint-tmp..." and renames it when complete.
        saving = [p.name.split(".")[0] for p in checkpoints.glob("*.orbax-checkpoint-tmp*")]
        return any(s in ("7", "8", "9", "12", "13", "14") for s in saving)

    _wait_until(saving_mid_epoch, proc, "a checkpoint save in the second or third epoch")
    proc.kill()
    proc.wait()
    complete = checkpoint_steps(workdir)
    assert complete and complete[-1] >= 6
    done = subprocess.run(
        cmd, env=_child_env(), capture_output=True, text=True, timeout=CHILD_LIMIT_S
    )
    assert done.returncode == 0, done.stderr
    assert f"Resuming {workdir} at step {complete[-1]}/15." in done.stderr
    assert_same_run(straight, workdir)


def test_resume_from_a_mid_epoch_checkpoint_rebuilds_metrics_exactly_once(
    tiny_folder, tmp_path, straight, capsys
):
    # The state a kill leaves behind: checkpoint 14 (mid-epoch 3) is the latest complete one,
    # metrics.jsonl lacks a row whose checkpoint completed and has one whose did not.
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    shutil.rmtree(workdir / "checkpoints" / "15")
    (workdir / "eval.json").unlink()
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    (workdir / "metrics.jsonl").write_text(rows[0] + "\n" + rows[2] + "\n")
    capsys.readouterr()
    assert main(_train_args(tiny_folder, workdir)) == 0
    assert f"Resuming {workdir} at step 14/15." in " ".join(capsys.readouterr().err.split())
    assert_same_run(straight, workdir)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_folder, tmp_path, capsys
):
    workdir = tmp_path / "run"
    blow_up = ["--optimizer", "sgd", "--lr", "1e6", "--schedule", "constant"]
    msg = _error(capsys, _train_args(tiny_folder, workdir, *blow_up, "--checkpoint-every", "2"))
    # Either the loss of step N is NaN/inf, or update N (from a finite loss) overflowed.
    m = re.search(
        r"(?:thetraininglossbecame(?:-?inf|nan)atstep|themodel'sparametersbecameNaNor"
        r"infiniteinstep)(\d+);trainingstoppedanditslastgoodcheckpoint\(step(\d+)\)iskeptin",
        msg,
    )
    assert m, msg
    bad, kept = int(m.group(1)), int(m.group(2))
    # Saves come every 2 steps and at epoch ends (every 5), each of a checked, finite state.
    assert kept == max(s for s in range(1, bad) if s % 2 == 0 or s % 5 == 0)
    assert "Lower--lr(now1e+06)" in msg and "--skip-nonfinite" in msg
    assert checkpoint_steps(workdir)[-1] == kept
    assert all(np.all(np.isfinite(x)) for x in _leaves(workdir))
    assert not (workdir / "eval.json").exists()


def test_skip_nonfinite_skips_bad_updates_and_finishes_with_a_finite_model(
    tiny_folder, tmp_path, capsys
):
    workdir = tmp_path / "run"
    blow_up = ["--optimizer", "sgd", "--lr", "1e6", "--schedule", "constant"]
    assert main(_train_args(tiny_folder, workdir, *blow_up, "--skip-nonfinite")) == 0
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_updates"] > 0
    assert "non-finite update(s)" in capsys.readouterr().err
    # The skipped steps' BatchNorm statistics are not applied either.
    assert all(np.all(np.isfinite(x)) for x in _leaves(workdir))


# The child sets a file-size limit on itself before training: the checkpoint's data file
# (3 MB) then fails to write with the same kind of OS error as a full disk, without root or
# a tmpfs, so this runs in CI too. (Set in the child, not with preexec_fn: forking a process
# that runs JAX's threads is unsafe.)
SMALL_FILES_ONLY = (
    "import resource, runpy, sys\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
    "sys.argv[0] = 'springfield'\n"
    "runpy.run_module('springfield.cli', run_name='__main__')\n"
)


def test_full_disk_stops_with_a_clear_message_and_keeps_the_checkpoints(
    tiny_folder, tmp_path, straight
):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)  # as if killed after checkpoint 14
    shutil.rmtree(workdir / "checkpoints" / "15")
    (workdir / "eval.json").unlink()
    before = _leaves(workdir)
    cmd = _cmd(tiny_folder, workdir)
    full = subprocess.run(
        [sys.executable, "-c", SMALL_FILES_ONLY, *cmd[3:]],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=CHILD_LIMIT_S,
    )
    assert full.returncode == 2, full.stderr
    # orbax and tensorstore log the failed write from their own threads (noise we cannot
    # turn off, and which may share a line with ours); springfield's own code raises no
    # traceback and says what happened, once.
    assert not re.search(r'File "[^"]*/springfield/', full.stderr), full.stderr
    message = (
        f"error: cannot write a checkpoint to {workdir / 'checkpoints'} (File too large); "
        "the complete checkpoints (steps 14) are intact. Free disk space (or make the folder "
        "writable) and run the same command again to resume."
    )
    assert full.stderr.count(message) == 1, full.stderr[-3000:]
    # Checkpoint 14 is untouched (and, as the other tests show, resuming from an intact
    # checkpoint ends with the uninterrupted run's result).
    assert checkpoint_steps(workdir) == [14]
    assert all(np.array_equal(x, y) for x, y in zip(before, _leaves(workdir), strict=True))


def test_unwritable_workdir_is_refused_before_training(tiny_folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    msg = _error(capsys, _train_args(tiny_folder, blocker / "run"))
    assert _squash(f"--workdir {blocker / 'run'}: cannot write there (Not a directory)") in msg


def test_resuming_with_other_settings_says_what_differs(tiny_folder, tmp_path, straight, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    cases = {
        ("--model", "refcnn"): "--modelresnet(run)vsrefcnn(now)",
        ("--image-size", "40", "40"): "--image-size[32,32](run)vs[40,40](now)",
        ("--workers", "1"): "--workers0(run)vs1(now)",
    }
    for extra, diff in cases.items():
        msg = _error(capsys, _train_args(tiny_folder, workdir, *extra))
        assert "holdsarunwithothersettings" in msg and diff in msg, (extra, msg)
    # Another class set: the run's folder, with one class replaced.
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "homer_simpson").rename(data / "ned_flanders")
    config = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps({**config, "data": str(data)}))
    msg = _error(capsys, _train_args(data, workdir))
    assert "classes['bart_simpson','homer_simpson','lisa_simpson','marge_simpson'](run)vs" in msg
    assert "'ned_flanders'](now)" in msg and "--data" not in msg.split("othersettings:")[1]
    # Nothing was changed by the refusals.
    assert json.loads((workdir / "config.json").read_text())["model"] == "resnet"


@pytest.mark.parametrize(
    "file, change, diff",
    [
        ("config.json", {"model": "refcnn"}, "modelresnet(checkpoint)vsrefcnn"),
        ("config.json", {"image_size": [40, 40]}, "image_size[32,32](checkpoint)vs[40,40]"),
        ("classes.json", None, "'homer_simpson','lisa_simpson','marge_simpson'](checkpoint)vs"),
    ],
)
def test_evaluating_a_run_whose_files_disagree_with_its_checkpoint_is_refused(
    straight, tmp_path, capsys, file, change, diff
):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    if file == "classes.json":
        new = ["bart_simpson", "ned_flanders", "lisa_simpson", "marge_simpson"]
    else:
        new = {**json.loads((run / file).read_text()), **change}
    (run / file).write_text(json.dumps(new))
    msg = _error(capsys, ["eval", str(run)])
    assert "doesnotmatchtherun'sconfig.json/classes.json" in msg and diff in msg, msg


EVIL_MODULE = """
from pathlib import Path
Path(__file__).with_name("imported").write_text("the run folder ran this code")
import jax
act = jax.nn.relu
"""


def test_a_custom_activation_is_imported_only_with_allow_import(
    straight, tmp_path, capsys, monkeypatch
):
    # A run folder that names a module: loading it must not import (run) that module.
    (tmp_path / "evil_act.py").write_text(EVIL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evil_act", raising=False)
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "activation": "evil_act:act"}))
    for command in (["eval", str(run)], ["predict", str(run), str(tmp_path)], ["report", str(run)]):
        msg = _error(capsys, command)
        assert "usesthecustomactivation'evil_act:act'" in msg and "--allow-import" in msg
    assert not (tmp_path / "imported").exists() and "evil_act" not in sys.modules
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--allow-import"]) == 0
    assert (tmp_path / "imported").exists()
    assert json.loads(capsys.readouterr().out)["num_images"] == 12


def test_loading_and_resuming_a_run_never_unpickles(straight, tiny_folder, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    assert all(np.all(np.isfinite(x)) for x in _leaves(run))
    (run / "eval.json").unlink()
    assert main(_train_args(tiny_folder, run)) == 0  # resumes at the last step: final eval
    assert (run / "eval.json").exists()
