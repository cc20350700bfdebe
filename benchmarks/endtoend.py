"""A whole training run, as a user meets it: ``springfield train`` against a plain PyTorch script.

    python benchmarks/endtoend.py --data ../shared/data/simpsons \\
        --classes bart_simpson homer_simpson lisa_simpson marge_simpson --epochs 15

Both sides train the same network (``--model``: ``resnet``, springfield's default, or
``refcnn``) on the same images, with the same epochs, batch size, input size, optimizer
(AdamW 3e-3, weight decay 5e-4, one-cycle schedule) and light augmentation, each as a fresh
process from a cold start: springfield with an empty decode cache (its oneDNN kernel, which
it compiles at its first run in an environment, already built), PyTorch with
``benchmarks/torch_train.py`` (DataLoader workers decoding every epoch, as such scripts do),
eager and ``torch.compile``, each in float32 and with bfloat16 (springfield ``--precision
bfloat16``, PyTorch ``torch.autocast``). The split is made once, scene-aware, by springfield
(``--split-by-group``'s), and written as ``train/`` and ``val/`` folders of links that both
read, so neither pays for splitting and both validate on the same images.

The table gives each run's wall time (process start to exit, springfield's report and
TensorBoard files included), the time to its first training step (imports, data, compile),
the steady-state training rate (median over epochs 2 on), the final validation accuracy, and
springfield's speed-up over the faster PyTorch mode of the same precision.

PyTorch is the ``bench`` extra only: run this with that environment's python (which also has
springfield), or name it with ``--torch-python``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from outputs import default_output

HERE = Path(__file__).resolve().parent


def write_split(data: Path, classes: list[str] | None, seed: int, out: Path) -> dict:
    """springfield's scene-aware split of ``data`` as ``out/train`` and ``out/val`` links."""
    from springfield.data.index import load_splits

    train, val = load_splits(data, val_fraction=0.2, seed=seed, only=classes, group_threshold=20.0)
    for name, index in (("train", train), ("val", val)):
        for path, label in zip(index.paths, index.labels, strict=True):
            folder = out / name / index.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / Path(path).name).symlink_to(Path(path).resolve())
    return {"classes": list(train.classes), "train": len(train.paths), "val": len(val.paths)}


def built_kernels() -> Path | None:
    """The folder of springfield's compiled oneDNN kernel (built now if it is not yet)."""
    from springfield.kernels import onednn
    from springfield.paths import cache_root

    onednn.status()
    folder = cache_root() / "kernels"
    return folder if folder.is_dir() else None


def _shared_flags(args: argparse.Namespace, split: Path) -> list[str]:
    """The flags both sides take with the same meaning, ending with ``--image-size N``."""
    return [
        "--data",
        str(split),
        "--model",
        args.model,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--image-size",
        str(args.image_size),
    ]


def run_springfield(args: argparse.Namespace, split: Path, precision: str, work: Path) -> dict:
    """One ``springfield train`` process from a cold cache; its numbers from the run folder."""
    run_dir = work / f"springfield-{args.model}-{precision}"
    cmd = [
        str(Path(args.springfield_python).parent / "springfield"),
        "train",
        *_shared_flags(args, split),
        str(args.image_size),  # springfield's --image-size takes H W
        "--precision",
        precision,
        "--workdir",
        str(run_dir),
    ]
    # An empty decode cache, but the oneDNN kernel springfield compiles once per environment
    # (at its first run ever) already built, as PyTorch's kernels come built in its wheel.
    cache = Path(tempfile.mkdtemp(prefix="e2e-cache-", dir=work))
    if args.kernels is not None:
        shutil.copytree(args.kernels, cache / "kernels")
    env = {**os.environ, "SPRINGFIELD_CACHE": str(cache)}
    wall = _timed_process(cmd, env, work / f"{run_dir.name}.log")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "eval.json").read_text())
    return {
        "side": "springfield",
        "precision": precision,
        "wall_s": wall,
        "first_step_s": rows[0].get("first_step_seconds"),
        "train_img_s": [r["train_img_s"] for r in rows],
        "val_accuracy": final["accuracy"],
        "val_n": final["num_images"],
    }


def run_torch(args: argparse.Namespace, split: Path, mode: str, bf16: bool, work: Path) -> dict:
    """One ``torch_train.py`` process; its numbers from the JSON line it ends with."""
    name = f"torch-{mode}-{'bfloat16' if bf16 else 'float32'}"
    cmd = [
        args.torch_python,
        str(HERE / "torch_train.py"),
        *_shared_flags(args, split),
        "--workers",
        str(args.torch_workers),
        *(["--compile"] if mode == "compile" else []),
        *(["--bf16"] if bf16 else []),
    ]
    # A fresh inductor cache: torch.compile compiles cold, as JAX does.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=work)}
    log = work / f"{args.model}-{name}.log"
    wall = _timed_process(cmd, env, log)
    out = json.loads(log.read_text().strip().splitlines()[-1])
    return {
        "side": f"torch-{mode}",
        "precision": "bfloat16" if bf16 else "float32",
        "wall_s": wall,
        "first_step_s": out["first_step_s"],
        "train_img_s": [e["train_img_s"] for e in out["epochs"]],
        "val_accuracy": out["val_accuracy"],
        "val_n": out["val_n"],
    }


