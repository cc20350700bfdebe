"""See what a model learned: figures, a self-contained HTML report and TensorBoard helpers.

The submodules are pure functions over a run folder's data:

- ``figures``: ``plot_curves``, ``plot_confusion``, ``plot_image_grid`` (PNG files).
- ``html``: ``write_report_html`` (``report.html``, one page, no external references).
- ``tensorboard``: ``read_scalars`` (parse tfevents files), ``log_figures``.

The names are re-exported here lazily: matplotlib and tensorboardX take a noticeable part of a
second to import, and commands that never draw (``springfield --help``) should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from springfield.report.figures import (
        figure_to_png_bytes,
        plot_confusion,
        plot_curves,
        plot_image_grid,
    )
    from springfield.report.html import write_report_html
    from springfield.report.tensorboard import log_figures, read_scalars

_EXPORTS = {
    "figure_to_png_bytes": "figures",
    "plot_confusion": "figures",
    "plot_curves": "figures",
    "plot_image_grid": "figures",
    "write_report_html": "html",
    "log_figures": "tensorboard",
    "read_scalars": "tensorboard",
}

__all__ = [
    "figure_to_png_bytes",
    "log_figures",
    "plot_confusion",
    "plot_curves",
    "plot_image_grid",
    "read_scalars",
    "write_report_html",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
