"""``report.html``: one self-contained page that sums up a run.

The page must open from a laptop, an e-mail attachment or a CI artifact store with no network
and no sibling files, so figures are embedded as base64 ``data:`` URIs, the CSS is inline, and
there are no scripts and no external URLs at all. A Content-Security-Policy meta tag makes the
browser enforce that. Every string that comes from the run (class names, file names, config
values, error reasons) is HTML-escaped: folder names are user data and may contain anything.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from springfield.errors import SpringfieldError

__all__ = ["FIGURES", "write_report_html"]

# (file name in the run folder, heading, caption). Order = order on the page.
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("curves.png", "Training curves", "Loss and accuracy per epoch; dashed: learning rate."),
    (
        "confusion.png",
        "Confusion matrix",
        "Rows: true class, columns: predicted. Colour: share of the true class.",
    ),
    (
        "mistakes.png",
        "Mistakes",
        "Validation images the model got wrong: true class, prediction and its probability.",
    ),
    ("samples.png", "Training samples", "A few training images with their labels."),
    (
        "lr_find.png",
        "Learning-rate finder",
        "Training loss while the rate grew exponentially (--lr auto); red: the suggested rate.",
    ),
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Long skip lists (a folder full of .DS_Store or broken files) would bury the rest of the page.
_MAX_SKIPPED_ROWS = 200

PAGE_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde2ea; --bg: #f6f7f9; --accent: #2b6cb0;
        --bar: #cfe0f5; --bad: #fbe3e3; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header .run { color: var(--muted); font-family: ui-monospace, "DejaVu Sans Mono", monospace;
              font-size: 13px; word-break: break-all; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
          padding: 16px 20px; margin: 18px 0; }
h2 { margin: 0 0 12px; font-size: 19px; }
h3 { margin: 16px 0 8px; font-size: 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0 0; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px;
        padding: 10px 16px; min-width: 150px; }
.card .v { font-size: 22px; font-weight: 600; }
.card .k { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 12px 4px 0; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; padding-left: 12px; }
td.key { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px;
         color: var(--muted); }
td.val { word-break: break-word; }
td.bar { background: linear-gradient(90deg, var(--bar) calc(var(--v) * 100%), transparent 0);
         min-width: 80px; }
tr.low td.name { background: var(--bad); }
tr.total td { font-weight: 600; border-top: 2px solid var(--line); }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr));
        gap: 0 18px; align-items: start; }
figure { margin: 0 0 12px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 4px; background: #fff; }
figcaption, .muted { color: var(--muted); font-size: 13px; }
details summary { cursor: pointer; color: var(--accent); margin: 8px 0; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
"""


def escape(value: object) -> str:
    """HTML-escape ``value`` as text or attribute content."""
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    """Format a value for a table cell (already escaped)."""
    if value is None:
        return '<span class="muted">\u2014</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return escape(value)
        # Four significant digits: enough to compare runs, few enough to scan a column.
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return escape(f"{value:.3e}")
        return escape(f"{value:.4g}")
    if isinstance(value, list | tuple):
        if all(not isinstance(v, Mapping | list | tuple) for v in value):
            return ", ".join(_fmt(v) for v in value) or '<span class="muted">(empty)</span>'
        return f"<code>{escape(json.dumps(value, default=str))}</code>"
    if isinstance(value, Mapping):
        return f"<code>{escape(json.dumps(value, default=str))}</code>"
    return escape(value)