def gpu_name() -> str | None:
    """The NVIDIA GPU both sides will train on, if any (asked of nvidia-smi: importing jax or
    torch here would take GPU memory away from the runs)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
    names = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return names[0] if names else None


def _timed_process(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{cmd[0]} {cmd[1]} exited with {rc}; its log ({log}) ends:\n{tail}")
    return wall


def markdown(rows: list[dict], args: argparse.Namespace, info: dict) -> str:
    """The runs as one markdown table, with springfield's speed-up over the faster PyTorch
    mode of the same precision (wall time; above 1 means springfield finished sooner)."""
    lines = [
        "| side | precision | wall s | first step s | steady img/s | val acc | "
        "springfield speed-up (wall) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peers = [
            p["wall_s"]
            for p in rows
            if p["side"].startswith("torch") and p["precision"] == r["precision"]
        ]
        own = [
            p["wall_s"]
            for p in rows
            if p["side"] == "springfield" and p["precision"] == r["precision"]
        ]
        ratio = f"{min(peers) / own[0]:.2f}x" if r["side"] == "springfield" and peers else ""
        first = "-" if r["first_step_s"] is None else f"{r['first_step_s']:.1f}"
        lines.append(
            f"| {r['side']} | {r['precision']} | {r['wall_s']:.0f} | {first} "
            f"| {steady(r['train_img_s']):.0f} | {r['val_accuracy']:.4f} | {ratio} |"
        )
    bf16 = "native" if info["cpu_bf16"] else "not native on this CPU (converted to float32)"
    if info.get("gpu"):
        bf16 = f"native on the {info['gpu']} (both sides train there)"
    note = (
        f"\n{args.model}, {args.epochs} epochs, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, {info['train']} training and {info['val']} "
        f"validation images ({len(info['classes'])} classes, scene-aware split, seed "
        f"{args.seed}); cold decode cache; bfloat16 products {bf16}; PyTorch DataLoader "
        "workers: "
        f"{args.torch_workers}; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}.\n"
    )
    return "\n".join(lines) + "\n" + note


def steady(rates: list[float]) -> float:
    """Median training rate of the epochs after the first (which compiles and decodes)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="image folder (default: built-in set)")
    p.add_argument("--classes", nargs="+", default=None, help="class folders to use")
    p.add_argument("--model", default="resnet", help="resnet (default) or refcnn")
    p.add_argument("--epochs", type=int, default=15, help="springfield's default: 15")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precisions", nargs="+", default=["float32", "bfloat16"], help="float32 bfloat16"
    )
    p.add_argument("--torch-modes", nargs="+", default=["eager", "compile"])
    p.add_argument("--torch-workers", type=int, default=2, help="PyTorch DataLoader workers")
    p.add_argument("--torch-python", default=sys.executable, help="python with torch")
    p.add_argument("--springfield-python", default=sys.executable, help="python with springfield")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs and run folders here")
    p.add_argument("--json", type=Path, default=None, help="rows as JSON (default: bench-out/)")
    p.add_argument("--markdown", type=Path, default=None, help="table (default: bench-out/)")
    args = p.parse_args()
    args.json = args.json or default_output("endtoend", "json")
    args.markdown = args.markdown or default_output("endtoend", "md")

    from springfield import runtime
    from springfield.data.synthetic import ensure_default_dataset

    work = Path(args.workdir or tempfile.mkdtemp(prefix="springfield-e2e-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    split = work / "split"
    shutil.rmtree(split, ignore_errors=True)
    data = args.data.expanduser() if args.data else ensure_default_dataset()
    info = write_split(data, args.classes, args.seed, split)
    info["cpu_bf16"] = runtime.cpu_has_bf16()
    info["gpu"] = gpu_name()
    # On a GPU both sides use XLA's/cuDNN's convolutions: no oneDNN kernel to build.
    args.kernels = None if info["gpu"] else built_kernels()
    print(f"split: {info['train']} train / {info['val']} val images in {split}", flush=True)

    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(_line(row), flush=True)
        if args.json:  # after every run: a later one that fails loses nothing
            args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")

    for precision in args.precisions:
        # One after another, never together: each process has the machine to itself.
        record(run_springfield(args, split, precision, work))
        for mode in args.torch_modes:
            record(run_torch(args, split, mode, precision == "bfloat16", work))
    table = markdown(rows, args, info)
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table)


def _line(r: dict) -> str:
    return (
        f"  {r['side']} {r['precision']}: {r['wall_s']:.0f} s, val acc {r['val_accuracy']:.4f}, "
        f"{steady(r['train_img_s']):.0f} img/s"
    )


if __name__ == "__main__":
    main()
