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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="run folder or exported folder to serve")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (max 256)")
    ap.add_argument("--seconds", type=float, default=5.0, help="load per mode (max 60)")
    ap.add_argument("--max-requests", type=int, default=20_000, help="cap per mode")
    ap.add_argument("--images", type=Path, help="folder of images to upload (searched recursively)")
    ap.add_argument("--modes", default="on,off", help="micro-batching modes to run: on, off")
    ap.add_argument("--window-ms", type=float, default=2.0, help="--batch-window-ms when on")
    args = ap.parse_args()
    clients = max(1, min(args.clients, 256))
    seconds = max(0.5, min(args.seconds, 60.0))

    if args.images is None:
        from springfield.data.synthetic import write_dataset

        root = write_dataset(Path(tempfile.mkdtemp(prefix="serve-bench-")), per_class=8, seed=7)
    else:
        root = args.images
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = [p.read_bytes() for p in paths[:64]]
    if not images:
        raise SystemExit(f"{root}: no images")

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