def _flatten(data: Mapping[str, object], prefix: str = "") -> Iterable[tuple[str, object]]:
    """Yield ``("a.b.c", value)`` for nested dicts so that config tables stay two columns."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _kv_table(data: Mapping[str, object]) -> str:
    rows = [
        f'<tr><td class="key">{escape(k)}</td><td class="val">{_fmt(v)}</td></tr>'
        for k, v in _flatten(data)
    ]
    if not rows:
        return '<p class="muted">(nothing recorded)</p>'
    return "<table>" + "".join(rows) + "</table>"


def _pct(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.1%}"
    return "\u2014"


def _num(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def embedded_figure(run_dir: Path, name: str, heading: str, caption: str) -> str | None:
    """Return a <figure> with ``run_dir/name`` inlined, or None if it is absent or not a PNG."""
    path = run_dir / name
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    # A half-written or foreign file would show as a broken image; leave it out instead.
    if not data.startswith(_PNG_SIGNATURE):
        return None
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f"<figure><h3>{escape(heading)}</h3>"
        f'<img src="data:image/png;base64,{b64}" alt="{escape(heading)} ({escape(name)})">'
        f"<figcaption>{escape(caption)} <code>{escape(name)}</code></figcaption></figure>"
    )


def _summary_cards(eval_result: Mapping | None, history: Sequence[Mapping]) -> str:
    cards: list[tuple[str, str]] = []
    if eval_result:
        cards.append((_pct(eval_result.get("accuracy")), "eval accuracy"))
        loss = _num(eval_result.get("loss"))
        cards.append((f"{loss:.4f}" if loss is not None else "\u2014", "eval loss"))
        if eval_result.get("num_images") is not None:
            cards.append((str(eval_result.get("num_images")), "eval images"))
    if history:
        last = history[-1]
        cards.append((str(last.get("epoch", len(history))), "epochs"))
        if not eval_result and _num(last.get("val_accuracy")) is not None:
            cards.append((_pct(last.get("val_accuracy")), "last val accuracy"))
        img_s = _num(last.get("train_img_s"))
        if img_s is not None:
            cards.append((f"{img_s:,.0f}", "train images/s (last epoch)"))
    if not cards:
        return ""
    body = "".join(
        f'<div class="card"><div class="v">{escape(v)}</div><div class="k">{escape(k)}</div></div>'
        for v, k in cards
    )
    return f'<div class="cards">{body}</div>'


def _dataset_section(dataset: Mapping) -> str:
    train = dataset.get("train_counts") or {}
    val = dataset.get("val_counts") or {}
    classes = list(dataset.get("classes") or [])
    # Classes that only appear in the counts still get a row, after the declared ones.
    for name in [*train, *val]:
        if name not in classes:
            classes.append(name)

    facts: dict[str, object] = {}
    if "root" in dataset:
        facts["root"] = dataset.get("root")
    facts["classes"] = len(classes)
    facts["train images"] = sum(int(v) for v in train.values())
    facts["val images"] = sum(int(v) for v in val.values())
    skipped = list(dataset.get("skipped") or [])
    facts["skipped files"] = len(skipped)
    # Anything else the data layer reports (splits, seeds, image size) is shown as is.
    known = {"root", "classes", "train_counts", "val_counts", "skipped"}
    facts.update({k: v for k, v in dataset.items() if k not in known})

    parts = [_kv_table(facts)]
    if classes:
        rows = "".join(
            f"<tr><td>{escape(c)}</td><td class='num'>{_fmt(train.get(c, 0))}</td>"
            f"<td class='num'>{_fmt(val.get(c, 0))}</td></tr>"
            for c in classes
        )
        parts.append(
            "<h3>Images per class</h3><table><tr><th>class</th><th class='num'>train</th>"
            f"<th class='num'>val</th></tr>{rows}"
            f"<tr class='total'><td>total</td><td class='num'>{facts['train images']}</td>"
            f"<td class='num'>{facts['val images']}</td></tr></table>"
        )
    if skipped:
        shown = skipped[:_MAX_SKIPPED_ROWS]
        rows = "".join(
            f"<tr><td><code>{escape(item.get('path', '') if isinstance(item, Mapping) else item)}"
            f"</code></td><td>{escape(item.get('reason', '') if isinstance(item, Mapping) else '')}"
            "</td></tr>"
            for item in shown
        )
        more = (
            f"<p class='muted'>\u2026 and {len(skipped) - len(shown)} more.</p>"
            if len(skipped) > len(shown)
            else ""
        )
        parts.append(
            f"<details><summary>{len(skipped)} skipped file{'s' if len(skipped) != 1 else ''}"
            f"</summary><table><tr><th>path</th><th>reason</th></tr>{rows}</table>{more}"
            "</details>"
        )
    return "<section><h2>Dataset</h2>" + "".join(parts) + "</section>"


def _eval_section(eval_result: Mapping | None) -> str:
    if not eval_result:
        return (
            "<section><h2>Evaluation</h2><p class='muted'>No evaluation results for this run "
            "(it has not been evaluated yet).</p></section>"
        )
    overall = {
        "accuracy": _pct(eval_result.get("accuracy")),
        "loss": eval_result.get("loss"),
        "images": eval_result.get("num_images"),
    }
    # eval.json files written before balanced accuracy existed lack these two keys.
    if "balanced_accuracy" in eval_result:
        overall["balanced accuracy"] = _pct(eval_result["balanced_accuracy"])
        overall["macro-F1"] = eval_result.get("macro_f1")
    per_class: Mapping[str, Mapping] = eval_result.get("per_class") or {}
    # Only the classes the evaluated folder holds (a test set may have some of the classes).
    names = [c for c in (eval_result.get("classes") or per_class) if c in per_class]
    rows = []
    sums = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    total_support = 0
    for name in names:
        stats = per_class.get(name, {})
        cells = []
        for key in ("precision", "recall", "f1"):
            value = _num(stats.get(key))
            sums[key] += value or 0.0
            v = min(max(value or 0.0, 0.0), 1.0)
            shown = f"{value:.3f}" if value is not None else "\u2014"
            cells.append(f'<td class="num bar" style="--v:{v:.3f}">{shown}</td>')
        support = stats.get("support", 0)
        total_support += int(support or 0)
        f1 = _num(stats.get("f1"))
        # Flag the classes that need attention; 0.5 F1 is where a class is mostly wrong.
        low = " class='low'" if f1 is not None and f1 < 0.5 else ""
        rows.append(
            f"<tr{low}><td class='name'>{escape(name)}</td>{''.join(cells)}"
            f"<td class='num'>{_fmt(support)}</td></tr>"
        )
    if names:
        n = len(names)
        rows.append(
            "<tr class='total'><td>macro average</td>"
            + "".join(
                f"<td class='num'>{sums[k] / n:.3f}</td>" for k in ("precision", "recall", "f1")
            )
            + f"<td class='num'>{total_support}</td></tr>"
        )
    table = (
        "<table><tr><th>class</th><th class='num'>precision</th><th class='num'>recall</th>"
        f"<th class='num'>F1</th><th class='num'>support</th></tr>{''.join(rows)}</table>"
        "<p class='muted'>Classes with F1 below 0.5 are highlighted.</p>"
        if names
        else ""
    )
    return f"<section><h2>Evaluation</h2>{_kv_table(overall)}<h3>Per class</h3>{table}</section>"


def _timings_section(timings: Mapping, history: Sequence[Mapping]) -> str:
    data: dict[str, object] = dict(timings)
    if history:
        last = history[-1]
        for key, label in (
            ("train_img_s", "train images/s (last epoch)"),
            ("epoch_seconds", "epoch seconds (last epoch)"),
            ("input_wait_fraction", "input wait fraction (last epoch)"),
        ):
            if key in last:
                data[label] = last[key]
        seconds = [s for s in (_num(r.get("epoch_seconds")) for r in history) if s is not None]
        if seconds:
            data["epoch seconds (sum over epochs)"] = sum(seconds)
    return f"<section><h2>Timings and throughput</h2>{_kv_table(data)}</section>"


def _history_section(history: Sequence[Mapping]) -> str:
    if not history:
        return ""
    columns = list(dict.fromkeys(k for row in history for k in row))
    head = "".join(f"<th class='num'>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>"
        for row in history
    )
    return (
        "<section><h2>Epochs</h2><details><summary>"
        f"{len(history)} epoch{'s' if len(history) != 1 else ''} (metrics.jsonl)</summary>"
        f"<div style='overflow-x:auto'><table><tr>{head}</tr>{body}</table></div>"
        "</details></section>"
    )


def write_report_html(
    run_dir: Path,
    *,
    config: Mapping[str, object],
    dataset: Mapping[str, object],
    eval_result: Mapping[str, object] | None,
    history: Sequence[Mapping[str, object]],
    timings: Mapping[str, object],
    environment: Mapping[str, object],
) -> Path:
    """Write ``run_dir/report.html``, a single self-contained page about the run.

    The page holds: title and run folder; headline numbers; the figures among ``curves.png``,
    ``confusion.png``, ``mistakes.png`` and ``samples.png`` that exist in ``run_dir`` (embedded
    as ``data:`` URIs); per-class precision/recall/F1/support with overall accuracy and loss;
    dataset summary; config; timings and throughput; per-epoch metrics; software versions and
    devices. No scripts, no external URLs; every string from the arguments is HTML-escaped.

    Args:
        run_dir: the run folder; must exist.
        config: the run's config (nested dicts are shown as dotted keys).
        dataset: keys like ``root``, ``classes``, ``train_counts``, ``val_counts``, ``skipped``
            (list of ``{"path", "reason"}``); other keys are shown as they are.
        eval_result: the eval result dict, or None when the run has not been evaluated.
        history: the rows of ``metrics.jsonl``.
        timings: free-form ``name -> value``.
        environment: free-form ``name -> value`` (versions, devices).

    Returns:
        The path of ``report.html``.

    Raises:
        SpringfieldError: ``run_dir`` is not an existing folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SpringfieldError(
            f"run folder {run_dir} does not exist (or is not a folder); pass the folder that "
            "holds metrics.jsonl and the figures"
        )
    title = f"springfield run: {run_dir.name or run_dir}"
    figures = [
        fig
        for name, heading, caption in FIGURES
        if (fig := embedded_figure(run_dir, name, heading, caption)) is not None
    ]
    figures_html = (
        "<section><h2>Figures</h2>" + "".join(figures) + "</section>"
        if figures
        else "<section><h2>Figures</h2><p class='muted'>No figures in this run folder.</p>"
        "</section>"
    )
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; \
style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{PAGE_CSS}</style>
</head>
<body>
<main>
<header>
<h1>{escape(title)}</h1>
<div class="run">{escape(run_dir.resolve())}</div>
{_summary_cards(eval_result, history)}
</header>
{figures_html}
{_eval_section(eval_result)}
<div class="cols">
{_dataset_section(dataset)}
<section><h2>Config</h2>{_kv_table(config)}</section>
{_timings_section(timings, history)}
<section><h2>Environment</h2>{_kv_table(environment)}</section>
</div>
{_history_section(history)}
<footer>Generated by springfield on {escape(generated)}.</footer>
</main>
</body>
</html>
"""
    path = run_dir / "report.html"
    tmp = run_dir / f".report.html.{os.getpid()}.tmp"
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
