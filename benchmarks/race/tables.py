"""The race's results as one markdown table: ratios against springfield's row of the same
precision, shares of the run's GEMM peak, and springfield against the fastest peer."""

from __future__ import annotations

import argparse

import numpy as np


def best_peaks(peaks: dict) -> dict[str, tuple[float, str]]:
    """``{dtype: (GFLOP/s, source)}``: the best matmul of each precision in this run."""
    best: dict[str, tuple[float, str]] = {}
    for key, gflops in peaks.items():
        if isinstance(key, tuple) and gflops > best.get(key[1], (0.0, ""))[0]:
            best[key[1]] = (gflops, key[0])
    return best


def finite(x: float) -> float | None:
    # JSON has no NaN: unknown values (FLOPs of a springfield-only network) become null.
    return x if np.isfinite(x) else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def add_ratios(results: list[dict], peaks: dict) -> None:
    """Each row's share of the best matmul of its own precision, and springfield's speed over
    it (springfield's row of the same precision: ``springfield`` or ``springfield-bf16``)."""
    best = best_peaks(peaks)
    for r in results:
        gflops, source = best.get(r["precision"], (float("nan"), "none"))
        r["gemm_peak_gflops"], r["gemm_peak_source"] = gflops, source
        r["peak_fraction"] = finite(r["gflops"] / gflops) if r["gflops"] else None
    base = {
        (r["precision"], r["network"], tuple(r["image_size"]), r["batch_size"]): r
        for r in results
        if r["framework"] in ("springfield", "springfield-bf16")
    }
    for r in results:
        b = base.get((r["precision"], r["network"], tuple(r["image_size"]), r["batch_size"]))
        if b:
            # springfield / this row: above 1 means springfield is faster.
            r["springfield_train_ratio"] = b["train_img_s"] / r["train_img_s"]
            r["springfield_eval_ratio"] = b["eval_img_s"] / r["eval_img_s"]


def versus_peers(results: list[dict]) -> list[str]:
    """One line per configuration and precision: springfield against the fastest peer
    framework (PyTorch or Keras, not springfield's own variants) of that precision."""
    lines = []
    keys = {
        (r["network"], tuple(r["image_size"]), r["batch_size"], r["precision"]) for r in results
    }
    for net, size, batch, precision in sorted(keys):
        rows = [
            r
            for r in results
            if (r["network"], tuple(r["image_size"]), r["batch_size"], r["precision"])
            == (net, size, batch, precision)
        ]
        ours = [r for r in rows if r["framework"] in ("springfield", "springfield-bf16")]
        peers = [r for r in rows if not r["framework"].startswith("springfield")]
        if not ours or not peers:
            continue
        parts = []
        for op in ("train", "eval"):
            top = max(peers, key=lambda r: r[f"{op}_img_s"])
            ratio = ours[0][f"{op}_img_s"] / top[f"{op}_img_s"]
            parts.append(f"{op} {ratio:.2f}x of {top['framework']} ({top[f'{op}_img_s']:.0f})")
        lines.append(f"{net} {size[0]}x{size[1]} batch {batch}, {precision}: " + ", ".join(parts))
    return lines


def markdown(results: list[dict], peaks: dict, args: argparse.Namespace) -> str:
    """The results as one markdown table (plus how they were measured and springfield
    against the fastest peer of each precision)."""
    from springfield import runtime

    head = (
        "| framework | multiplies in | network | input | batch | train img/s | eval img/s "
        "| first step s | train GFLOP/s | of GEMM peak | springfield / this, train "
        "| springfield / this, eval |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in results:
        tr = r["train_img_s_runs"]
        lines.append(
            f"| {r['framework']} | {r['precision']} | {r['network']} "
            f"| {r['image_size'][0]}x{r['image_size'][1]} "
            f"| {r['batch_size']} | {r['train_img_s']:.0f} ({min(tr):.0f}-{max(tr):.0f}) "
            f"| {r['eval_img_s']:.0f} | {r['first_step_s']:.2f} | {_fmt(r['gflops'], '.0f')} "
            f"| {_fmt(r['peak_fraction'], '.0%')} "
            f"| {_fmt(r.get('springfield_train_ratio'), '.2f')} "
            f"| {_fmt(r.get('springfield_eval_ratio'), '.2f')} |"
        )
    best = best_peaks(peaks)
    peak_text = "; ".join(
        f"{dtype} {g:.0f} GFLOP/s ({src})" for dtype, (g, src) in sorted(best.items())
    )
    kernel = peaks.get("numpy_kernel")
    bf16 = "native" if runtime.cpu_has_bf16() else "NOT native on this CPU (no AVX512_BF16/AMX)"
    note = (
        "\nspringfield / this compares rows of the same precision; "
        f"median of {args.repeats} interleaved repeats of ~{args.repeat_seconds:g} s, each "
        "framework alone (the others paused); "
        f"GEMM peaks (best 2048^3 matmul of numpy, JAX, PyTorch and TF in this run): "
        f"{peak_text}; numpy's BLAS: {kernel}; bfloat16 products {bf16}; "
        "train GFLOP/s = 3 x forward conv+dense FLOPs x img/s; first step includes compilation; "
        f"devices: {', '.join(sorted({str(r.get('device', '?')) for r in results}))}.\n"
    )
    versus = versus_peers(results)
    return (
        head
        + "\n".join(lines)
        + "\n"
        + note
        + (
            "\nspringfield against the fastest peer:\n" + "\n".join(f"- {v}" for v in versus) + "\n"
            if versus
            else ""
        )
    )
