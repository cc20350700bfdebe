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
