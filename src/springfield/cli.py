"""``springfield``: train, eval, predict (and report) from the command line.

Flags come from typed dataclasses (tyro), so ``--help`` always matches the code. Every
:class:`SpringfieldError` is printed in a line or two, without a traceback, and the process
exits with status 2.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from springfield.config import TrainConfig
from springfield.errors import Interrupted, SpringfieldError
from springfield.paths import printable
from springfield.runtime import reexec_with_malloc_env, setup_runtime

USAGE = """usage: springfield {train,eval,predict,report,lr-find,compare} [--help]

  train     train a classifier on a folder of images (no --data: built-in Simpsons set)
  eval      evaluate a run folder on its validation split or on --data DIR
  predict   top-k classes for images or folders of images
  report    regenerate a run's plots and report.html
  lr-find   learning-rate range test: plot loss vs rate, suggest a rate (train --lr auto)
  compare   train every combination of --vary settings (and --seeds), one summary

springfield COMMAND --help explains every flag and its default.
"""

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class EvalArgs:
    """Evaluate a trained run: loss, accuracy, per-class precision/recall/F1, confusion."""

    run: Annotated[Path, tyro.conf.Positional]
    """Run folder written by `springfield train` (its --workdir)."""

    data: Path | None = None
    """Folder to evaluate (<data>/<class>/<image>; uses <data>/val if present). Default:
    the run's own validation split."""

    batch_size: int = 64
    """Evaluation batch size (the last batch is padded and masked, nothing is dropped)."""

    json: bool = False
    """Print one JSON object instead of tables."""

    report: Path | None = None
    """Also write confusion.png, mistakes.png and report.html for this evaluation into this folder."""

    allow_import: bool = False
    """Allow importing the run's custom module:function activation (runs that module)."""


@dataclass(frozen=True)
class ReportArgs:
    """Regenerate a run folder's figures and report.html from its latest checkpoint."""

    run: Annotated[Path, tyro.conf.Positional]
    """Run folder written by `springfield train`."""

    batch_size: int = 64
    """Evaluation batch size."""

    allow_import: bool = False
    """Allow importing the run's custom module:function activation (runs that module)."""


@dataclass(frozen=True)
class PredictArgs:
    """Top-k classes with probabilities for each image (folders are searched recursively)."""

    run: Annotated[Path, tyro.conf.Positional]
    """Run folder written by `springfield train`."""

    images: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """Image files or folders of images."""

    top_k: int = 3
    """How many classes to show per image."""

    json: bool = False
    """Print one JSON object per image (JSON lines)."""

    csv: Path | None = None
    """Also write path, rank, class, probability rows to this CSV file."""

    allow_import: bool = False
    """Allow importing the run's custom module:function activation (runs that module)."""


@dataclass(frozen=True)
class LrFindArgs(TrainConfig):
    """Learning-rate range test (Smith 2017, fastai lr_find): from a fresh model of these train flags, train one batch per step while the rate grows exponentially from --start-lr to --end-lr; stop when the smoothed loss exceeds 4x its minimum. Writes lr_find.png (smoothed loss vs rate, log axis, the suggestion marked) and lr_find.json into --workdir (default runs/lr-find-<timestamp>) and prints the suggested --lr by fastai's valley rule: a little past the middle of the longest stretch where the smoothed loss keeps falling. --lr itself is not used."""

    start_lr: float = 1e-6
    """First learning rate of the sweep."""

    end_lr: float = 10.0
    """Last learning rate of the sweep (it stops earlier when the loss diverges)."""

    steps: int = 100
    """Train steps (batches) in the sweep, one rate each."""


@dataclass(frozen=True)
class CompareArgs(TrainConfig):
    """Train every combination of the --vary settings (one value of each), once per seed, with the same data, split and epochs, one after another; each run is an ordinary run folder <workdir>/<variant>/seed<k>. Then write summary.md, summary.json (per variant: final and best validation accuracy, validation loss, train time, img/s, epochs to 90% of the best accuracy; mean and spread over seeds, from each run's metrics.jsonl), curves.png and compare.html into --workdir (default runs/compare-<timestamp>). Every other flag is a train flag and applies to all variants. Every variant is checked before the first trains. Running the same command again skips finished runs and resumes the interrupted one."""

    vary: tyro.conf.UseAppendAction[tuple[str, ...]] = ()
    """NAME=V1,V2,...: a train flag and its values, e.g. --vary activation=relu,gelu,mypkg.acts:squareplus --vary optimizer=adamw,lion (repeat for more; every combination runs). Tuples as "image_size=64 64,96 96" or image_size=64x64,96x96; booleans as tta=true,false."""

    seeds: tuple[int, ...] = ()
    """Seeds to run each variant with (split, initialisation, shuffling and augmentation), e.g. --seeds 0 1 2. Default: --seed."""


