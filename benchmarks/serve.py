"""Load test of ``springfield serve``: N concurrent clients on loopback, batching on and off.

    python benchmarks/serve.py RUN [--clients 16] [--seconds 5] [--images DIR] [--modes on,off]

For each mode the script starts ``springfield serve RUN --port 0`` (127.0.0.1 only, never
another host), waits until it listens, warms it up, then runs ``--clients`` concurrent
clients for ``--seconds`` (and at most ``--max-requests`` requests in all). Each client
uploads one image per request (multipart, as the page does), waits for the answer, and
sends the next. Images are real JPEGs from ``--images`` (default: 32 synthetic portraits
written to a temporary folder). Prints one markdown table: requests/s, latency p50/p95/p99,
errors (any non-200 or failed request), and the server's forward passes per request
(from /info).

Client and server share the machine's cores: on a 2-core machine the clients' own work is a
noticeable share of the total, so the numbers are a lower bound of what the server alone does.

``--abuse`` instead starts one server with its default limits and runs ``--clients``
clients (default 64) for ``--seconds`` (default 60) that mix good images with hostile and
broken requests (see :data:`KINDS`). It prints, for the good requests, requests/s and
latency p50/p95/p99; for all, the answers by kind and status; and the server's peak resident
memory (VmHWM of the process, plus the largest sampled RSS of its children). It exits 1 if
any answer was a 500, or any good answer differs from ``springfield predict --json`` on the
same file (same classes in the same order, probabilities within 1e-6: a request batched
with others runs at another batch shape, docs/serving.md). ``--json PATH`` writes the
numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

LISTENING = re.compile(r"Serving on (http://127\.0\.0\.1:\d+)")
# Requests of the abuse mode, in the order each client cycles through them (weights by
# repetition): good uploads; small files that decode to just under --max-pixels (1-bit PNG,
# RGBA WebP); a truncated JPEG; a good JPEG sent slowly (in 8 pieces over ~1.6 s); bad
# query parameters.
KINDS = ("good", "bomb", "good", "truncated", "good", "slow", "good", "bad_param", "good", "bomb")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` and its threads (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(run: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "springfield.cli", "serve", str(run), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            m = LISTENING.search(line)
            if m:
                found.append(m.group(1))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or proc.poll() is not None:
        proc.kill()
        raise SystemExit("springfield serve did not start")
    return proc, found[0]


async def load(url: str, images: list[bytes], clients: int, seconds: float, cap: int) -> dict:
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(i: int) -> None:
            nonlocal errors, sent
            k = i
            while time.perf_counter() < stop and sent < cap:
                sent += 1
                data = images[k % len(images)]
                k += clients
                t = time.perf_counter()
                try:
                    r = await client.post("/predict", files={"file": (f"{k}.jpg", data)})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors += not ok

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """``field`` of /proc/PID/status in KiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` (Linux /proc/PID/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *children(k)]
    return out


def bombs(max_pixels: int) -> list[tuple[str, bytes]]:
    """Files of a few kB that decode to just under ``max_pixels``: a 1-bit PNG and an
    RGBA WebP (the costliest format per pixel measured, src/springfield/serve/limits.py)."""
    import io

    from PIL import Image

    side = int(max_pixels**0.5) - 1
    out = []
    for name, mode, fmt, kw in (
        ("bomb-1bit.png", "1", "PNG", {"optimize": True}),
        ("bomb-rgba.webp", "RGBA", "WEBP", {"lossless": True}),
    ):
        buf = io.BytesIO()
        Image.new(mode, (side, side)).save(buf, fmt, **kw)
        out.append((name, buf.getvalue()))
    return out


def expected_answers(run: Path, files: list[Path]) -> dict[str, list[tuple[str, float]]]:
    """``springfield predict --json`` of each file, by file name."""
    cmd = [sys.executable, "-m", "springfield.cli", "predict", str(run), *map(str, files)]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True).stdout
    rows = [__import__("json").loads(x) for x in out.splitlines()]
    return {Path(r["file"]).name: [(t["label"], t["probability"]) for t in r["top"]] for r in rows}


def same_answer(got: list[dict], want: list[tuple[str, float]]) -> bool:
    return [t["label"] for t in got] == [c for c, _ in want] and all(
        abs(t["probability"] - p) <= 1e-6 for t, (_, p) in zip(got, want, strict=True)
    )


async def abuse(
    url: str,
    good: list[tuple[str, bytes]],
    expected: dict,
    bomb_files: list,
    clients: int,
    seconds: float,
    cap: int,
) -> dict:
    """``clients`` clients cycling through :data:`KINDS` for ``seconds`` (``cap`` requests
    at most); a client told 503 waits its Retry-After, as a client should."""
    from collections import Counter

    latencies: list[float] = []
    statuses: Counter = Counter()
    by_kind: Counter = Counter()
    wrong: list[str] = []
    good_ok = 0
    sent = 0
    stop = time.perf_counter() + seconds
    bad_params = [{"top_k": "\u00b2"}, {"top_k": "9" * 5000}, {"top_k": "0"}, {"topk": "3"}]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def slowly(data: bytes):
            step = -(-len(data) // 8)
            for i in range(0, len(data), step):
                yield data[i : i + step]
                await asyncio.sleep(0.2)

        async def one(i: int) -> None:
            nonlocal good_ok, sent
            k = i
            while time.perf_counter() < stop and sent < cap:
                sent += 1
                kind = KINDS[k % len(KINDS)]
                name, data = good[k % len(good)]
                k += 1
                t = time.perf_counter()
                try:
                    if kind == "good":
                        r = await client.post("/predict", files={"file": (name, data)})
                    elif kind == "bomb":
                        r = await client.post("/predict", files={"file": bomb_files[k % 2]})
                    elif kind == "truncated":
                        cut = data[: len(data) * 6 // 10]
                        r = await client.post("/predict", files={"file": ("cut.jpg", cut)})
                    elif kind == "slow":
                        r = await client.post(
                            f"/predict?filename={name}",
                            content=slowly(data),
                            headers={"Content-Type": "image/jpeg"},
                        )
                    else:
                        r = await client.post(
                            "/predict",
                            params=bad_params[k % len(bad_params)],
                            files={"file": (name, data)},
                        )
                    status = str(r.status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                    r = None
                statuses[status] += 1
                by_kind[(kind, status)] += 1
                if r is not None and r.status_code == 200 and kind in ("good", "slow"):
                    top = r.json()["predictions"][0]["top"]
                    if same_answer(top, expected[name]):
                        good_ok += 1
                    else:
                        wrong.append(f"{name}: {top} != {expected[name]}")
                    if kind == "good":
                        latencies.append(time.perf_counter() - t)
                elif r is not None and r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        wall = time.perf_counter() - start
    lat = np.array(latencies or [float("nan")]) * 1000
    return {
        "requests": sum(statuses.values()),
        "good_200": len(latencies),
        "good_rps": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "status_counts": dict(statuses),
        "by_kind": {f"{k} {s}": n for (k, s), n in sorted(by_kind.items())},
        "kinds": sorted({k for k, _ in by_kind}),
        "good_ok": good_ok,
        "good_wrong": len(wrong),
        "wrong_examples": wrong[:3],
        "wall_s": wall,
    }


def run_abuse(args, clients: int, seconds: float, paths: list[Path]) -> int:
    import json

    good_paths = [p for p in paths if p.suffix.lower() in (".jpg", ".jpeg")][:16]
    good = [(p.name, p.read_bytes()) for p in good_paths]
    expected = expected_answers(args.run, good_paths)
    proc, url = start_server(args.run, [])
    peak_children = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_children
        while not done.wait(0.1):
            kids = sum(rss_kib(c) for c in children(proc.pid))
            peak_children = max(peak_children, kids)

    try:
        info = httpx.get(f"{url}/info").json()["serving"]
        start_kib = rss_kib(proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = asyncio.run(
            abuse(
                url, good, expected, bombs(info["max_pixels"]), clients, seconds, args.max_requests
            )
        )
        peak_kib = rss_kib(proc.pid, "VmHWM")
        done.set()
        after = httpx.get(f"{url}/info").json()["serving"]
    finally:
        proc.terminate()
        proc.wait(60)
    result.update(
        clients=clients,
        seconds=seconds,
        start_rss_mib=start_kib / 1024,
        peak_rss_mib=(peak_kib + peak_children) / 1024,
        forward_passes=after["forward_passes"],
        refused_busy=after["refused_busy"],
        max_pixels=info["max_pixels"],
        max_requests=info["max_requests"],
        max_decodes=info["max_decodes"],
    )
    print(
        f"\nabuse: {clients} clients x {seconds:g} s on 127.0.0.1, default limits "
        f"(--max-requests {info['max_requests']}, --max-decodes {info['max_decodes']}, "
        f"--max-pixels {info['max_pixels']}); {os.cpu_count()} CPUs shared by clients and "
        "server\n"
    )
    print(
        "| good requests answered | good requests/s | p50 ms | p95 ms | p99 ms | "
        "good answers = predict | differing |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {result['good_200']} | {result['good_rps']:.1f} | {result['p50']:.0f} | "
        f"{result['p95']:.0f} | {result['p99']:.0f} | {result['good_ok']} | "
        f"{result['good_wrong']} |"
    )
    print("\n| kind | status | answers |\n|---|---|---:|")
    for key, n in result["by_kind"].items():
        kind, status = key.split(" ", 1)
        print(f"| {kind} | {status} | {n} |")
    print(
        f"\nall {result['requests']} requests by status: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(result["status_counts"].items()))
    )
    print(
        f"server resident memory: {result['start_rss_mib']:.0f} MiB after start, peak "
        f"{result['peak_rss_mib']:.0f} MiB (process VmHWM + children); "
        f"{result['forward_passes']} forward passes; the server sent "
        f"{result['refused_busy']} 503s (clients got "
        f"{result['status_counts'].get('503', 0)})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    failed = result["status_counts"].get("500", 0) or result["good_wrong"]
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="run folder or exported folder to serve")
    ap.add_argument("--clients", type=int, help="concurrent clients (max 256; default 16, 64)")
    ap.add_argument("--seconds", type=float, help="load per mode (max 60; default 5, 60)")
    ap.add_argument("--max-requests", type=int, default=20_000, help="cap per mode")
    ap.add_argument("--images", type=Path, help="folder of images to upload (searched recursively)")
    ap.add_argument("--modes", default="on,off", help="micro-batching modes to run: on, off")
    ap.add_argument("--window-ms", type=float, default=2.0, help="--batch-window-ms when on")
    ap.add_argument("--abuse", action="store_true", help="the abuse mode (see above)")
    ap.add_argument("--json", type=Path, help="--abuse: write the numbers here")
    args = ap.parse_args()
    if args.abuse:
        args.clients = 64 if args.clients is None else args.clients
        args.seconds = 60.0 if args.seconds is None else args.seconds
    clients = max(1, min(args.clients or 16, 256))
    seconds = max(0.5, min(args.seconds or 5.0, 60.0))

    if args.images is None:
        from springfield.data.synthetic import write_dataset

        root = write_dataset(Path(tempfile.mkdtemp(prefix="serve-bench-")), per_class=8, seed=7)
    else:
        root = args.images
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = [p.read_bytes() for p in paths[:64]]
    if not images:
        raise SystemExit(f"{root}: no images")
    if args.abuse:
        sys.exit(run_abuse(args, clients, seconds, paths))

    rows = []
    for mode in args.modes.split(","):
        extra = ["--batch-window-ms", str(args.window_ms)] if mode == "on" else ["--no-batching"]
        proc, url = start_server(args.run, extra)
        try:
            asyncio.run(load(url, images, clients, 1.0, 10_000))  # warm-up: connections, caches
            before = httpx.get(f"{url}/info").json()["serving"]
            cpu0, client0 = cpu_seconds(proc.pid), time.process_time()
            result = asyncio.run(load(url, images, clients, seconds, args.max_requests))
            cpu1, client1 = cpu_seconds(proc.pid), time.process_time()
            after = httpx.get(f"{url}/info").json()["serving"]
        finally:
            proc.terminate()
            proc.wait(30)
        passes = after["forward_passes"] - before["forward_passes"]
        reqs = after["requests"] - before["requests"]
        n = max(reqs, 1)
        server_ms = None if cpu0 is None else (cpu1 - cpu0) / n * 1000
        rows.append((mode, result, passes / n, server_ms, (client1 - client0) / n * 1000))

    print(
        f"\n{clients} clients x {seconds:g} s on 127.0.0.1, one {len(images)}-image rotation of "
        f"JPEGs ({root}); {os.cpu_count()} CPUs shared by clients and server\n"
    )
    print(
        "| micro-batching | requests | requests/s | p50 ms | p95 ms | p99 ms | errors "
        "| passes/request | server CPU ms/request | client CPU ms/request |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r, ppr, server_ms, client_ms in rows:
        label = f"on ({args.window_ms:g} ms window)" if mode == "on" else "off"
        print(
            f"| {label} | {r['requests']} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | "
            f"{r['p99']:.1f} | {r['errors']} | {ppr:.2f} | "
            f"{'?' if server_ms is None else f'{server_ms:.1f}'} | {client_ms:.1f} |"
        )


if __name__ == "__main__":
    main()
