"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, then stop.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be: inside the data
iterator, between a train step and the line that counts it, halfway through starting a
checkpoint. A checkpoint saved from there may not match its own step number, and the
resumed run would silently differ from an uninterrupted one. So while the loop runs, the
signal only sets a flag; the loop reads it between steps, where the train state, the step
counter and the data iterator agree, and saves from there.

A second Ctrl-C raises ``KeyboardInterrupt`` at once, for when saving takes too long: the
previous complete checkpoint is still there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by a signal handler; the training loop polls :attr:`signal`."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


@contextlib.contextmanager
def stop_requests(enabled: bool = True) -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the yielded :class:`StopRequest`.

    Does nothing (the request never gets set) when ``enabled`` is false or outside the main
    thread, where Python cannot install signal handlers.
    """
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in _SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
