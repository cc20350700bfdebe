"""``springfield compare``: train every combination of some settings, then one summary.

Each variant (one value of every ``--vary`` name) trains once per seed with the same data,
split and epochs, one after another, into ``<workdir>/<variant>/seed<k>/`` (an ordinary run
folder). Then ``summary.json``, ``summary.md``, ``curves.png`` and ``compare.html`` are
written from the runs' own ``metrics.jsonl``. Every variant's settings are checked before the
first one trains. Running the same command again skips the finished runs (those with an
``eval.json``) and resumes the interrupted one from its checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import re
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from springfield.config import TrainConfig, save_json, to_json
from springfield.errors import SpringfieldError

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Settings that compare sets itself for every run.
_NOT_VARIED = {"workdir": "--workdir is the compare folder", "seed": "use --seeds 0 1 2"}
# Share of the best validation accuracy whose first epoch is reported.
REACH = 0.9


@dataclass(frozen=True)
class Variant:
    """One combination: ``settings`` maps field names to values as typed (``name`` is
    e.g. ``activation=gelu,optimizer=lion``); ``config`` is the run's TrainConfig before
    its seed and run folder are set."""

    name: str
    settings: dict[str, str]
    config: TrainConfig

    @property
    def folder(self) -> str:
        """A folder name for the variant: the settings with unsafe characters replaced."""
        text = "_".join(f"{k}-{v}" for k, v in self.settings.items()) or "base"
        return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-.") or "variant"


def parse_vary(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["activation=relu,gelu", ...]`` -> ``[("activation", ["relu", "gelu"]), ...]``.

    Names are TrainConfig fields, with ``-`` or ``_`` (``batch-size``, ``batch_size``).
    """
    out: list[tuple[str, list[str]]] = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        field = name.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise SpringfieldError(
                f"--vary {spec!r}: write NAME=VALUE1,VALUE2,... (e.g. --vary activation=relu,gelu)."
            )
        if field not in _FIELDS:
            raise SpringfieldError(
                f"--vary {spec!r}: --{field.replace('_', '-')} is not a flag of springfield "
                "train (springfield train --help lists them)."
            )
        if field in _NOT_VARIED:
            raise SpringfieldError(f"--vary {spec!r}: {_NOT_VARIED[field]}.")
        if any(field == f for f, _ in out):
            raise SpringfieldError(
                f"--vary {spec!r}: {field} is varied twice; list the values once."
            )
        vals = [v.strip() for v in values.split(",")]
        if "" in vals or len(set(vals)) != len(vals):
            raise SpringfieldError(f"--vary {spec!r}: an empty or repeated value.")
        out.append((field, vals))
    return out


def flag_args(field: str, value: str) -> list[str]:
    """The ``springfield train`` arguments that set ``field`` to ``value`` as typed."""
    flag = "--" + field.replace("_", "-")
    kind = str(_FIELDS[field].type)
    if kind == "bool":
        yes = value.lower() in ("1", "true", "yes", "on")
        if not yes and value.lower() not in ("0", "false", "no", "off"):
            return [flag, value]  # let the parser refuse it, naming the flag
        return [flag] if yes else ["--no-" + field.replace("_", "-")]
    if "tuple" in kind:
        return [flag, *shlex.split(re.sub(r"(?<=\d)x(?=\d)", " ", value))]
    return [flag, value]


def parse_setting(base: TrainConfig, field: str, value: str) -> TrainConfig:
    """``base`` with ``field`` set from the string ``value``, parsed exactly as ``springfield
    train`` parses its flag; a value it refuses raises a SpringfieldError naming the flag."""
    import tyro

    args = flag_args(field, value)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            return tyro.cli(TrainConfig, args=args, default=base)
    except SystemExit:
        raise SpringfieldError(
            f"--vary {field}={value}: {value!r} is not a valid value of "
            f"--{field.replace('_', '-')} (type {_FIELDS[field].type}; see springfield train "
            "--help)."
        ) from None


def variants_from_flags(
    base: TrainConfig, vary: Sequence[str], *, preset: str | None = None, typed: Sequence[str] = ()
) -> list[Variant]:
    """Every combination of the ``--vary`` specs applied to ``base``, each parsed as
    ``springfield train`` parses flags (``typed``: the flags given besides, for a preset's
    early-epoch scaling)."""
    from springfield.config import scale_early_epochs

    axes = parse_vary(vary)
    out = []
    for combo in itertools.product(*[[(f, v) for v in vals] for f, vals in axes]):
        cfg = base
        args: list[str] = list(typed)
        for field, value in combo:
            cfg = parse_setting(cfg, field, value)
            args += flag_args(field, value)
        cfg = scale_early_epochs(cfg, preset, args)
        settings = dict(combo)
        out.append(Variant(",".join(f"{k}={v}" for k, v in combo) or "base", settings, cfg))
    return out


