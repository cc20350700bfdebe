"""Test helper: run `springfield serve` as a real subprocess on a free loopback port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

LISTENING = re.compile(r"Serving on http://(?:127\.0\.0\.1|0\.0\.0\.0):(\d+) \(")


class Server:
    """A `springfield serve ... --port 0` process; ``url`` once it listens."""

    def __init__(
        self,
        folder: Path,
        *args: str,
        cache: Path,
        timeout: float = 240,
        env: dict[str, str] | None = None,
    ) -> None:
        env = {**os.environ, "SPRINGFIELD_CACHE": str(cache), **(env or {})}
        cmd = [sys.executable, "-m", "springfield.cli", "serve", str(folder), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        found = threading.Event()
        self.port: int | None = None

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                m = LISTENING.search(line)
                if m:
                    self.port = int(m.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("springfield serve did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        """SIGTERM, then the exit status (uvicorn shuts down gracefully: 0)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
