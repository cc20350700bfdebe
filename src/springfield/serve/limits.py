"""What ``springfield serve`` lets one request cost: pixels decoded, time to arrive.

* :func:`decoded_pixels` reads an upload's header (no pixel is decoded) and says how many
  pixels decoding it would produce: a JPEG at the reduced scale its draft decode uses (1/2,
  1/4 or 1/8 in the DCT domain, never below the model's input size), any other format at
  full size. The app refuses an image over ``--max-pixels`` before decoding it.
* :data:`WORST_BYTES_PER_PIXEL` is what decoding one such pixel can cost at peak, measured
  (:func:`memory_budget` adds it up for the start-up message and docs/serving.md).
* :func:`server_protocol` is uvicorn's HTTP protocol with a limit on how long a request's
  headers may take to arrive (uvicorn has none: a client sending one header byte a minute
  holds its connection forever; the body's limit is the app's, ``body_timeout_s``), and a
  lingering close: an answer that closes the connection before the request body has
  arrived (503, 413, 400, 408, ...) is followed by a half-close and a short, bounded read
  and drop of what the client still sends (``LINGER_*``), as nginx's ``lingering_close``
  does. Closing at once would make the kernel answer the client's next bytes with a reset,
  and a client that is still writing its body (httpx's async client, for one) then loses
  the answer already in its socket and sees a connection error instead.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

import h11
from PIL import Image
from uvicorn.protocols.http.h11_impl import H11Protocol

# Peak resident bytes per decoded pixel of load_rgb(..., size=(64, 64)), each in a fresh
# process (4000x4000 and 3000x3000 images): 1-bit/L PNG and GIF 5.0, CMYK TIFF 8.2, float
# TIFF 9.1, RGBA/LA PNG 12.6, 16-bit PNG 17.6, 16-bit TIFF 18.6, RGBA WebP 22.4. A JPEG costs
# 0.1 per pixel of the file, as its draft decode is 1/8 of it: counted at the decoded size.
WORST_BYTES_PER_PIXEL = 24

DEFAULT_MAX_PIXELS = 12_000_000
"""Largest decoded image the server accepts (12 Mpx: 4000x3000; a 4K screenshot PNG is 8.3
Mpx). With the default two decodes at once, the decodes in flight cost at most
2 x 12 Mpx x 24 bytes = 576 MB (see :func:`memory_budget`)."""


def decoded_pixels(data: bytes, target: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(width, height, pixels decoding would produce)`` from the header of ``data``, for a
    model input of ``target`` = (height, width); None if the header does not parse (the
    decoder then reports why, without decoding anything either)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if im.format != "JPEG":
                return width, height, width * height
            # draft() only chooses the DCT scale (it reads no pixels) but changes the image,
            # so each try opens the header again. Which side is which depends on the EXIF
            # orientation, read later by the decoder: take the larger of the two decodes.
            h, w = target
            pixels = max(_jpeg_scaled_pixels(data, (w, h)), _jpeg_scaled_pixels(data, (h, w)))
            return width, height, pixels
    except Exception:  # noqa: BLE001 - any header Pillow cannot read: the decoder says why
        return None


def _jpeg_scaled_pixels(data: bytes, wh: tuple[int, int]) -> int:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", wh)
        return im.size[0] * im.size[1]


@dataclass(frozen=True)
class Budget:
    """The most memory the bounded parts of the server can hold at once, in bytes."""

    bodies: int
    decodes: int

    @property
    def total(self) -> int:
        return self.bodies + self.decodes


def memory_budget(
    *, max_requests: int, max_upload_mb: float, max_decodes: int, max_pixels: int
) -> Budget:
    """Request bodies held (each admitted request holds its body until its images are
    decoded; reading it may briefly hold it twice) plus decodes in flight."""
    bodies = int(max_requests * 2 * max_upload_mb * 2**20)
    return Budget(bodies, max_decodes * max_pixels * WORST_BYTES_PER_PIXEL)


# Lingering close: after an answer sent before the request body was read to its end, the
# server reads and drops what still arrives until the client closes, for at most LINGER_S
# in all, LINGER_IDLE_S without a byte, and linger_bytes (server_protocol's argument; by
# default LINGER_BYTES). Nothing read is kept: it costs no memory, only a connection for a
# few seconds at most (counted in uvicorn's limit_concurrency like any other).
LINGER_S = 5.0
LINGER_IDLE_S = 1.0
LINGER_BYTES = 16 * 2**20


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: ``close()`` becomes a lingering close
    while the client may still be sending the request body."""

    def __init__(self, transport: asyncio.Transport, protocol: H11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._transport.is_closing()

    def close(self) -> None:
        self._protocol._close()


def server_protocol(
    header_timeout_s: float,
    *,
    linger_s: float = LINGER_S,
    linger_idle_s: float = LINGER_IDLE_S,
    linger_bytes: int = LINGER_BYTES,
) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    ``header_timeout_s`` after it opened (or after its previous response), and closing a
    connection whose request body is not read to its end with a lingering close (see the
    module doc): half-close, then read and drop up to ``linger_bytes`` for at most
    ``linger_s`` (``linger_idle_s`` without data), then close."""
    seconds = header_timeout_s

    class ServerProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _lingering = False
        _linger_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._raw_transport = transport
            super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
            self._arm_header_timer()

        # -- lingering close

        def _close(self) -> None:
            raw = self._raw_transport
            if self._lingering or raw.is_closing():
                return
            # The client may still be sending: a request body not read to its end, or a
            # request h11 refused (ERROR) mid-way.
            sending = self.conn.their_state in (h11.SEND_BODY, h11.ERROR)
            if not sending or not raw.can_write_eof():
                raw.close()
                return
            self._lingering = True
            self._cancel_header_timer()
            self._unset_keepalive_if_required()
            self._linger_left = linger_bytes
            self._linger_end = self.loop.time() + linger_s
            self._linger_last = self.loop.time()
            try:
                raw.write_eof()  # FIN after the answer: the client reads it, then EOF
                raw.resume_reading()
            except (OSError, RuntimeError):
                self._stop_lingering()
                return
            self._linger_timer = self.loop.call_later(linger_idle_s, self._linger_check)

        def _linger_check(self) -> None:
            self._linger_timer = None
            now = self.loop.time()
            due = min(self._linger_end, self._linger_last + linger_idle_s)
            if now >= due:
                self._stop_lingering()
            else:
                self._linger_timer = self.loop.call_later(due - now, self._linger_check)

        def _stop_lingering(self) -> None:
            if self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None
            self._raw_transport.close()

        def data_received(self, data: bytes) -> None:
            if self._lingering:  # dropped, never parsed nor kept
                self._linger_left -= len(data)
                self._linger_last = self.loop.time()
                if self._linger_left < 0:
                    self._stop_lingering()
                return
            super().data_received(data)

        def shutdown(self) -> None:
            if self._lingering:  # the server stops: no reason to wait for this client
                self._stop_lingering()
                return
            super().shutdown()

        def eof_received(self) -> bool | None:
            if self._lingering:  # the client is done: close now, cleanly
                self._stop_lingering()
            return super().eof_received()

        # -- header timeout

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                # Nothing to answer yet (no request): just hang up, as for a keep-alive timeout.
                self.transport.close()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers are complete
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None
            super().connection_lost(exc)

    return ServerProtocol


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LINGER_BYTES",
    "LINGER_IDLE_S",
    "LINGER_S",
    "WORST_BYTES_PER_PIXEL",
    "Budget",
    "decoded_pixels",
    "memory_budget",
    "server_protocol",
]
