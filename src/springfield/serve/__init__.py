"""``springfield serve``: a trained or exported model behind a web page and a JSON API.

:func:`serve` loads the model once, compiles its batch shapes, binds the socket (loopback
unless told otherwise) and runs the app of :mod:`springfield.serve.app` on uvicorn until
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from springfield.errors import SpringfieldError
from springfield.inference import DEFAULT_BATCH_SIZES


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
    say: Callable[[str], None] = print,
) -> None:
    """Serve the run or exported folder ``path`` until interrupted (see the module doc)."""
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
        )
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        where = (
            "this machine only; --host 0.0.0.0 to accept other machines"
            if _is_loopback(bound_host)
            else "REACHABLE FROM OTHER MACHINES: no authentication, no TLS"
        )
        say(f"Serving on http://{shown}:{bound_port} ({where}). Ctrl-C stops.")
        config = uvicorn.Config(
            app,
            log_level="info" if log_requests else "warning",
            access_log=log_requests,
            timeout_graceful_shutdown=5,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["bind", "serve"]
