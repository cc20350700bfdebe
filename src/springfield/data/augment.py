"""Seeded image augmentation run inside grain workers, on uint8 arrays.

Presets are named so configs stay plain strings: ``none``, ``flip``, ``light`` and
``standard``. Each is a picklable object, because grain spawns its workers and sends them
the transform.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from springfield.errors import SpringfieldError


@dataclass(frozen=True)
class Augment:
    """Random resized crop, horizontal flip, small rotation, colour jitter, random greyscale,
    random erasing.

    ``crop_scale`` is the range of the crop's area as a fraction of the image; ``(1, 1)``
    disables cropping. ``rotate`` is the maximum angle in degrees. ``jitter`` scales
    brightness, contrast and saturation by factors in ``[1 - jitter, 1 + jitter]``.
    ``erase`` is the chance of random erasing (Zhong et al., 2020): a box of 2-25% of the
    image, aspect ratio 0.3-3.3, filled with uniform noise. ``gray`` is the chance of
    replacing the colours by their luma (kept as three channels), after the jitter.
    ``style`` is the chance of one drawing-style change (:func:`stylise`: posterise,
    edge-preserving smoothing, dark outlines, a small hue turn or JPEG re-compression),
    after the jitter and before the greyscale.
    """

    flip: bool = True
    crop_scale: tuple[float, float] = (1.0, 1.0)
    rotate: float = 0.0
    jitter: float = 0.0
    erase: float = 0.0
    gray: float = 0.0
    style: float = 0.0

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        img = element["image"]
        h, w = img.shape[:2]
        # An element tagged by EarlySize is also scaled to that size, in the crop's resample.
        oh, ow = element.get("size", (h, w))
        if self.crop_scale != (1.0, 1.0) or self.rotate or (oh, ow) != (h, w):
            pil = Image.fromarray(img)
            if self.rotate:
                angle = float(rng.uniform(-self.rotate, self.rotate))
                pil = pil.rotate(angle, resample=Image.BILINEAR, fillcolor=_edge_colour(img))
            box = None
            if self.crop_scale != (1.0, 1.0):
                area = rng.uniform(*self.crop_scale)
                aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                cw = min(1.0, np.sqrt(area * aspect)) * w
                ch = min(1.0, np.sqrt(area / aspect)) * h
                x0 = rng.uniform(0, w - cw)
                y0 = rng.uniform(0, h - ch)
                box = (x0, y0, x0 + cw, y0 + ch)
            if box is not None or (oh, ow) != (h, w):
                # Pillow widens its filter when shrinking: antialiased at any scale.
                pil = pil.resize((ow, oh), Image.BILINEAR, box=box)
            img = np.asarray(pil)
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        if self.jitter:
            img = _colour_jitter(img, rng, self.jitter)
        # Only drawn when enabled, so runs without --style keep their random stream.
        if self.style and rng.random() < self.style:
            img = stylise(img, rng)
        if self.gray and rng.random() < self.gray:
            img = _grey(img)
        if self.erase and rng.random() < self.erase:
            img = _erase(img, rng)
        out = {k: v for k, v in element.items() if k != "size"}
        out["image"] = np.ascontiguousarray(img)
        return out


def _edge_colour(img: np.ndarray) -> tuple[int, int, int]:
    # Filling rotated corners with the border's mean colour avoids black wedges that a model
    # could learn as a cue.
    edge = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return tuple(int(v) for v in edge.mean(axis=0))


def _colour_jitter(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    # Brightness, contrast (about the image mean) and saturation (about each pixel's grey)
    # are all linear in the pixel, so they fold into one 3x3 matrix and an offset: one
    # pass instead of six (0.8 -> 0.2 ms at 112 px; a pixel rounds differently about once
    # in 200,000).
    b, c, sat = rng.uniform(1 - s, 1 + s, size=3)
    mat = c * b * (sat * np.eye(3) + (1 - sat) / 3)
    offset = (1 - c) * b * img.mean()
    x = img.reshape(-1, 3).astype(np.float32) @ mat.T.astype(np.float32)
    x += np.float32(offset)
    return np.clip(x, 0, 255, out=x).astype(np.uint8).reshape(img.shape)


def _grey(img: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma, Pillow's "L" conversion: the weights sum to 1, so no clipping.
    y = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.rint(y).astype(np.uint8)[..., None], 3, axis=-1)


def _erase(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    area = rng.uniform(0.02, 0.25) * h * w
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
    eh = min(h, max(1, round(np.sqrt(area * aspect))))
    ew = min(w, max(1, round(np.sqrt(area / aspect))))
    y0 = rng.integers(0, h - eh + 1)
    x0 = rng.integers(0, w - ew + 1)
    img = np.array(img)  # the input may be a read-only view of the cache
    img[y0 : y0 + eh, x0 : x0 + ew] = rng.integers(0, 256, (eh, ew, img.shape[2]), np.uint8)
    return img


STYLES = ("posterise", "smooth", "outline", "hue", "jpeg")
# A hue turn beyond this starts to change who it is: Marge's blue hair, Lisa's red dress.
MAX_HUE_DEGREES = 20.0


def stylise(img: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """One change of drawing style that keeps who is in the picture (uint8 HWC in and out).

    ``kind`` (default: one of :data:`STYLES` at random):

    * ``posterise``: 2-4 bits per channel, the flat colours of print and fan art;
    * ``smooth``: a 3x3 or 5x5 median filter, which flattens texture but keeps edges;
    * ``outline``: dark lines where the luma gradient is strong, as inked drawings have;
    * ``hue``: the hue turned by at most :data:`MAX_HUE_DEGREES` (other palettes, lighting);
    * ``jpeg``: re-compressed at quality 15-50, the blocks and ringing of web images.
    """
    kind = STYLES[int(rng.integers(len(STYLES)))] if kind is None else kind
    if kind == "posterise":
        shift = 8 - int(rng.integers(2, 5))
        # The middle of each level, not its floor: posterising must not darken the image.
        return ((img >> shift) << shift) + np.uint8(1 << (shift - 1))
    pil = Image.fromarray(img)
    if kind == "smooth":
        return np.asarray(pil.filter(ImageFilter.MedianFilter(int(rng.choice([3, 5])))))
    if kind == "outline":
        edges = np.asarray(pil.convert("L").filter(ImageFilter.FIND_EDGES))
        lines = edges > rng.uniform(40, 90)
        # FIND_EDGES sees the image border as an edge: no frame, which would be a cue.
        lines[[0, -1], :] = lines[:, [0, -1]] = False
        out = np.array(img)
        out[lines] = (out[lines] * rng.uniform(0.0, 0.3)).astype(np.uint8)
        return out
    if kind == "hue":
        hsv = np.array(pil.convert("HSV"))
        turn = rng.uniform(-MAX_HUE_DEGREES, MAX_HUE_DEGREES) / 360 * 256
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(turn))) % 256
        return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if kind == "jpeg":
        import io

        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=int(rng.integers(15, 51)))
        return np.asarray(Image.open(buf).convert("RGB"))
    raise ValueError(f"unknown style {kind!r}; one of {STYLES}")


@dataclass(frozen=True)
class EarlySize:
    """Tag the first ``until`` elements of the training stream with ``size`` (H, W), which
    :class:`Augment` then resizes them to (progressive resizing).

    A grain ``map_with_index`` transform placed before augmentation: ``until`` counts
    elements of the whole repeated stream, a whole number of batches, so no batch mixes two
    sizes.
    """

    until: int
    size: tuple[int, int]

    def __call__(self, index: int, element: dict) -> dict:
        return {**element, "size": self.size} if index < self.until else element


PRESETS: dict[str, Augment | None] = {
    "none": None,
    "flip": Augment(flip=True),
    "light": Augment(flip=True, crop_scale=(0.7, 1.0), jitter=0.1),
    "standard": Augment(flip=True, crop_scale=(0.5, 1.0), rotate=10.0, jitter=0.25),
}


def make_augment(
    name: str, *, erase: float = 0.0, gray: float = 0.0, style: float = 0.0
) -> Augment | None:
    """The augmentation preset called ``name`` plus random erasing with chance ``erase``,
    random greyscale with chance ``gray`` and a drawing-style change with chance ``style``
    (``None`` when that adds up to no augmentation)."""
    try:
        aug = PRESETS[name]
    except KeyError:
        raise SpringfieldError(
            f"--augment {name!r}: unknown preset; choose one of {', '.join(PRESETS)}."
        ) from None
    if not erase and not gray and not style:
        return aug
    return replace(aug or Augment(flip=False), erase=erase, gray=gray, style=style)
