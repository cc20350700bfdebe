"""Load and run a folder written by ``springfield export``, without springfield's training code.

An exported folder holds:

* ``model.jaxexport``: the inference forward pass serialised by :mod:`jax.export` (StableHLO,
  parameters baked in, a symbolic batch dimension, lowered for CPU and CUDA): ``uint8`` RGB
  images ``(B, H, W, 3)`` in, float32 logits ``(B, classes)`` out. Normalisation and the
  run's test-time augmentation are inside it;
* ``classes.json``: the class names, in the order of the logits;
* ``preprocess.json``: what the images must look like before they go in (size, colour,
  resize, normalisation), for a program that does not use springfield's decoder;
* ``export.json``: where it came from (run folder, model, checkpoint step, accuracy, JAX
  version).

This module imports only the standard library, numpy, JAX and springfield's errors; its
callers decode images with :mod:`springfield.data.decode` (Pillow). No flax, optax, grain,
orbax or ``springfield.training``/``springfield.models``: tests/test_export.py checks that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from springfield.errors import SpringfieldError

FORMAT = "springfield-export"
FORMAT_VERSION = 1
MODEL_FILE = "model.jaxexport"
META_FILE = "export.json"
CLASSES_FILE = "classes.json"
PREPROCESS_FILE = "preprocess.json"


def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``springfield export``."""
    return (Path(path) / META_FILE).is_file()


@dataclass
class ExportedModel:
    """A deserialised export: ``classes``, ``image_size``, ``meta`` and :meth:`logits`."""

    path: Path
    classes: list[str]
    image_size: tuple[int, int]
    meta: dict
    preprocess: dict
    exported: Any  # jax.export.Exported

    def __post_init__(self) -> None:
        self._compiled: dict[int, Any] = {}

    def logits(self, images: np.ndarray) -> Any:
        """Logits ``(B, classes)`` (a JAX array) of ``uint8`` images ``(B, H, W, 3)``.

        Each batch size compiles once (the export is shape-polymorphic; XLA is not)."""
        import jax

        n = int(images.shape[0])
        if n not in self._compiled:
            self._compiled[n] = jax.jit(self.exported.call)
        return self._compiled[n](images)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpringfieldError(
            f"{path}: unreadable ({e}). Export the run again: springfield export RUN OUT"
        ) from None


def load_export(path: str | Path) -> ExportedModel:
    """Deserialise the exported folder ``path`` for this machine's JAX backend.

    Raises:
        SpringfieldError: not an exported folder, files missing or inconsistent, a format
            this springfield does not know, or a backend the export was not lowered for.
    """
    import jax
    from jax import export

    path = Path(path).expanduser().absolute()
    if not is_export_dir(path):
        raise SpringfieldError(
            f"{path}: not an exported model (no {META_FILE}). Write one with: "
            f"springfield export RUN {path}"
        )
    meta = _read_json(path / META_FILE)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SpringfieldError(
            f"{path / META_FILE}: format {meta.get('format')!r} version "
            f"{meta.get('format_version')!r}; this springfield reads {FORMAT!r} version "
            f"{FORMAT_VERSION}. Export the run again with this version."
        )
    classes = _read_json(path / CLASSES_FILE)
    preprocess = _read_json(path / PREPROCESS_FILE)
    try:
        exported = export.deserialize(bytearray((path / MODEL_FILE).read_bytes()))
    except OSError as e:
        raise SpringfieldError(f"{path / MODEL_FILE}: unreadable ({e}).") from None
    except Exception as e:  # noqa: BLE001 - flatbuffers/JAX raise assorted types on bad bytes
        raise SpringfieldError(
            f"{path / MODEL_FILE}: not a jax.export model this JAX ({jax.__version__}) can "
            f"read: {type(e).__name__}: {e}. Export the run again with this JAX."
        ) from None
    h, w = (int(v) for v in preprocess["image_size"])
    want = ((None, h, w, 3), np.dtype(np.uint8))
    got = exported.in_avals[0]
    shape = tuple(None if not isinstance(d, int) else d for d in got.shape)
    if (shape, got.dtype) != want or exported.out_avals[0].shape[-1] != len(classes):
        raise SpringfieldError(
            f"{path}: {MODEL_FILE} takes {got.str_short()} and gives "
            f"{exported.out_avals[0].str_short()}, but {PREPROCESS_FILE}/{CLASSES_FILE} say "
            f"uint8[b,{h},{w},3] and {len(classes)} classes. Export the run again."
        )
    backend = jax.default_backend()
    if backend not in exported.platforms:
        raise SpringfieldError(
            f"{path}: exported for {', '.join(exported.platforms)}, not for this machine's "
            f"{backend} backend. Export again on springfield with that platform."
        )
    return ExportedModel(path, list(classes), (h, w), meta, preprocess, exported)


__all__ = ["ExportedModel", "is_export_dir", "load_export"]
