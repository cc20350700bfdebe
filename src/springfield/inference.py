"""A trained classifier as one object: load a run folder, predict images, evaluate folders.

This is the Python API behind ``springfield predict`` / ``eval`` (and what a notebook uses):

    >>> clf = springfield.load("runs/a")
    >>> clf.predict(["homer.jpg", pil_image, uint8_array], top_k=3)
    [{'file': 'homer.jpg', 'label': 'homer_simpson', 'probability': 0.97, 'top': [...]}, ...]

Every input goes through the same preprocessing as training data (content sniffing, EXIF
orientation, grayscale/CMYK/palette/RGBA to RGB, the run's image size).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from springfield.data.decode import load_rgb
from springfield.errors import BadImageError, SpringfieldError

ImageLike = Any  # a path (str or Path), encoded bytes, a PIL image, or an (H, W[, C]) array


def to_rgb_array(image: ImageLike, size: tuple[int, int]) -> np.ndarray:
    """One image of any accepted kind as an RGB ``uint8`` array of shape ``(*size, 3)``.

    Paths and bytes are decoded by :func:`~springfield.data.decode.load_rgb`. PIL images and
    arrays are re-encoded losslessly (PNG) and decoded the same way, so a notebook's image
    gets exactly the conversions and resize a file would.

    Raises:
        BadImageError: the input is not a decodable image or an array of an image's shape.
    """
    if isinstance(image, str | Path | bytes | bytearray | memoryview):
        return load_rgb(Path(image) if isinstance(image, str) else image, size=size)
    from PIL import Image

    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
                arr = arr * 255.0  # floats in [0, 1], as matplotlib and most tutorials use
            arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise BadImageError(
                f"array of shape {image.shape}: expected (H, W), (H, W, 3) or (H, W, 4)."
            )
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise BadImageError(
            f"{type(image).__name__}: expected a path, bytes, a PIL image or a numpy array."
        )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return load_rgb(buf.getvalue(), size=size)


def _name(image: ImageLike, i: int) -> str:
    if isinstance(image, str | Path):
        return str(image)
    return f"<image {i}>"


class Classifier:
    """A restored classifier: ``classes``, ``image_size`` and batched prediction.

    Build one with :func:`load`. Prediction compiles one fixed batch shape, so any number of
    images costs ``ceil(n / batch_size)`` forward passes of the same compiled function.
    """

    def __init__(self, trained: Any, *, batch_size: int = 32) -> None:
        from springfield.training.steps import make_eval_step

        self._trained = trained
        self.batch_size = batch_size
        self.classes: list[str] = list(trained.classes)
        self.image_size: tuple[int, int] = tuple(trained.image_size)
        self.source: Path = trained.run_dir
        self._step = make_eval_step(trained.graphdef, tta=trained.config.tta)

    @property
    def info(self) -> dict:
        """What the model is: classes, image size, model name, checkpoint step, accuracy."""
        import json

        cfg = self._trained.config
        accuracy = None
        eval_json = self.source / "eval.json"
        if eval_json.exists():
            accuracy = json.loads(eval_json.read_text()).get("accuracy")
        return {
            "source": str(self.source),
            "model": cfg.model,
            "classes": self.classes,
            "image_size": list(self.image_size),
            "step": self._trained.step,
            "val_accuracy": accuracy,
        }

    def probabilities_of_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, C)`` of preprocessed ``uint8`` images ``(N, H, W, 3)``."""
        import jax

        h, w = self.image_size
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            n = len(chunk)
            # Fixed batch shape: pad, so one compiled step serves every chunk.
            pad = np.zeros((self.batch_size, h, w, 3), np.uint8)
            pad[:n] = chunk
            batch = {
                "image": pad,
                "label": np.zeros(self.batch_size, np.int32),
                "mask": np.zeros(self.batch_size, np.float32),
            }
            logits, _ = self._step(self._trained.params, self._trained.rest, batch)
            out.append(np.asarray(jax.nn.softmax(logits))[:n])
        if not out:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate(out)

    def probabilities(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``(N, C)`` for images (see :func:`to_rgb_array` for kinds).

        Raises:
            BadImageError: the first input that cannot be decoded, named.
        """
        items = _as_list(images)
        arrays = []
        for i, image in enumerate(items):
            try:
                arrays.append(to_rgb_array(image, self.image_size))
            except BadImageError as e:
                raise BadImageError(f"{_name(image, i)}: {e}") from None
        h, w = self.image_size
        stack = np.stack(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)
        return self.probabilities_of_arrays(stack)

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 3) -> list[dict]:
        """Top-k classes of each image: ``[{"file", "label", "probability", "top"}, ...]``.

        ``top`` lists ``{"label", "probability"}`` for the ``top_k`` most likely classes,
        most likely first; ``label``/``probability`` repeat the first of them.
        """
        if top_k < 1:
            raise SpringfieldError(f"top_k={top_k}: must be at least 1.")
        items = _as_list(images)
        probs = self.probabilities(items)
        return [
            {"file": _name(image, i), **top_classes(p, self.classes, top_k)}
            for i, (image, p) in enumerate(zip(items, probs, strict=True))
        ]

    def evaluate(self, folder: str | Path | None = None, batch_size: int = 64) -> dict:
        """Loss, accuracy, per-class precision/recall/F1 and confusion on ``folder``
        (``<folder>/<class>/<image>``; its ``val/`` if it has one). Default: the run's own
        validation split. Every image counts exactly once."""
        from springfield.evaluate import evaluate_data

        _, _, result = evaluate_data(
            self._trained, None if folder is None else Path(folder), batch_size
        )
        return result

    def __repr__(self) -> str:
        return f"Classifier({self.source}, {len(self.classes)} classes, {self.image_size})"


def top_classes(probs: np.ndarray, classes: Sequence[str], top_k: int) -> dict:
    """``{"label", "probability", "top": [{"label", "probability"}, ...]}`` of one row."""
    order = [int(i) for i in np.argsort(-probs, kind="stable")[: min(top_k, len(classes))]]
    top = [{"label": classes[i], "probability": float(probs[i])} for i in order]
    return {"label": top[0]["label"], "probability": top[0]["probability"], "top": top}


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list:
    if isinstance(images, list | tuple):
        return list(images)
    return [images]


def load(path: str | Path, *, allow_import: bool = False, batch_size: int = 32) -> Classifier:
    """Load a run folder written by ``springfield train`` as a :class:`Classifier`.

    Args:
        path: the run's ``--workdir``.
        allow_import: a run trained with a custom ``module:function`` activation imports
            that module (runs its code); refused unless True.
        batch_size: the one compiled batch shape used for prediction.

    Raises:
        SpringfieldError: not a run folder, no complete checkpoint, or files that disagree.
    """
    from springfield.evaluate import load_run

    return Classifier(load_run(Path(path), allow_import=allow_import), batch_size=batch_size)


__all__ = ["Classifier", "load", "to_rgb_array", "top_classes"]
