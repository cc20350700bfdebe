"""What ``springfield serve`` lets one request cost: pixels decoded, time to arrive.

* :func:`decoded_pixels` reads an upload's header (no pixel is decoded) and says how many
  pixels decoding it would produce: a JPEG at the reduced scale its draft decode uses (1/2,
  1/4 or 1/8 in the DCT domain, never below the model's input size), any other format at
  full size. The app refuses an image over ``--max-pixels`` before decoding it.
* :data:`WORST_BYTES_PER_PIXEL` is what decoding one such pixel can cost at peak, measured
  (:func:`memory_budget` adds it up for the start-up message and docs/serving.md).
* :func:`header_timeout_protocol` is uvicorn's HTTP protocol with a limit on how long a
  request's headers may take to arrive (uvicorn has none: a client sending one header byte
  a minute holds its connection forever). The body's limit is the app's (``body_timeout_s``).
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

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


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    ``seconds`` after it opened (or after its previous response)."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

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
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "WORST_BYTES_PER_PIXEL",
    "Budget",
    "decoded_pixels",
    "header_timeout_protocol",
    "memory_budget",
]
