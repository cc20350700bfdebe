"""The run folder: its name, its record files and the resume check.

Everything here reads or writes files in ``--workdir`` apart from checkpoints
(``checkpoint.py``), the per-epoch metrics (``history.py``) and the end-of-run files
(``final.py``).
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path

import jax

from springfield.config import TrainConfig, save_json, to_json
from springfield.data.prepare import Split
from springfield.errors import SpringfieldError
from springfield.paths import printable

# Settings that must match between a run folder and a resumed run.
MUST_MATCH = (
    "model",
    "ensemble",
    "activation",
    "image_size",
    "workers",
    "batch_size",
    "seed",
    "epochs",
    "optimizer",
    "lr",
    "schedule",
    "augment",
    "data",
    "skip_nonfinite",
    "split_by_group",
    "group_threshold",
    "val_fraction",
    "classes",
    "mixup",
    "cutmix",
    "erase",
    "grayscale",
    "style",
    "mixstyle",
    "balance",
    "ema",
    "early_size",
    "early_epochs",
    "pretrained",
    "weights",
    "freeze_epochs",
    "lr_mult",
    "time_budget",
)


def comparable(cfg_json: dict) -> dict:
    """``cfg_json`` with ``data`` as an absolute path: ``--data ../x`` and ``--data /abs/x``
    name the same folder and must not read as a change of settings."""
    data = cfg_json.get("data")
    if data is None:
        return cfg_json
    return {**cfg_json, "data": str(Path(data).expanduser().resolve())}


def default_workdir() -> Path:
    """``runs/<timestamp>`` in the current folder."""
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def check_resume(workdir: Path, cfg: TrainConfig, classes: list[str], meta: dict) -> None:
    """Refuse to resume ``workdir`` with settings that would change the run."""
    # A key missing from an older run's config.json had its default then.
    old_cfg = comparable(
        {**to_json(TrainConfig()), **json.loads((workdir / "config.json").read_text())}
    )
    new_cfg = comparable(to_json(cfg))
    diffs = [
        f"--{k.replace('_', '-')} {old_cfg.get(k)} (run) vs {new_cfg.get(k)} (now)"
        for k in MUST_MATCH
        if old_cfg.get(k) != new_cfg.get(k)
    ]
    old_classes = json.loads((workdir / "classes.json").read_text())
    if old_classes != classes:
        diffs.append(f"classes {old_classes} (run) vs {classes} (now)")
    if meta.get("processes", 1) != jax.process_count():
        # The data shards and the per-process iterator states in the checkpoint depend on it.
        diffs.append(
            f"--num-processes {meta.get('processes', 1)} (run) vs {jax.process_count()} (now)"
        )
    if diffs:
        raise SpringfieldError(
            f"--workdir {workdir} holds a run with other settings: {'; '.join(diffs)}. "
            "Use the run's settings to resume, or a new --workdir."
        )


def skipped_files(train: Split, val: Split) -> list[tuple[str, str]]:
    """Every file left out of either split, with the reason, each once."""
    # Scan-time skips are shared by both splits; decode-time ones belong to one: each once.
    return sorted(set(train.index.skipped) | set(val.index.skipped))


def write_dataset_record(workdir: Path, root: Path, train: Split, val: Split) -> None:
    """``skipped.txt`` and ``dataset.json``: where the data came from and what was left out."""
    skipped = skipped_files(train, val)
    # skipped.txt keeps each name's exact bytes (non-UTF-8 names included) for scripts;
    # dataset.json and the console get printable names.
    (workdir / "skipped.txt").write_text(
        "".join(f"{p}\t{r}\n" for p, r in skipped), encoding="utf-8", errors="surrogateescape"
    )
    save_json(
        {
            "root": str(root),
            "classes": list(train.index.classes),
            "train_counts": train.index.counts(),
            "val_counts": val.index.counts(),
            "skipped": [{"path": printable(p), "reason": printable(r)} for p, r in skipped],
        },
        workdir / "dataset.json",
    )


def make_workdir(workdir: Path) -> None:
    """Create ``workdir`` and check that it is writable, before any long work."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise SpringfieldError(
            f"--workdir {workdir}: cannot write there ({e.strerror or e}). Choose a writable "
            "folder, or free space on its disk."
        ) from None


def truncate_metrics(workdir: Path, last_epoch: int) -> None:
    """Keep only the metrics rows of epochs up to ``last_epoch``."""
    # A kill between writing metrics and finishing the checkpoint leaves rows for epochs
    # that will be trained again: drop them so every epoch appears once.
    path = workdir / "metrics.jsonl"
    if path.exists():
        rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in rows if json.loads(ln)["epoch"] <= last_epoch]
        path.write_text("".join(ln + "\n" for ln in keep))


def write_run_record(
    workdir: Path, cfg: TrainConfig, root: Path, train: Split, val: Split, extra: dict | None = None
) -> None:
    """``config.json`` (:func:`write_config`), ``classes.json``, ``dataset.json`` and
    ``skipped.txt``."""
    write_config(workdir, cfg, extra)
    save_json(list(train.index.classes), workdir / "classes.json")
    write_dataset_record(workdir, root, train, val)


def write_config(workdir: Path, cfg: TrainConfig, extra: dict | None = None) -> None:
    """``config.json``: ``cfg``, plus ``extra`` keys such as the LR finder's record."""
    save_json({**to_json(cfg), **(extra or {})}, workdir / "config.json")