_PRESETS_HELP = (
    " Presets: --preset seed is the original tutorial's recipe (seed CNN at 160x120, SGD "
    "momentum 0.9, lr 0.01, L2 5e-4, 50 epochs); --preset simpsons is the recommended recipe "
    "for real frames (docs/results.md). Other flags still override a preset."
)


def _split_preset(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--preset NAME`` out of ``argv``, and the other arguments."""
    preset = None
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--preset":
            preset = next(it, None)
            if preset is None:
                raise SpringfieldError("--preset needs a name, e.g. --preset seed.")
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        else:
            rest.append(a)
    return preset, rest


def _with_preset(cls: type, preset: str | None):
    """An instance of ``cls`` (TrainConfig or a subclass) holding ``preset``'s settings."""
    from springfield.config import preset_config

    base = preset_config(preset)
    return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})


def _as_train_config(args: TrainConfig) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def _train(argv: list[str], console: Console) -> None:
    from springfield.api import train
    from springfield.config import preset_config, scale_early_epochs

    preset, rest = _split_preset(argv)
    cfg = tyro.cli(
        TrainConfig,
        args=rest,
        default=preset_config(preset),
        prog="springfield train",
        description=(TrainConfig.__doc__ or "") + _PRESETS_HELP,
    )
    scaled = scale_early_epochs(cfg, preset, rest)
    if scaled.early_epochs != cfg.early_epochs:
        console.print(
            f"--preset {preset}: --early-epochs {scaled.early_epochs} of --epochs "
            f"{scaled.epochs} (the preset's share of its epochs)."
        )
    cfg = scaled
    console.print_json(
        json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
        )
    )
    train(cfg, console=console)


def _write_report(trained, split, predictions, result, out_dir: Path, *, samples: bool) -> Path:
    import numpy as np

    from springfield.config import to_json
    from springfield.report.run import write_run_report

    sample_batch = None
    if samples:
        from springfield.training.inputs import augmented_samples

        sample_batch = augmented_samples(trained.config, split)
    dataset = {
        "root": str(split.index.root),
        "classes": trained.classes,
        "val_counts": split.index.counts(),
        "skipped": result["skipped"],
    }
    dataset_json = trained.run_dir / "dataset.json"
    if samples and dataset_json.exists():
        dataset = json.loads(dataset_json.read_text())
    return write_run_report(
        out_dir,
        run_dir=trained.run_dir,
        classes=trained.classes,
        eval_result=result,
        images=np.load(split.npy, mmap_mode="r"),
        predictions=predictions,
        samples=sample_batch,
        config=to_json(trained.config),
        dataset=dataset,
    )


def _eval(argv: list[str], console: Console) -> None:
    from springfield.evaluate import evaluate_data, load_run

    args = tyro.cli(EvalArgs, args=argv, prog="springfield eval")
    trained = load_run(args.run, allow_import=args.allow_import)
    split, predictions, result = evaluate_data(
        trained, args.data, args.batch_size, None if args.json else console
    )
    if args.report is not None:
        page = _write_report(trained, split, predictions, result, args.report, samples=False)
        if not args.json:
            console.print(f"Report: {page}")
    if args.json:
        print(json.dumps(result))
        return
    console.print(
        f"{trained.run_dir} (step {trained.step}) on {split.index.root}: "
        f"accuracy [bold]{result['accuracy']:.4f}[/], balanced accuracy "
        f"{result['balanced_accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, "
        f"loss {result['loss']:.4f}, "
        f"{result['num_images']} images, {len(result['skipped'])} skipped"
    )
    table = Table("class", "precision", "recall", "F1", "support")
    for name, sc in result["per_class"].items():
        table.add_row(
            name,
            f"{sc['precision']:.3f}",
            f"{sc['recall']:.3f}",
            f"{sc['f1']:.3f}",
            str(sc["support"]),
        )
    console.print(table)
    # Predicted classes go by number: full names as column headers were cut to "bart_simp…"
    # on an 80-column terminal.
    conf = Table(
        Column("true \\ predicted", no_wrap=True),
        *[Column(str(i), justify="right") for i in range(len(trained.classes))],
        title="confusion matrix",
    )
    for i, (name, row) in enumerate(zip(trained.classes, result["confusion"], strict=True)):
        conf.add_row(f"{i} {name}", *map(str, row))
    console.print(conf)