def variants_from_values(base: TrainConfig, vary: dict[str, Sequence[Any]]) -> list[Variant]:
    """Every combination of ``vary`` (field -> Python values) applied to ``base``."""
    for field in vary:
        if field not in _FIELDS:
            raise SpringfieldError(f"vary={{{field!r}: ...}}: not a TrainConfig field.")
        if field in _NOT_VARIED:
            raise SpringfieldError(f"vary={{{field!r}: ...}}: {_NOT_VARIED[field]}.")
    out = []
    fields = list(vary)
    for combo in itertools.product(*[list(vary[f]) for f in fields]):
        values = {
            f: tuple(v) if isinstance(v, list) else v for f, v in zip(fields, combo, strict=True)
        }
        settings = {f: str(v) for f, v in values.items()}
        name = ",".join(f"{k}={v}" for k, v in settings.items()) or "base"
        out.append(Variant(name, settings, dataclasses.replace(base, **values)))
    return out


def plan(
    variants: Sequence[Variant], seeds: Sequence[int], workdir: Path
) -> list[tuple[Variant, int, TrainConfig]]:
    """Every run of the comparison with its final config, each checked as ``train`` checks
    it (names, sizes, ranges, a custom activation imported) before any trains."""
    from springfield.training.checks import check_config
    from springfield.training.loop import resolve

    folders = [v.folder for v in variants]
    if len(set(folders)) != len(folders):
        raise SpringfieldError("--vary: two variants map to the same folder name; rename one.")
    runs = []
    for v in variants:
        for seed in seeds:
            cfg = resolve(
                dataclasses.replace(v.config, seed=seed, workdir=workdir / v.folder / f"seed{seed}")
            )
            try:
                check_config(cfg)
            except SpringfieldError as e:
                raise SpringfieldError(f"variant {v.name}: {e}") from None
            runs.append((v, seed, cfg))
    return runs


def compare(
    variants: Sequence[Variant],
    seeds: Sequence[int],
    workdir: Path,
    *,
    console: Any = None,
    train: Callable[[TrainConfig], Path] | None = None,
    command: str | None = None,
    results: Any = None,
) -> dict:
    """Train (or skip, or resume) every run, then write the summary files; returns
    ``summary.json``'s content. Progress goes to ``console``, the summary table to
    ``results`` (default: ``console``)."""
    from springfield.training.run_folder import make_workdir

    if not variants:
        raise SpringfieldError("compare: give at least one --vary NAME=VALUES.")
    if not seeds:
        raise SpringfieldError("--seeds: give at least one seed.")
    workdir = Path(workdir).absolute()
    runs = plan(variants, list(seeds), workdir)
    make_workdir(workdir)
    if train is None:
        from springfield.training.loop import train as train_loop

        def train(cfg: TrainConfig) -> Path:
            return train_loop(cfg, console=console)

    say = console.print if console is not None else (lambda *a, **k: None)
    save_json(
        {
            "command": command,
            "seeds": list(seeds),
            "variants": [
                {"name": v.name, "folder": v.folder, "settings": v.settings} for v in variants
            ],
        },
        workdir / "compare.json",
    )
    for i, (v, seed, cfg) in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {v.name} seed {seed}"
        if (cfg.workdir / "eval.json").exists():
            _check_finished(cfg)
            say(f"{head}: finished before, skipped ({cfg.workdir}).")
            continue
        say(f"[bold]{head}[/]: {cfg.workdir}")
        t0 = time.perf_counter()
        train(cfg)
        say(f"{head}: {time.perf_counter() - t0:.0f} s")
    summary = summarise(variants, list(seeds), workdir)
    summary["command"] = command
    write_summary(summary, workdir)
    say(f"Summary: {workdir / 'summary.md'}, {workdir / 'compare.html'}")
    results = results or console
    if results is not None:
        results.print(summary_table(summary))
    return summary


def _check_finished(cfg: TrainConfig) -> None:
    # A finished run from other settings (flags changed between two compare commands)
    # would be summarised as if it were this variant.
    from springfield.training.run_folder import MUST_MATCH, comparable

    old = comparable(json.loads((cfg.workdir / "config.json").read_text()))
    new = comparable(to_json(cfg))
    if new["lr"] == "auto" and "lr_find" in old:
        new["lr"] = old["lr"]
    diffs = [
        f"--{k.replace('_', '-')} {old.get(k)} (run) vs {new[k]} (now)"
        for k in MUST_MATCH
        if k in old and old[k] != new[k]
    ]
    if diffs:
        raise SpringfieldError(
            f"{cfg.workdir} holds a finished run with other settings: {'; '.join(diffs)}. "
            "Use the same flags as before, or a new --workdir."
        )


