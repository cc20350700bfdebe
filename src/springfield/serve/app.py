"""The ASGI app of ``springfield serve``: a page, a JSON API, health and model info.

Endpoints:

* ``GET /``: one self-contained page (``page.html``: no external requests, works offline);
* ``POST /predict``: ``multipart/form-data`` with one or more image files, or one raw image
  body (``Content-Type: image/*`` or ``application/octet-stream``); ``?top_k=N`` overrides
  the server's ``--top-k``. Answers ``{"predictions": [{"file", "top": [{"label",
  "probability"}]}], "model": {...}}``;
* ``GET /health`` and ``GET /info``.

Images are decoded by the same code as ``springfield predict``
(:meth:`springfield.inference.Classifier.decode`) and go through the same
:meth:`~springfield.inference.Classifier.probabilities_of_arrays`, via the micro-batcher.

Every bad request gets a 4xx and a one-line JSON ``{"error": "..."}`` saying what to do:
400 malformed (empty body, no file, too many files, a text field, an unknown or bad query
parameter), 401 a missing or wrong bearer token (when the server has one), 408 a body that
took longer than ``body_timeout_s`` to arrive, 413 over the size limit (from
``Content-Length`` before reading anything, else counted while the body streams in, so an
endless upload is cut off at the limit), 415 wrong content type, 422 a file that is not a
decodable image (not an image, truncated, a decompression bomb) or one that would decode to
more than ``max_pixels`` (refused from its header, before any pixel is decoded).

Work is bounded: at most ``max_requests`` ``/predict`` requests are held at once (reading,
decoding, waiting for or in a forward pass), at most ``max_decodes`` images are decoded at
once, one forward pass runs at a time; a request beyond that gets ``503`` with
``Retry-After`` before its body is read. A failing forward pass answers ``500`` with a
one-line JSON error (and one log line), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from springfield.errors import BadImageError
from springfield.inference import Classifier, prediction
from springfield.serve.batcher import MicroBatcher, ModelError, QueueFull
from springfield.serve.limits import DEFAULT_MAX_PIXELS, decoded_pixels

log = logging.getLogger("springfield.serve")

RAW_TYPES = ("image/", "application/octet-stream")
QUERY_PARAMETERS = ("top_k", "filename")
# Longest top_k accepted as text: int() of a 5,000-digit string costs time and raises past
# Python's 4,300-digit limit; no model has a billion classes.
TOP_K_DIGITS = 9
MAX_NAME = 255  # longest file name echoed back (longer ones are refused)
RETRY_AFTER_S = 1
# Content security policy of the page: nothing but this server, inline code, local images.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


class RequestError(Exception):
    """A bad request: its HTTP status and the one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str, *, close: bool = False) -> JSONResponse:
    # close: the request body may be partly unread; closing the connection is the only way
    # to stop the client sending it (uvicorn would otherwise read and drop it to the end).
    headers = {"Connection": "close"} if close else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def model_summary(clf: Classifier) -> dict:
    """What a client sees of the model: no server paths."""
    info = clf.info
    return {
        "name": Path(info["source"]).name,
        "model": info.get("model"),
        "format": info.get("format"),
        "classes": info["classes"],
        "image_size": info["image_size"],
        "step": info.get("step"),
        "val_accuracy": info.get("val_accuracy"),
    }


class _BodyTimeout(Exception):
    """The request body did not arrive within ``body_timeout_s``."""