def _report(argv: list[str], console: Console) -> None:
    from springfield.evaluate import evaluate_data, load_run

    args = tyro.cli(ReportArgs, args=argv, prog="springfield report")
    trained = load_run(args.run, allow_import=args.allow_import)
    split, predictions, result = evaluate_data(trained, None, args.batch_size, console)
    page = _write_report(trained, split, predictions, result, trained.run_dir, samples=True)
    console.print(f"Report: {page}")


def _expand_images(items: tuple[Path, ...]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        if item.is_dir():
            out += sorted(
                p
                for p in item.rglob("*")
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif item.exists():
            out.append(item)
        else:
            raise SpringfieldError(f"{item}: no such file or folder.")
    if not out:
        raise SpringfieldError(f"no image files found in {', '.join(map(str, items))}.")
    return out


def _predict(argv: list[str], console: Console) -> None:
    from springfield.evaluate import load_run, predict_images

    args = tyro.cli(PredictArgs, args=argv, prog="springfield predict")
    if args.top_k < 1:
        raise SpringfieldError(f"--top-k {args.top_k}: must be at least 1.")
    trained = load_run(args.run, allow_import=args.allow_import)
    paths, probs, failures = predict_images(trained, _expand_images(args.images))
    k = min(args.top_k, len(trained.classes))
    rows = []
    for path, p in zip(paths, probs, strict=True):
        order = [int(i) for i in p.argsort()[::-1][:k]]
        rows.append((path, [(trained.classes[i], float(p[i])) for i in order]))
    if args.csv:
        # surrogateescape: a non-UTF-8 file name is written as its own bytes, not a crash.
        with open(args.csv, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f)
            w.writerow(["path", "rank", "class", "probability"])
            for path, top in rows:
                for r, (c, pr) in enumerate(top, 1):
                    w.writerow([str(path), r, c, f"{pr:.6f}"])
    for path, top in rows:
        if args.json:
            print(
                json.dumps(
                    {
                        "path": printable(str(path)),
                        "top": [{"class": c, "probability": pr} for c, pr in top],
                    }
                )
            )
        else:
            console.print(f"{printable(str(path))}: " + ", ".join(f"{c} {pr:.3f}" for c, pr in top))
    for path, reason in failures:
        if args.json:
            print(json.dumps({"path": printable(str(path)), "error": reason}))
        else:
            console.print(f"[yellow]{escape(printable(str(path)))}: skipped ({reason})[/]")


def _lr_find(argv: list[str], console: Console) -> None:
    from springfield.api import lr_find
    from springfield.config import scale_early_epochs

    preset, rest = _split_preset(argv)
    args = tyro.cli(
        LrFindArgs,
        args=rest,
        default=_with_preset(LrFindArgs, preset),
        prog="springfield lr-find",
        description=(LrFindArgs.__doc__ or "") + _PRESETS_HELP,
    )
    cfg = scale_early_epochs(_as_train_config(args), preset, rest)
    lr_find(cfg, console=console, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)


def _compare(argv: list[str], console: Console) -> None:
    import shlex
    from datetime import datetime

    from springfield.comparison import compare, variants_from_flags

    preset, rest = _split_preset(argv)
    args = tyro.cli(
        CompareArgs,
        args=rest,
        default=_with_preset(CompareArgs, preset),
        prog="springfield compare",
        description=(CompareArgs.__doc__ or "") + _PRESETS_HELP,
    )
    if not args.vary:
        raise SpringfieldError(
            "compare: give at least one --vary NAME=V1,V2 (e.g. --vary activation=relu,gelu)."
        )
    workdir = args.workdir or Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    base = dataclasses.replace(_as_train_config(args), workdir=None)
    variants = variants_from_flags(base, args.vary, preset=preset, typed=rest)
    console.print(
        f"Comparing {len(variants)} variant(s) x {len(args.seeds or (args.seed,))} seed(s) "
        f"in {workdir} (run the same command again to resume)."
    )
    compare(
        variants,
        args.seeds or (args.seed,),
        workdir,
        console=console,
        command=shlex.join(["springfield", "compare", *argv]),
    )


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "predict": _predict,
    "report": _report,
    "lr-find": _lr_find,
    "compare": _compare,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``springfield`` console script."""
    if argv is None:
        # Only as the command itself: a caller's process is not ours to replace.
        reexec_with_malloc_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=False)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        Console(stderr=True).print(f"[red]error:[/] unknown command {command!r}.\n{USAGE}")
        return 2
    try:
        setup_runtime()
        COMMANDS[command](rest, console)
    except Interrupted as e:
        Console(stderr=True).print(f"[yellow]stopped:[/] {escape(str(e))}", highlight=False)
        return 130
    except SpringfieldError as e:
        # escape: messages quote paths and runtime errors that may contain [brackets].
        Console(stderr=True).print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
