"""``springfield serve``: a trained or exported model behind a web page and a JSON API.

:func:`serve` loads the model once, compiles its batch shapes, binds the socket (loopback
unless told otherwise) and runs the app of :mod:`springfield.serve.app` on uvicorn until
Ctrl-C or SIGTERM. On SIGTERM it stops accepting connections, lets the requests in
progress finish (up to ``shutdown_timeout_s``) and exits.

Off loopback it needs a bearer token (``token`` or the environment variable
``SPRINGFIELD_TOKEN``) unless ``allow_no_token`` says that anyone who reaches the port may
use it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from springfield.errors import SpringfieldError
from springfield.inference import DEFAULT_BATCH_SIZES
from springfield.serve.limits import (
    DEFAULT_MAX_PIXELS,
    LINGER_BYTES,
    memory_budget,
    server_protocol,
)

TOKEN_ENV = "SPRINGFIELD_TOKEN"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SpringfieldError(f"--host {host}: cannot resolve ({e.strerror}).") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise SpringfieldError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
            "pick another --port (0 picks a free one)."
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    top_k: int = 3,
    max_upload_mb: float = 10.0,
    max_files: int = 16,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    batching: bool = True,
    batch_window_ms: float = 2.0,
    allow_import: bool = False,
    log_requests: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decodes: int = 2,
    max_requests: int = 24,
    header_timeout_s: float = 10.0,
    body_timeout_s: float = 30.0,
    shutdown_timeout_s: float = 30.0,
    token: str | None = None,
    allow_no_token: bool = False,
    cors_origins: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> None:
    """Serve the run or exported folder ``path`` until interrupted (see the module doc).

    Raises:
        SpringfieldError: a flag out of range, a port that cannot be bound, or a
            non-loopback ``host`` without a token and without ``allow_no_token``.
    """
    import uvicorn
    from PIL import Image

    from springfield.inference import load
    from springfield.serve.app import create_app

    if top_k < 1:
        raise SpringfieldError(f"--top-k {top_k}: must be at least 1.")
    if max_upload_mb <= 0:
        raise SpringfieldError(f"--max-upload-mb {max_upload_mb}: must be positive.")
    if max_files < 1:
        raise SpringfieldError(f"--max-files {max_files}: must be at least 1.")
    if batch_window_ms < 0:
        raise SpringfieldError(f"--batch-window-ms {batch_window_ms}: must be 0 or more.")
    if not batch_sizes or min(batch_sizes) < 1:
        raise SpringfieldError(f"--batch-sizes {list(batch_sizes)}: need sizes >= 1.")
    for flag, value in (
        ("--max-pixels", max_pixels),
        ("--max-decodes", max_decodes),
        ("--max-requests", max_requests),
    ):
        if value < 1:
            raise SpringfieldError(f"{flag} {value}: must be at least 1.")
    for flag, value in (
        ("--header-timeout-s", header_timeout_s),
        ("--body-timeout-s", body_timeout_s),
        ("--shutdown-timeout-s", shutdown_timeout_s),
    ):
        if not value > 0:
            raise SpringfieldError(f"{flag} {value}: must be more than 0 seconds.")
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None and (not token.isascii() or not token.isprintable() or " " in token):
        raise SpringfieldError(
            f"--token / {TOKEN_ENV}: use printable ASCII without spaces (it goes into an "
            "HTTP header), e.g. the output of: python -c 'import secrets; "
            "print(secrets.token_urlsafe())'."
        )
    if not _is_loopback(host) and token is None and not allow_no_token:
        raise SpringfieldError(
            f"--host {host}: other machines could use this server, and it has no token. "
            f"Pass --token TOKEN (or set {TOKEN_ENV}) and send 'Authorization: Bearer TOKEN'; "
            "or add --allow-no-token to let anyone who reaches the port use it."
        )
    # Pillow warns of large images on stderr; springfield.data.decode refuses them anyway
    # (with the same limit as training) and the client gets that reason.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    sock = bind(host, port)  # before the slow part: a taken port fails at once
    try:
        start = time.perf_counter()
        clf = load(path, allow_import=allow_import, batch_sizes=batch_sizes)
        clf.warm_up()
        info = clf.info
        acc = info.get("val_accuracy")
        say(
            f"Model {Path(info['source']).name} ({info['format']}, {info['model']}): "
            f"{len(clf.classes)} classes, {clf.image_size[0]}x{clf.image_size[1]} px, "
            f"validation accuracy {'unknown' if acc is None else f'{acc:.3f}'}; compiled "
            f"batch sizes {', '.join(map(str, clf.batch_sizes))} in "
            f"{time.perf_counter() - start:.1f} s; micro-batching "
            f"{f'on ({batch_window_ms:g} ms window)' if batching else 'off'}."
        )
        app = create_app(
            clf,
            top_k=top_k,
            max_upload_mb=max_upload_mb,
            max_files=max_files,
            batching=batching,
            batch_window_ms=batch_window_ms,
            max_pixels=max_pixels,
            max_decodes=max_decodes,
            max_requests=max_requests,
            body_timeout_s=body_timeout_s,
            token=token,
            cors_origins=cors_origins,
        )
        budget = memory_budget(
            max_requests=max_requests,
            max_upload_mb=max_upload_mb,
            max_decodes=max_decodes,
            max_pixels=max_pixels,
        )
        say(
            f"Limits: {max_requests} requests at once (more get 503), {max_decodes} decodes "
            f"at once, images up to {max_pixels / 1e6:g} Mpx decoded; at most "
            f"{budget.total / 2**20:.0f} MiB for request bodies and decodes on top of the "
            f"model; {'a bearer token is required' if token else 'no token'}."
        )
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if _is_loopback(bound_host):
            where = "this machine only; --host 0.0.0.0 to accept other machines"
        elif token:
            where = "reachable from other machines with the token; no TLS"
        else:
            where = "REACHABLE FROM OTHER MACHINES: no authentication, no TLS"
            say(
                f"WARNING: --allow-no-token on {bound_host}: anyone who can reach port "
                f"{bound_port} can use this server and its CPU."
            )
        say(f"Serving on http://{shown}:{bound_port} ({where}). Ctrl-C stops.")
        config = uvicorn.Config(
            app,
            # Error answers sent before the body has arrived close the connection with a
            # lingering close (limits.py), long enough to drop a body of twice the limit.
            http=server_protocol(
                header_timeout_s,
                linger_bytes=max(LINGER_BYTES, int(2 * max_upload_mb * 2**20) + 2**20),
            ),
            log_level="info" if log_requests else "warning",
            access_log=log_requests,
            # SIGTERM: stop accepting, let the requests in progress finish, then exit.
            timeout_graceful_shutdown=shutdown_timeout_s,
            # Connections beyond this get uvicorn's plain 503 (each costs a little memory
            # even idle; header_timeout_s closes the idle ones).
            limit_concurrency=max(256, 8 * max_requests),
        )
        batcher = app.state.batcher

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: object) -> None:
                # Requests waiting out a batch window run now, so the graceful shutdown
                # that follows finishes them promptly.
                batcher.flush()
                super().handle_exit(sig, frame)

        Server(config).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["TOKEN_ENV", "bind", "serve"]
