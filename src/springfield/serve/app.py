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
400 malformed (empty body, no file, too many files, bad ``top_k``), 413 over the size limit
(from ``Content-Length`` before reading anything, else counted while the body streams in,
so an endless upload is cut off at the limit), 415 wrong content type, 422 a file that is
not a decodable image (not an image, truncated, a decompression bomb: the training limits
of :mod:`springfield.data.decode`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from springfield.errors import BadImageError
from springfield.inference import Classifier, top_classes
from springfield.serve.batcher import MicroBatcher

RAW_TYPES = ("image/", "application/octet-stream")
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


def create_app(
    clf: Classifier,
    *,
    top_k: int = 3,
    max_upload_mb: float = 10.0,
    max_files: int = 16,
    batching: bool = True,
    batch_window_ms: float = 2.0,
) -> Starlette:
    """The app serving ``clf`` (compile it first: :meth:`Classifier.warm_up`)."""
    limit = int(max_upload_mb * 1024 * 1024)
    limit_text = f"{max_upload_mb:g} MB"
    batcher = MicroBatcher(
        clf.probabilities_of_arrays,
        sizes=clf.batch_sizes,
        window_s=batch_window_ms / 1000.0,
        enabled=batching,
    )
    summary = model_summary(clf)
    page = files("springfield.serve").joinpath("page.html").read_text(encoding="utf-8")

    def too_large(what: str) -> RequestError:
        return RequestError(
            413,
            f"{what} is over this server's {limit_text} upload limit: send a smaller image "
            "(or start the server with a larger --max-upload-mb).",
        )

    async def body_chunks(request: Request) -> AsyncIterator[bytes]:
        # Counted as it arrives: the limit holds even without (or with a false)
        # Content-Length, and nothing beyond it is ever read.
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise too_large("the request body")
            if chunk:
                yield chunk

    async def read_uploads(request: Request) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise RequestError(400, f"Content-Length {length!r} is not a number.")
            if int(length) > limit:
                raise too_large(f"the request ({int(length) / 2**20:.1f} MB)")
            if int(length) == 0:
                raise RequestError(400, "empty request body: send an image.")
        if ctype.startswith("multipart/form-data"):
            return await read_multipart(request)
        if ctype.startswith(RAW_TYPES):
            data = b"".join([c async for c in body_chunks(request)])
            if not data:
                raise RequestError(400, "empty request body: send an image.")
            return [(request.query_params.get("filename") or "image", data)]
        raise RequestError(
            415,
            f"Content-Type {ctype or '(none)'!r}: send multipart/form-data with one or more "
            "image files (curl -F file=@image.jpg), or one raw image with Content-Type "
            "image/jpeg, image/png or application/octet-stream.",
        )

    async def read_multipart(request: Request) -> list[tuple[str, bytes]]:
        # One more than allowed, so that "too many" gets our message rather than the parser's.
        parser = MultiPartParser(
            Headers(scope=request.scope),
            body_chunks(request),
            max_files=max_files + 1,
            max_fields=100,
        )
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise RequestError(
                400, f"malformed multipart body ({e.message}): send the images as file fields."
            ) from None
        try:
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not uploads:
                raise RequestError(
                    400, "no file in the form: send each image as a file field (-F file=@x.jpg)."
                )
            if len(uploads) > max_files:
                raise RequestError(
                    400,
                    f"more than {max_files} files in one request: send at most {max_files} "
                    "(or start the server with a larger --max-files).",
                )
            out = []
            for i, up in enumerate(uploads):
                out.append((up.filename or f"file {i + 1}", await up.read()))
            return out
        finally:
            await form.close()

    async def decode(name: str, data: bytes) -> np.ndarray:
        if not data:
            raise RequestError(422, f"{name}: empty file: send an image.")
        try:
            return await run_in_threadpool(clf.decode, data)
        except BadImageError as e:
            raise RequestError(
                422, f"{name}: {e}. Send a JPEG, PNG, GIF, BMP, WEBP or TIFF image."
            ) from None

    def requested_top_k(request: Request) -> int:
        raw = request.query_params.get("top_k")
        if raw is None:
            return top_k
        if not raw.isdigit() or int(raw) < 1:
            raise RequestError(400, f"top_k={raw!r}: must be a whole number >= 1.")
        return int(raw)

    async def predict(request: Request) -> Response:
        try:
            k = requested_top_k(request)
            uploads = await read_uploads(request)
            arrays = [await decode(name, data) for name, data in uploads]
        except RequestError as e:
            return _error(e.status, e.message, close=True)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody left to read it
        probs = await batcher.submit(np.stack(arrays))
        predictions = [
            {"file": name, "top": top_classes(p, clf.classes, k)["top"]}
            for (name, _), p in zip(uploads, probs, strict=True)
        ]
        return JSONResponse({"predictions": predictions, "model": summary})

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(request: Request) -> Response:
        stats = batcher.stats
        return JSONResponse(
            {
                **summary,
                "serving": {
                    "top_k": top_k,
                    "max_upload_mb": max_upload_mb,
                    "max_files": max_files,
                    "batch_sizes": list(clf.batch_sizes),
                    "batching": batching,
                    "batch_window_ms": batch_window_ms,
                    "forward_passes": stats.batches,
                    "images": stats.images,
                    "requests": stats.requests,
                },
            }
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return _error(404, f"no page {request.url.path}: try GET /, POST /predict, GET /info.")
        if exc.status_code == 405:
            return _error(
                405, f"{request.method} {request.url.path} is not allowed: see GET /info."
            )
        return _error(exc.status_code, str(exc.detail))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    return app


__all__ = ["create_app", "model_summary"]
