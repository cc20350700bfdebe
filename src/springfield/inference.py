"""A trained classifier as one object: load a run folder or an exported folder, predict
images, evaluate folders.

This is the Python API behind ``springfield predict`` / ``eval`` (and what a notebook uses):

    >>> clf = springfield.load("runs/a")
    >>> clf.predict(["homer.jpg", pil_image, uint8_array], top_k=3)
    [{'file': 'homer.jpg', 'label': 'homer_simpson', 'probability': 0.97, 'top': [...]}, ...]

Every input goes through the same preprocessing as training data (content sniffing, EXIF
orientation, grayscale/CMYK/palette/RGBA to RGB, the run's image size).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
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


DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
"""The batch shapes prediction compiles: each chunk of images is padded to the smallest
that holds it. A float32 forward pass rounds slightly differently at different batch shapes
(up to ~1e-7 in a probability), so everything that must agree exactly (``predict`` and
``serve``) goes through the same :meth:`Classifier.probabilities_of_arrays`."""


def _buckets(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sorted({int(b) for b in batch_sizes}))
    if not sizes or sizes[0] < 1:
        raise SpringfieldError(f"batch sizes {list(batch_sizes)}: need one or more sizes >= 1.")
    return sizes


class Classifier:
    """A trained classifier, from a run folder or an exported folder (:func:`load`):
    ``classes``, ``image_size``, ``info`` and batched prediction.

    Prediction runs fixed batch shapes (``batch_sizes``, each compiled once): a chunk of
    ``n`` images is padded to the smallest size that holds it, so any number of images costs
    a few forward passes of already-compiled functions.
    """

    def __init__(
        self,
        logits: Callable[[np.ndarray], Any],
        *,
        classes: Sequence[str],
        image_size: tuple[int, int],
        info: dict,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        trained: Any = None,
    ) -> None:
        self._logits = logits
        self._trained = trained
        self.batch_sizes = _buckets(batch_sizes)
        self.batch_size = self.batch_sizes[-1]
        self.classes: list[str] = list(classes)
        self.image_size: tuple[int, int] = (int(image_size[0]), int(image_size[1]))
        self.source: Path = Path(info["source"])
        self._info = dict(info)

    @property
    def info(self) -> dict:
        """What the model is: source folder, format (``run``/``export``), model name,
        classes, image size, checkpoint step and validation accuracy."""
        return dict(self._info, classes=list(self.classes), image_size=list(self.image_size))

    def bucket(self, n: int) -> int:
        """The batch shape a chunk of ``n`` images runs at (``n`` <= :attr:`batch_size`)."""
        return next(b for b in self.batch_sizes if b >= n)

    def warm_up(self) -> None:
        """Compile every batch shape now (a server does this before taking requests)."""
        h, w = self.image_size
        for b in self.batch_sizes:
            self.probabilities_of_arrays(np.zeros((b, h, w, 3), np.uint8))

    def decode(self, image: ImageLike) -> np.ndarray:
        """One input as the model's ``uint8`` RGB array (:func:`to_rgb_array`)."""
        return to_rgb_array(image, self.image_size)

    def probabilities_of_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, C)`` of preprocessed ``uint8`` images ``(N, H, W, 3)``.

        Chunks of :attr:`batch_size`, the last padded to :meth:`bucket`; a row's result
        depends only on its image and on that shape, never on the other rows."""
        import jax

        h, w = self.image_size
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            n = len(chunk)
            pad = np.zeros((self.bucket(n), h, w, 3), np.uint8)
            pad[:n] = chunk
            out.append(np.asarray(jax.nn.softmax(self._logits(pad)))[:n])
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
                arrays.append(self.decode(image))
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
            prediction(_name(image, i), p, self.classes, top_k)
            for i, (image, p) in enumerate(zip(items, probs, strict=True))
        ]

    def evaluate(self, folder: str | Path | None = None, batch_size: int = 64) -> dict:
        """Loss, accuracy, per-class precision/recall/F1 and confusion on ``folder``
        (``<folder>/<class>/<image>``; its ``val/`` if it has one). Default: the run's own
        validation split. Every image counts exactly once. Run folders only."""
        if self._trained is None:
            raise SpringfieldError(
                f"{self.source}: an exported model predicts only; evaluate its run folder "
                f"({self._info.get('run') or 'the one it was exported from'})."
            )
        from springfield.trained_run import evaluate_data

        _, _, result = evaluate_data(
            self._trained, None if folder is None else Path(folder), batch_size
        )
        return result

    def __repr__(self) -> str:
        return f"Classifier({self.source}, {len(self.classes)} classes, {self.image_size})"


def _accuracy(run_dir: Path) -> float | None:
    import json

    eval_json = run_dir / "eval.json"
    if not eval_json.exists():
        return None
    return json.loads(eval_json.read_text()).get("accuracy")


def classifier_of_run(trained: Any, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> Classifier:
    """A :class:`Classifier` of a restored run (:func:`springfield.trained_run.load_run`)."""
    from springfield.training.steps import make_eval_step

    step = make_eval_step(trained.graphdef, tta=trained.config.tta)

    def logits(images: np.ndarray) -> Any:
        batch = {
            "image": images,
            "label": np.zeros(len(images), np.int32),
            "mask": np.zeros(len(images), np.float32),
        }
        return step(trained.params, trained.rest, batch)[0]

    info = {
        "source": str(trained.run_dir),
        "format": "run",
        "model": trained.config.model,
        "step": trained.step,
        "val_accuracy": _accuracy(trained.run_dir),
        "tta": trained.config.tta,
    }
    return Classifier(
        logits,
        classes=trained.classes,
        image_size=trained.image_size,
        info=info,
        batch_sizes=batch_sizes,
        trained=trained,
    )


def classifier_of_export(
    exported: Any, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
) -> Classifier:
    """A :class:`Classifier` of a folder read by :func:`springfield.export_reader.load_export`."""
    meta = exported.meta
    info = {
        "source": str(exported.path),
        "format": "export",
        "model": meta.get("model"),
        "step": meta.get("step"),
        "val_accuracy": meta.get("val_accuracy"),
        "tta": meta.get("tta"),
        "run": meta.get("source"),
    }
    return Classifier(
        exported.logits,
        classes=exported.classes,
        image_size=exported.image_size,
        info=info,
        batch_sizes=batch_sizes,
    )


def top_classes(probs: np.ndarray, classes: Sequence[str], top_k: int) -> dict:
    """``{"label", "probability", "top": [{"label", "probability"}, ...]}`` of one row."""
    order = [int(i) for i in np.argsort(-probs, kind="stable")[: min(top_k, len(classes))]]
    top = [{"label": classes[i], "probability": float(probs[i])} for i in order]
    return {"label": top[0]["label"], "probability": top[0]["probability"], "top": top}


def prediction(file: str, probs: np.ndarray, classes: Sequence[str], top_k: int) -> dict:
    """One image's prediction, in the one schema of :meth:`Classifier.predict`,
    ``springfield predict --json`` and ``springfield serve``::

        {"file": "homer.jpg", "label": "homer_simpson", "probability": 0.97,
         "top": [{"label": "homer_simpson", "probability": 0.97}, ...]}

    ``top`` holds the ``top_k`` most likely classes, most likely first; ``label`` and
    ``probability`` repeat the first of them. Probabilities are float32 values as Python
    floats (JSON keeps every digit)."""
    return {"file": file, **top_classes(probs, classes, top_k)}


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list:
    if isinstance(images, list | tuple):
        return list(images)
    return [images]


def load(
    path: str | Path,
    *,
    allow_import: bool = False,
    batch_size: int = 32,
    batch_sizes: Sequence[int] | None = None,
) -> Classifier:
    """Load a run folder written by ``springfield train``, or a folder written by
    ``springfield export`` (told apart by its ``export.json``), as a :class:`Classifier`.

    An exported folder loads without springfield's training code (no flax, optax, grain or
    orbax is imported).

    Args:
        path: the run's ``--workdir``, or an exported folder.
        allow_import: a run trained with a custom ``module:function`` activation imports
            that module (runs its code); refused unless True.
        batch_size: the largest compiled batch shape.
        batch_sizes: all compiled batch shapes; default :data:`DEFAULT_BATCH_SIZES` up to
            ``batch_size``, plus ``batch_size``.

    Raises:
        SpringfieldError: not a run or exported folder, no complete checkpoint, or files that
            disagree.
    """
    from springfield.export_reader import is_export_dir, load_export

    if batch_sizes is None:
        batch_sizes = [b for b in DEFAULT_BATCH_SIZES if b < batch_size] + [batch_size]
    if is_export_dir(path):
        return classifier_of_export(load_export(path), batch_sizes)
    if not (Path(path) / "config.json").exists():
        raise SpringfieldError(
            f"{path}: not a springfield run folder (no config.json) nor an exported model (no "
            "export.json). Pass the --workdir of a train run, or a folder from springfield export."
        )
    from springfield.trained_run import load_run

    return classifier_of_run(load_run(Path(path), allow_import=allow_import), batch_sizes)


__all__ = [
    "DEFAULT_BATCH_SIZES",
    "Classifier",
    "classifier_of_export",
    "classifier_of_run",
    "load",
    "prediction",
    "to_rgb_array",
    "top_classes",
]
