"""Where springfield keeps generated files (the synthetic dataset, decoded image caches)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """``$SPRINGFIELD_CACHE`` if set, else the platform's per-user cache folder:
    ``$XDG_CACHE_HOME/springfield`` or ``~/.cache/springfield`` on Linux,
    ``~/Library/Caches/springfield`` on macOS, ``%LOCALAPPDATA%\\springfield\\Cache`` on
    Windows."""
    env = os.environ.get("SPRINGFIELD_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else Path.home() / "AppData" / "Local") / "springfield" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "springfield"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "springfield"


def printable(name: str) -> str:
    """``name`` (a path or message) safe to print and to write as UTF-8.

    Python keeps the undecodable bytes of a non-UTF-8 file name as lone surrogates, which
    make ``print``, ``json`` consumers and UTF-8 writers fail; they become ``\\xNN`` escapes.
    """
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