def create_app(
    clf: Classifier,
    *,
    top_k: int = 3,
    max_upload_mb: float = 10.0,
    max_files: int = 16,
    batching: bool = True,
    batch_window_ms: float = 2.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decodes: int = 2,
    max_requests: int = 24,
    body_timeout_s: float = 30.0,
    token: str | None = None,
    cors_origins: Sequence[str] = (),
) -> Starlette:
    """The app serving ``clf`` (compile it first: :meth:`Classifier.warm_up`); the limits
    are those of ``springfield serve``'s flags of the same names (see the module doc)."""
    limit = int(max_upload_mb * 1024 * 1024)
    limit_text = f"{max_upload_mb:g} MB"
    batcher = MicroBatcher(
        clf.probabilities_of_arrays,
        sizes=clf.batch_sizes,
        window_s=batch_window_ms / 1000.0,
        enabled=batching,
        max_queue=max_requests * max_files,
    )
    # Decodes run here, never in Starlette's shared pool of 40 threads: this pool's size is
    # the most decodes (and so decoded pixels) in memory at once.
    decoder = ThreadPoolExecutor(max_workers=max_decodes, thread_name_prefix="springfield-decode")
    summary = model_summary(clf)
    page = files("springfield.serve").joinpath("page.html").read_text(encoding="utf-8")
    expected_auth = f"Bearer {token}".encode() if token else None
    held = {"requests": 0, "refused_busy": 0}

    def too_large(what: str) -> RequestError:
        return RequestError(
            413,
            f"{what} is over this server's {limit_text} upload limit: send a smaller image "
            "(or start the server with a larger --max-upload-mb).",
        )

    async def body_chunks(request: Request, deadline: float) -> AsyncIterator[bytes]:
        # Counted as it arrives: the limit holds even without (or with a false)
        # Content-Length, and nothing beyond it is ever read. The deadline stops a client
        # that trickles its body to hold a request slot.
        loop = asyncio.get_running_loop()
        seen = 0
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), deadline - loop.time())
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _BodyTimeout from None
            seen += len(chunk)
            if seen > limit:
                raise too_large("the request body")
            if chunk:
                yield chunk

    async def read_uploads(
        request: Request, deadline: float
    ) -> list[tuple[str, bytes | bytearray]]:
        ctype = request.headers.get("content-type", "")
        length = request.headers.get("content-length")
        if length is not None:
            # isascii: str.isdigit() also accepts "²", which int() refuses.
            if not (length.isascii() and length.isdigit()) or len(length) > 15:
                raise RequestError(400, f"Content-Length {length[:40]!r} is not a number.")
            if int(length) > limit:
                raise too_large(f"the request ({int(length) / 2**20:.1f} MB)")
            if int(length) == 0:
                raise RequestError(400, "empty request body: send an image.")
        if ctype.startswith("multipart/form-data"):
            return await read_multipart(request, deadline)
        if ctype.startswith(RAW_TYPES):
            data = bytearray()  # the decoder takes it as is: no second copy of the body
            async for c in body_chunks(request, deadline):
                data += c
            if not data:
                raise RequestError(400, "empty request body: send an image.")
            name = request.query_params.get("filename") or "image"
            return [(checked_name(name, "?filename"), data)]
        raise RequestError(
            415,
            f"Content-Type {ctype[:100] or '(none)'!r}: send multipart/form-data with one or "
            "more image files (curl -F file=@image.jpg), or one raw image with Content-Type "
            "image/jpeg, image/png or application/octet-stream.",
        )

    def checked_name(name: str, what: str) -> str:
        if len(name) > MAX_NAME:
            raise RequestError(
                400, f"{what} of {len(name)} characters: send a name of at most {MAX_NAME}."
            )
        return name

    async def read_multipart(request: Request, deadline: float) -> list[tuple[str, bytes]]:
        # One more than allowed, so that "too many" gets our message rather than the parser's.
        parser = MultiPartParser(
            Headers(scope=request.scope),
            body_chunks(request, deadline),
            max_files=max_files + 1,
            max_fields=100,
        )
        try:
            form = await parser.parse()
        except (RequestError, _BodyTimeout, ClientDisconnect):
            raise
        except MultiPartException as e:
            raise RequestError(
                400, f"malformed multipart body ({e.message}): send the images as file fields."
            ) from None
        except Exception as e:  # noqa: BLE001 - the parser's other errors for odd bodies
            raise RequestError(
                400,
                f"malformed multipart body ({type(e).__name__}): send the images as file "
                "fields (curl -F file=@image.jpg).",
            ) from None
        try:
            items = form.multi_items()
            uploads = [v for _, v in items if isinstance(v, UploadFile)]
            fields = [k for k, v in items if not isinstance(v, UploadFile)]
            if not uploads:
                raise RequestError(
                    400, "no file in the form: send each image as a file field (-F file=@x.jpg)."
                )
            if fields:
                raise RequestError(
                    400,
                    f"form field {fields[0][:40]!r} is not a file: send only image files in "
                    "the form (top_k goes in the query: /predict?top_k=3).",
                )
            if len(uploads) > max_files:
                raise RequestError(
                    400,
                    f"more than {max_files} files in one request: send at most {max_files} "
                    "(or start the server with a larger --max-files).",
                )
            out = []
            for i, up in enumerate(uploads):
                name = checked_name(up.filename or f"file {i + 1}", "a file name")
                out.append((name, await up.read()))
            return out
        finally:
            await form.close()

    def admissible(name: str, data: bytes) -> None:
        """Refuse, from the header alone, what would decode to more than max_pixels."""
        size = decoded_pixels(data, clf.image_size)
        if size is not None and size[2] > max_pixels:
            width, height, pixels = size
            scaled = " (at the reduced scale of JPEG decoding)" if pixels < width * height else ""
            raise RequestError(
                422,
                f"{name}: {width}x{height} px would decode to {pixels / 1e6:.1f} Mpx{scaled}, "
                f"over this server's {max_pixels / 1e6:g} Mpx limit: send a smaller image "
                "(or start the server with a larger --max-pixels).",
            )

    async def decode(name: str, data: bytes) -> np.ndarray:
        if not data:
            raise RequestError(422, f"{name}: empty file: send an image.")
        admissible(name, data)
        try:
            return await asyncio.get_running_loop().run_in_executor(decoder, clf.decode, data)
        except BadImageError as e:
            raise RequestError(
                422, f"{name}: {e}. Send a JPEG, PNG, GIF, BMP, WEBP or TIFF image."
            ) from None

    def requested_top_k(request: Request) -> int:
        unknown = [k for k in request.query_params if k not in QUERY_PARAMETERS]
        if unknown:
            raise RequestError(
                400,
                f"unknown query parameter {unknown[0][:40]!r}: POST /predict takes "
                f"{' and '.join(QUERY_PARAMETERS)}.",
            )
        values = request.query_params.getlist("top_k")
        if len(values) > 1:
            raise RequestError(400, "top_k given more than once: send it once.")
        if not values:
            return top_k
        raw = values[0]
        if not (raw.isascii() and raw.isdigit()) or len(raw) > TOP_K_DIGITS or int(raw) < 1:
            raise RequestError(400, f"top_k={raw[:40]!r}: must be a whole number >= 1.")
        return int(raw)

    def authorized(request: Request) -> bool:
        if expected_auth is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, expected_auth)

    def unauthorized() -> JSONResponse:
        r = _error(
            401,
            "missing or wrong bearer token: send the header 'Authorization: Bearer TOKEN' "
            "with the server's --token (or SPRINGFIELD_TOKEN).",
            close=True,
        )
        r.headers["WWW-Authenticate"] = "Bearer"
        return r

    def busy(why: str) -> JSONResponse:
        held["refused_busy"] += 1
        r = _error(503, f"the server is busy ({why}): try again in {RETRY_AFTER_S} s.", close=True)
        r.headers["Retry-After"] = str(RETRY_AFTER_S)
        return r

    async def predict(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        if held["requests"] >= max_requests:
            # Before the body is read: a refused request costs no memory.
            return busy(f"{max_requests} requests in progress, the --max-requests limit")
        held["requests"] += 1
        try:
            return await predict_admitted(request)
        finally:
            held["requests"] -= 1

    async def predict_admitted(request: Request) -> Response:
        deadline = asyncio.get_running_loop().time() + body_timeout_s
        try:
            k = requested_top_k(request)
            uploads = await read_uploads(request, deadline)
            names = [name for name, _ in uploads]
            arrays = [await decode(name, data) for name, data in uploads]
            del uploads  # the bodies: not held while waiting for the model
        except RequestError as e:
            return _error(e.status, e.message, close=True)
        except _BodyTimeout:
            return _error(
                408,
                f"the request body took longer than {body_timeout_s:g} s to arrive: send it "
                "at once (or start the server with a larger --body-timeout-s).",
                close=True,
            )
        except ClientDisconnect:
            return Response(status_code=400)  # nobody left to read it
        try:
            probs = await batcher.submit(np.stack(arrays))
        except QueueFull as e:
            return busy(str(e))
        except ModelError as e:
            return _error(
                500,
                f"the model failed on this request's batch ({e}): a fault of the server, not "
                "of the images; it goes on serving, and its log has the same line.",
            )
        predictions = [
            prediction(name, p, clf.classes, k) for name, p in zip(names, probs, strict=True)
        ]
        return JSONResponse({"predictions": predictions, "model": summary})

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        stats = batcher.stats
        return JSONResponse(
            {
                **summary,
                "serving": {
                    "top_k": top_k,
                    "max_upload_mb": max_upload_mb,
                    "max_files": max_files,
                    "max_pixels": max_pixels,
                    "max_decodes": max_decodes,
                    "max_requests": max_requests,
                    "body_timeout_s": body_timeout_s,
                    "token": expected_auth is not None,
                    "batch_sizes": list(clf.batch_sizes),
                    "batching": batching,
                    "batch_window_ms": batch_window_ms,
                    "forward_passes": stats.batches,
                    "images": stats.images,
                    "requests": stats.requests,
                    "model_failures": stats.failures,
                    "in_progress": held["requests"],
                    "refused_busy": held["refused_busy"],
                },
            }
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return _error(
                404, f"no page {request.url.path[:100]}: try GET /, POST /predict, GET /info."
            )
        if exc.status_code == 405:
            return _error(
                405, f"{request.method} {request.url.path[:100]} is not allowed: see GET /info."
            )
        return _error(exc.status_code, str(exc.detail))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            decoder.shutdown(wait=True)

    # No CORS headers unless asked: a page of another origin cannot read the answers.
    middleware = (
        [
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        ]
        if cors_origins
        else []
    )
    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    return app


__all__ = ["create_app", "model_summary"]
