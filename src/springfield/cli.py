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
from pathlib import Path

import tyro
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from springfield.cli_args import (
    CompareArgs,
    EvalArgs,
    ExportArgs,
    LrFindArgs,
    PredictArgs,
    ReportArgs,
    ServeArgs,
)
from springfield.config import TrainConfig
from springfield.errors import Interrupted, SpringfieldError
from springfield.paths import printable
from springfield.runtime import process_start, reexec_with_malloc_env, setup_runtime

# Progress and logs go to stderr, results (tables, JSON, paths) to stdout, so a command's
# output can be piped or captured while its progress stays on the terminal.
_log = Console(stderr=True)

USAGE = """usage: springfield {train,eval,predict,report,lr-find,compare,export,serve} [--help]
       springfield --version

  train     train a classifier on a folder of images (no --data: built-in Simpsons set)
  eval      evaluate a run folder on its validation split or on --data DIR
  predict   top-k classes for images or folders of images (run or exported folder)
  report    regenerate a run's plots and report.html
  lr-find   learning-rate range test: plot loss vs rate, suggest a rate (train --lr auto)
  compare   train every combination of --vary settings (and --seeds), one summary
  export    write a run as a portable jax.export folder that needs no training code
  serve     a web page and JSON API for a run or exported folder (127.0.0.1:8000)

springfield COMMAND --help explains every flag and its default. train, lr-find and compare
also take --preset NAME and --config FILE (JSON or YAML, e.g. a run's config.json); flags
given with them override their settings.
"""

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def _export(argv: list[str], console: Console) -> None:
    from springfield.export_writer import export_run

    args = tyro.cli(ExportArgs, args=argv, prog="springfield export")
    meta = export_run(
        args.run,
        args.out,
        allow_import=args.allow_import,
        overwrite=args.overwrite,
        platforms=args.platform,
    )
    console.print(
        f"Exported {printable(str(args.run))} (step {meta['step']}, {meta['model']}, "
        f"{len(meta['classes'])} classes) to {printable(str(args.out))} for "
        f"{', '.join(meta['platforms'])}; largest probability difference from the run "
        f"{meta['max_abs_diff']:.1e}.",
        highlight=False,
    )


def _serve(argv: list[str], console: Console) -> None:
    from springfield.serve import serve

    args = tyro.cli(ServeArgs, args=argv, prog="springfield serve")
    serve(
        args.run,
        host=args.host,
        port=args.port,
        top_k=args.top_k,
        max_upload_mb=args.max_upload_mb,
        max_files=args.max_files,
        batch_sizes=args.batch_sizes,
        batching=args.batching,
        batch_window_ms=args.batch_window_ms,
        allow_import=args.allow_import,
        log_requests=args.log_requests,
        token=args.token,
        allow_no_token=args.allow_no_token,
        cors_origins=args.cors_origin,
        max_pixels=args.max_pixels,
        max_decodes=args.max_decodes,
        max_requests=args.max_requests,
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        shutdown_timeout_s=args.shutdown_timeout_s,
        say=lambda text: print(text, flush=True),
    )


_PRESETS_HELP = (
    " Presets: --preset seed is the original tutorial's recipe (seed CNN at 160x120, SGD "
    "momentum 0.9, lr 0.01, L2 5e-4, 50 epochs); --preset simpsons is the recommended recipe "
    "for real frames and drawings of the characters (docs/results.md); --preset "
    "simpsons-quick is the same recipe in 72 epochs without --style, about 10 minutes on 2 "
    "cores for all six classes; --preset simpsons-pretrained fine-tunes EfficientNet-Lite0 "
    "from ImageNet weights in a 10-minute --time-budget, the best start for drawings and web "
    "pictures (docs/pretrained.md). --config "
    "FILE: the settings of a JSON or YAML file of train flags (a run's own config.json "
    "reruns that run). Flags override both."
)