def run_numbers(rows: list[dict]) -> dict:
    """One run's numbers from its ``metrics.jsonl`` rows."""
    accs = [r["val_accuracy"] for r in rows]
    best = max(accs)
    return {
        "epochs": len(rows),
        "final_val_accuracy": accs[-1],
        "best_val_accuracy": best,
        "final_val_loss": rows[-1]["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in rows),
        "train_seconds": sum(r["epoch_seconds"] for r in rows),
        "img_s": statistics.median(r["train_img_s"] for r in rows),
        "epochs_to_90pct_best": next(r["epoch"] for r in rows if r["val_accuracy"] >= REACH * best),
    }


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def summarise(variants: Sequence[Variant], seeds: list[int], workdir: Path) -> dict:
    """Per variant: every number of :func:`run_numbers` as mean, std (over seeds, n-1),
    min, max and the per-seed values."""
    from springfield.training.history import read_metrics

    out = []
    for v in variants:
        per_seed = []
        for seed in seeds:
            rows = read_metrics(workdir / v.folder / f"seed{seed}")
            if not rows:
                raise SpringfieldError(f"{workdir / v.folder / f'seed{seed}'}: no finished epoch.")
            per_seed.append(run_numbers(rows))
        out.append(
            {
                "name": v.name,
                "folder": v.folder,
                "settings": v.settings,
                "curves": [read_metrics(workdir / v.folder / f"seed{s}") for s in seeds],
                **{k: _spread([n[k] for n in per_seed]) for k in per_seed[0]},
            }
        )
    return {"seeds": seeds, "reach": REACH, "variants": out}


_COLUMNS = (
    ("final_val_accuracy", "final val acc", "pct"),
    ("best_val_accuracy", "best val acc", "pct"),
    ("final_val_loss", "final val loss", "f4"),
    ("train_seconds", "train s", "f1"),
    ("img_s", "img/s", "f0"),
    ("epochs_to_90pct_best", "epochs to 90% of best", "f1"),
)


def _cell(stat: dict, kind: str, n: int) -> str:
    fmt = {
        "pct": lambda x: f"{100 * x:.1f}",
        "f4": lambda x: f"{x:.4f}",
        "f0": lambda x: f"{x:.0f}",
        "f1": lambda x: f"{x:.1f}",
    }[kind]
    text = fmt(stat["mean"])
    return f"{text} ± {fmt(stat['std'])}" if n > 1 else text


def summary_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The summary table's header and rows as text (accuracies in %)."""
    n = len(summary["seeds"])
    header = [
        "variant",
        *(label + (" (%)" if kind == "pct" else "") for _, label, kind in _COLUMNS),
    ]
    rows = [
        [v["name"], *(_cell(v[k], kind, n) for k, _, kind in _COLUMNS)] for v in summary["variants"]
    ]
    return header, rows


def summary_table(summary: dict):
    """The summary as a rich Table for the console."""
    from rich.table import Column, Table

    header, rows = summary_rows(summary)
    # The variant's name is what the table is read by: never cut to "activati…" at 80
    # columns; the number columns wrap their headers instead.
    table = Table(Column(header[0], no_wrap=True), *header[1:], title="springfield compare")
    for row in rows:
        table.add_row(*row)
    return table


def write_summary(summary: dict, workdir: Path) -> None:
    """``summary.json``, ``summary.md``, ``curves.png`` and ``compare.html`` in ``workdir``."""
    from springfield.report.comparison_page import plot_compare_curves, write_compare_html

    save_json({k: v for k, v in summary.items()}, workdir / "summary.json")
    header, rows = summary_rows(summary)
    seeds = summary["seeds"]
    lines = [
        "# springfield compare",
        "",
        f"Seeds {', '.join(map(str, seeds))}"
        + (" (mean ± standard deviation over seeds)" if len(seeds) > 1 else "")
        + ". Final/best: the last and the best epoch's validation accuracy; train s: the sum"
        " of the epochs' times (compilation included, data preparation and the final"
        " evaluation not); img/s: the median epoch's training images per second; epochs to"
        f" 90% of best: the first epoch at {REACH:.0%} of the run's best validation accuracy."
        " All numbers come from each run's metrics.jsonl.",
        "",
    ]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        "Run folders: " + ", ".join(f"`{v['folder']}/seed<k>`" for v in summary["variants"]),
        "",
    ]
    (workdir / "summary.md").write_text("\n".join(lines))
    plot_compare_curves(summary, workdir / "curves.png")
    write_compare_html(summary, header, rows, workdir)
