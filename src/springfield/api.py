"""The Python API: what ``springfield train`` (and ``compare``, ``lr-find``) do, as functions.

    >>> import springfield
    >>> run = springfield.train(epochs=3, workdir="runs/nb")       # the built-in set
    >>> run.metrics[-1]["val_accuracy"], run.result["accuracy"]
    >>> clf = run.load()                                           # or springfield.load(path)
    >>> clf.predict(["homer.jpg"], top_k=3)

The command line is a thin layer over these functions: the same config, the same run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from springfield.config import (
    TrainConfig,
    base_config,
    from_json,
    read_config_file,
    scale_early_epochs,
)
from springfield.errors import SpringfieldError

if TYPE_CHECKING:
    from rich.console import Console

    from springfield.inference import Classifier


@dataclass(frozen=True)
class Run:
    """A finished (or stopped) run, read from its run folder.

    Attributes:
        path: the run folder (``--workdir``).
        config: the settings it trained with (``config.json``; ``--lr auto`` resolved).
        metrics: the rows of ``metrics.jsonl``, one dict per epoch (``epoch``,
            ``train_loss``, ``val_loss``, ``val_accuracy``, ``lr``, ``train_img_s``, ...).
        result: the final evaluation (``eval.json``: ``accuracy``, ``loss``,
            ``per_class``, ``confusion``, ...); None before the run finished.
    """

    path: Path
    config: TrainConfig
    metrics: list[dict]
    result: dict | None

    @classmethod
    def read(cls, path: str | Path) -> Run:
        """The run in folder ``path``."""
        path = Path(path).absolute()
        if not (path / "config.json").exists():
            raise SpringfieldError(f"{path}: not a springfield run folder (no config.json).")
        eval_json = path / "eval.json"
        metrics = path / "metrics.jsonl"
        return cls(
            path,
            from_json(json.loads((path / "config.json").read_text())),
            [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if metrics.exists()
            else [],
            json.loads(eval_json.read_text()) if eval_json.exists() else None,
        )

    @property
    def accuracy(self) -> float | None:
        """Final validation accuracy (None before the run finished)."""
        return None if self.result is None else self.result["accuracy"]

    def load(self, *, allow_import: bool = False) -> Classifier:
        """The trained classifier (:func:`springfield.load` of :attr:`path`)."""
        from springfield.inference import load

        return load(self.path, allow_import=allow_import)

    def __repr__(self) -> str:
        acc = "unfinished" if self.accuracy is None else f"val accuracy {self.accuracy:.3f}"
        return f"Run({str(self.path)!r}, {len(self.metrics)} epochs, {acc})"


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def make_config(
    config: TrainConfig | dict | None = None,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    **overrides: Any,
) -> TrainConfig:
    """A :class:`TrainConfig` from a config, a dict or keyword arguments of its fields.

    ``preset`` starts from ``--preset NAME``'s settings and ``config_file`` (JSON or YAML,
    e.g. a run's ``config.json``) from that file's, as on the command line
    (:func:`~springfield.config.base_config`; a preset's early epochs scaled to ``epochs=``
    unless ``early_epochs=`` is given). Strings are accepted for paths, lists for tuples. An
    unknown name is refused with the closest field named.
    """
    if isinstance(config, dict):
        overrides = {**config, **overrides}
        config = None
    for key in overrides:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, _FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpringfieldError(
                f"{key}={overrides[key]!r}: not a TrainConfig field{hint}; see "
                "help(springfield.TrainConfig) or `springfield train --help`."
            )
    if config is None:
        config = base_config(preset, None if config_file is None else Path(config_file))
    base = config
    values = {k: _coerce(v) for k, v in overrides.items()}
    for k in ("data", "workdir"):
        if isinstance(values.get(k), str):
            values[k] = Path(values[k])
    cfg = dataclasses.replace(base, **values)
    if preset is not None:
        # Settings the file gives count as given: a rerun keeps its early epochs.
        given = [*overrides, *(read_config_file(Path(config_file)) if config_file else ())]
        cfg = scale_early_epochs(cfg, preset, [f"--{k.replace('_', '-')}" for k in given])
    return cfg


def _coerce(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def train(
    config: TrainConfig | dict | None = None,
    /,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    console: Console | None = None,
    quiet: bool = False,
    started: float | None = None,
    **overrides: Any,
) -> Run:
    """Train a classifier (or resume its run folder) and return the :class:`Run`.

    Pass a :class:`TrainConfig`, or keyword arguments named like its fields (the flags of
    ``springfield train`` with ``_`` for ``-``), or both (keywords win)::

        run = springfield.train(epochs=2, workdir="runs/a")         # built-in dataset
        run = springfield.train(data="~/simpsons", preset="simpsons", split_by_group=True)
        run = springfield.train(TrainConfig(model="seed"), lr="auto")

    ``lr="auto"`` runs the learning-rate finder first (see :func:`lr_find`). Calling it
    again with the same ``workdir`` and settings resumes the run where it stopped; a
    finished run is evaluated again, not retrained.

    Args:
        config: base settings (default: ``TrainConfig()`` or the preset's).
        preset: a preset's name, as ``--preset`` (``springfield.PRESETS``).
        config_file: a JSON or YAML file of settings, as ``--config`` (e.g. a run's
            ``config.json``).
        console: a rich Console for the progress output (default: stdout).
        quiet: print nothing.
        started: a ``time.perf_counter()`` reading that the first epoch's
            ``first_step_seconds`` counts from (default: this call).
        **overrides: TrainConfig fields.

    Returns:
        The :class:`Run`: ``.path``, ``.metrics`` (one row per epoch), ``.result``
        (final evaluation), ``.load()`` (the :class:`~springfield.inference.Classifier`).

    Raises:
        SpringfieldError: a setting that cannot work (named), unreadable data, a run folder
            that holds a run with other settings.
    """
    from rich.console import Console

    from springfield.runtime import setup_runtime
    from springfield.training.loop import train as train_loop

    cfg = make_config(config, preset=preset, config_file=config_file, **overrides)
    setup_runtime()
    path = train_loop(cfg, Console(quiet=True) if quiet else console, started=started)
    return Run.read(path)


def lr_find(
    config: TrainConfig | dict | None = None,
    /,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    console: Console | None = None,
    quiet: bool = False,
    start_lr: float = 1e-6,
    end_lr: float = 10.0,
    steps: int = 100,
    **overrides: Any,
):
    """The learning-rate range test for a model, optimizer and data given as in :func:`train`.

    A fresh model trains one batch per step while the rate grows exponentially from
    ``start_lr`` to ``end_lr``; the sweep stops when the smoothed loss exceeds 4x its
    minimum. The suggestion follows fastai's "valley" rule: a little past the middle of the
    longest stretch over which the smoothed loss keeps falling. Writes ``lr_find.png`` and
    ``lr_find.json`` into ``workdir`` (default ``runs/lr-find-<timestamp>``).

    Returns:
        An ``LrFind`` record: ``.suggestion``, ``.lrs``, ``.losses``, ``.smoothed``,
        ``.diverged_at``, ``.steepest``, ``.min_over_10``, ``.rule``.
    """
    from datetime import datetime

    from rich.console import Console

    from springfield import parallel
    from springfield.runtime import setup_runtime
    from springfield.training import lr_find as finder
    from springfield.training.loop import resolve
    from springfield.training.run_folder import make_workdir

    cfg = make_config(config, preset=preset, config_file=config_file, **overrides)
    if cfg.workdir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg = dataclasses.replace(cfg, workdir=Path("runs") / f"lr-find-{stamp}")
    setup_runtime()
    parallel.setup(
        cpu_devices=cfg.cpu_devices,
        distributed=False,
        coordinator=None,
        num_processes=None,
        process_id=None,
        workdir=cfg.workdir,
    )
    cfg = resolve(cfg)
    make_workdir(cfg.workdir)
    console = Console(quiet=True) if quiet else console or Console()
    return finder.lr_find(cfg, cfg.workdir, console, start_lr=start_lr, end_lr=end_lr, steps=steps)


def compare(
    config: TrainConfig | dict | None = None,
    /,
    *,
    vary: dict[str, list],
    seeds: tuple[int, ...] | list[int] = (0,),
    workdir: str | Path,
    preset: str | None = None,
    config_file: str | Path | None = None,
    console: Console | None = None,
    quiet: bool = False,
    **overrides: Any,
) -> dict:
    """Train every combination of ``vary`` once per seed and summarise, as
    ``springfield compare`` does::

        summary = springfield.compare(
            vary={"activation": ["relu", "gelu", squareplus_name]}, seeds=[0, 1],
            workdir="runs/acts", epochs=8,
        )

    Each run goes to ``<workdir>/<variant>/seed<k>``; ``summary.json``/``.md``,
    ``curves.png`` and ``compare.html`` to ``workdir``. Calling it again skips finished runs
    and resumes the interrupted one.

    Returns:
        ``summary.json``'s content: per variant, each number's ``mean``, ``std``, ``min``,
        ``max`` and per-seed ``values`` over the seeds.
    """
    from rich.console import Console

    from springfield.comparison import compare as run_compare
    from springfield.comparison import variants_from_values
    from springfield.runtime import setup_runtime

    base = make_config(config, preset=preset, config_file=config_file, **overrides)
    variants = variants_from_values(base, vary)
    setup_runtime()
    console = Console(quiet=True) if quiet else console or Console()
    return run_compare(variants, list(seeds), Path(workdir), console=console)