def _split_off(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``) out of ``argv``, and the other
    arguments."""
    value = None
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a == flag:
            value = next(it, None)
            if value is None:
                raise SpringfieldError(f"{flag} needs a value, e.g. {flag} {_EXAMPLE[flag]}.")
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
    return value, rest


_EXAMPLE = {"--preset": "seed", "--config": "runs/a/config.json"}


def _train_flags(cls: type, argv: list[str], prog: str):
    """``springfield train``'s flags (and those of ``cls``, a TrainConfig subclass) from
    ``argv``: the defaults, then ``--preset``'s, then ``--config FILE``'s, then the flags.
    Returns the parsed ``cls``, the TrainConfig to run (a preset's early epochs scaled to
    ``--epochs``), the preset and the settings typed (flags and the file's). Every command
    that takes train flags resolves them here."""
    from springfield.config import base_config, scale_early_epochs

    preset, rest = _split_off(argv, "--preset")
    file, rest = _split_off(rest, "--config")
    base = base_config(preset, None if file is None else Path(file))
    args = tyro.cli(
        cls,
        args=rest,
        default=cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}),
        prog=prog,
        description=(cls.__doc__ or "") + _PRESETS_HELP,
    )
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    # Settings the config file gives count as typed: a rerun keeps its early epochs.
    typed = rest if file is None else [*rest, *(f"--{k}" for k in _file_keys(Path(file)))]
    scaled = scale_early_epochs(cfg, preset, typed)
    if scaled.early_epochs != cfg.early_epochs:
        _log.print(
            f"--preset {preset}: --early-epochs {scaled.early_epochs} of --epochs "
            f"{scaled.epochs} (the preset's share of its epochs)."
        )
    return args, scaled, preset, typed


def _file_keys(file: Path) -> list[str]:
    from springfield.config import read_config_file

    return [k.replace("_", "-") for k in read_config_file(file)]


def _train_config(argv: list[str]) -> TrainConfig:
    """``springfield train``'s config from its flags, printed (on stderr) before it runs."""
    cfg = _train_flags(TrainConfig, argv, "springfield train")[1]
    _log.print_json(
        json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
        )
    )
    return cfg


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
    from springfield.trained_run import evaluate_data, load_run

    args = tyro.cli(EvalArgs, args=argv, prog="springfield eval")
    trained = load_run(args.run, allow_import=args.allow_import)
    split, predictions, result = evaluate_data(
        trained, args.data, args.batch_size, None if args.json else _log
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
    from springfield.trained_run import evaluate_data, load_run

    args = tyro.cli(ReportArgs, args=argv, prog="springfield report")
    trained = load_run(args.run, allow_import=args.allow_import)
    split, predictions, result = evaluate_data(trained, None, args.batch_size, _log)
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
    import numpy as np

    from springfield.errors import BadImageError
    from springfield.inference import load, prediction, top_classes

    args = tyro.cli(PredictArgs, args=argv, prog="springfield predict")
    if args.top_k < 1:
        raise SpringfieldError(f"--top-k {args.top_k}: must be at least 1.")
    clf = load(args.run, allow_import=args.allow_import)
    # The same decode and forward pass as `springfield serve` (Classifier), so both give
    # the same probabilities for the same file.
    paths, arrays, failures = [], [], []
    for path in _expand_images(args.images):
        try:
            arrays.append(clf.decode(path))
            paths.append(path)
        except BadImageError as e:
            failures.append((path, str(e)))
    probs = clf.probabilities_of_arrays(np.stack(arrays)) if arrays else []
    rows = []
    for path, p in zip(paths, probs, strict=True):
        top = top_classes(p, clf.classes, args.top_k)["top"]
        rows.append((path, [(t["label"], t["probability"]) for t in top]))
    if args.csv:
        # surrogateescape: a non-UTF-8 file name is written as its own bytes, not a crash.
        with open(args.csv, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f)
            w.writerow(["path", "rank", "class", "probability"])
            for path, top in rows:
                for r, (c, pr) in enumerate(top, 1):
                    w.writerow([str(path), r, c, f"{pr:.6f}"])
    for (path, top), p in zip(rows, probs, strict=True):
        if args.json:
            # The one prediction schema of the Python API and the server (docs/serving.md).
            print(json.dumps(prediction(printable(str(path)), p, clf.classes, args.top_k)))
        else:
            console.print(f"{printable(str(path))}: " + ", ".join(f"{c} {pr:.3f}" for c, pr in top))
    for path, reason in failures:
        if args.json:
            print(json.dumps({"file": printable(str(path)), "error": reason}))
        else:
            console.print(f"[yellow]{escape(printable(str(path)))}: skipped ({reason})[/]")


def _lr_find(argv: list[str], console: Console) -> None:
    from springfield.api import lr_find

    args, cfg, _, _ = _train_flags(LrFindArgs, argv, "springfield lr-find")
    found = lr_find(cfg, console=_log, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    print(f"{found.suggestion:.2e}")


def _compare(argv: list[str], console: Console) -> None:
    import shlex
    from datetime import datetime

    from springfield.comparison import compare, variants_from_flags

    args, cfg, preset, typed = _train_flags(CompareArgs, argv, "springfield compare")
    if not args.vary:
        raise SpringfieldError(
            "compare: give at least one --vary NAME=V1,V2 (e.g. --vary activation=relu,gelu)."
        )
    workdir = args.workdir or Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    variants = variants_from_flags(
        dataclasses.replace(cfg, workdir=None), args.vary, preset=preset, typed=typed
    )
    _log.print(
        f"Comparing {len(variants)} variant(s) x {len(args.seeds or (args.seed,))} seed(s) "
        f"in {workdir} (run the same command again to resume)."
    )
    compare(
        variants,
        args.seeds or (args.seed,),
        workdir,
        console=_log,
        command=shlex.join(["springfield", "compare", *argv]),
        results=console,
    )


COMMANDS = {
    "eval": _eval,
    "predict": _predict,
    "report": _report,
    "lr-find": _lr_find,
    "compare": _compare,
    "export": _export,
    "serve": _serve,
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
    if argv[0] == "--version":
        from springfield import __version__

        print(f"springfield {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS and command != "train":
        Console(stderr=True).print(f"[red]error:[/] unknown command {command!r}.\n{USAGE}")
        return 2
    try:
        setup_runtime()
        if command == "train":  # the Python API itself: main -> api.train -> loop -> step
            from springfield import api

            run = api.train(_train_config(rest), console=_log, started=process_start())
            # The result on stdout: the run folder, for scripts (run=$(springfield train ...)).
            print(run.path)
        else:
            COMMANDS[command](rest, console)
    except Interrupted as e:
        _print_error(f"[yellow]stopped:[/] {escape(str(e))}")
        return 130
    except SpringfieldError as e:
        # escape: messages quote paths and runtime errors that may contain [brackets].
        _print_error(f"[red]error:[/] {escape(str(e))}")
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/]")
        return 130
    return 0


def _print_error(markup: str) -> None:
    # soft_wrap: the terminal wraps the line, not rich, so a path longer than the window is
    # never cut by an inserted newline and can be copied back whole.
    Console(stderr=True).print(markup, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
