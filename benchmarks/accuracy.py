"""Train springfield's recommended recipe (and, optionally, the tutorial's) and print a table.

    python benchmarks/accuracy.py --data ../shared/data/simpsons \
        --classes bart_simpson homer_simpson lisa_simpson marge_simpson

Every run uses the scene-aware validation split (--split-by-group), so the accuracy is an
honest estimate on scenes the model has not seen. When the classes include the built-in
set's four (bart, homer, lisa, marge), the "drawn acc" column is the trained model's accuracy
on springfield's 1,000 procedurally drawn cartoon portraits (a six-class model may answer
Maggie or Grampa, and is wrong then): a proxy for differently drawn images of the same
characters (not real clip-art). Extra springfield flags go after ``--``
(e.g. ``-- --epochs 10 --image-size 96 96``) and apply to every recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import tyro
from outputs import default_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="image folder (one per class)")
    parser.add_argument("--classes", nargs="+", default=None, help="class folders to use")
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["simpsons"],
        help="presets to train: simpsons (recommended), seed (the tutorial)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed")
    parser.add_argument("--workdir", type=Path, default=None, help="keep run folders here")
    parser.add_argument(
        "--markdown", type=Path, default=None, help="also write the table (default: bench-out/)"
    )
    parser.add_argument(
        "--watch",
        default="maggie_simpson",
        help="a class whose recall and precision get columns of their own (the small class)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="each run decodes into a new, empty cache: wall time as a new user meets it",
    )
    args, extra = parser.parse_known_args()
    args.markdown = args.markdown or default_output("accuracy", "md")
    extra = [a for a in extra if a != "--"]

    from springfield.config import TrainConfig, preset_config, scale_early_epochs
    from springfield.runtime import reexec_with_malloc_env, setup_runtime

    # Train in the environment the springfield command gives itself (huge pages for malloc).
    reexec_with_malloc_env()
    setup_runtime()
    from springfield.training.loop import train

    base = Path(args.workdir or tempfile.mkdtemp(prefix="springfield-accuracy-"))
    rows = []
    for recipe in args.recipes:
        for seed in args.seeds:
            cfg = tyro.cli(TrainConfig, args=extra, default=preset_config(recipe))
            cfg = scale_early_epochs(cfg, recipe, extra)
            cfg = dataclasses.replace(
                cfg,
                data=args.data,
                seed=seed,
                split_by_group=True,
                report=False,
                tensorboard=False,
                classes=tuple(args.classes) if args.classes else None,
                workdir=base / f"{recipe}-seed{seed}",
            )
            if args.cold:
                os.environ["SPRINGFIELD_CACHE"] = tempfile.mkdtemp(prefix="springfield-cold-")
            t0 = time.perf_counter()
            run = train(cfg)
            wall = time.perf_counter() - t0
            result = json.loads((run / "eval.json").read_text())
            drawn = drawn_accuracy(run, result["per_class"])
            saved = json.loads((run / "config.json").read_text())
            rows.append(
                {
                    "recipe": recipe,
                    "seed": seed,
                    "model": cfg.model,
                    "image_size": "x".join(map(str, saved["image_size"]))
                    + (
                        f" (first {saved['early_epochs']} at "
                        + "x".join(map(str, saved["early_size"]))
                        + ")"
                        if saved.get("early_epochs")
                        else ""
                    ),
                    "epochs": cfg.epochs,
                    "wall_s": round(wall, 1),
                    "val_accuracy": result["accuracy"],
                    "balanced_accuracy": result["balanced_accuracy"],
                    "macro_f1": result["macro_f1"],
                    "watch": result["per_class"].get(args.watch),
                    "val_images": result["num_images"],
                    "drawn_accuracy": drawn,
                    "f1": {c: round(v["f1"], 3) for c, v in result["per_class"].items()},
                }
            )
    classes = list(rows[0]["f1"]) if rows else []
    header = [
        "recipe",
        "seed",
        "model",
        "size",
        "epochs",
        "wall time (s)",
        "val acc",
        "bal acc",
        "macro-F1",
        f"{args.watch.split('_')[0]} R / P",
        "val n",
        "drawn acc",
        *[f"F1 {c.split('_')[0]}" for c in classes],
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["recipe"],
            r["seed"],
            r["model"],
            r["image_size"],
            r["epochs"],
            r["wall_s"],
            f"{r['val_accuracy']:.4f}",
            f"{r['balanced_accuracy']:.4f}",
            f"{r['macro_f1']:.4f}",
            "-"
            if r["watch"] is None
            else f"{r['watch']['recall']:.3f} / {r['watch']['precision']:.3f}",
            r["val_images"],
            "-" if r["drawn_accuracy"] is None else f"{r['drawn_accuracy']:.3f}",
            *[r["f1"][c] for c in classes],
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"command: {' '.join(sys.argv)}")
    if args.markdown:
        args.markdown.write_text(table + "\n")


def drawn_accuracy(run: Path, per_class: dict) -> float | None:
    """Accuracy of ``run`` on the built-in drawn set, when it was trained on (at least) its
    four classes."""
    from springfield.data.prepare import resolve_data_root
    from springfield.data.synthetic import CLASSES
    from springfield.trained_run import evaluate_data, load_run

    if not set(CLASSES) <= set(per_class):
        return None
    drawn = resolve_data_root(None, per_class=250, console=None)
    return evaluate_data(load_run(run), drawn)[2]["accuracy"]


if __name__ == "__main__":
    main()
