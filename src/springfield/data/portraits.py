"""Procedurally drawn Simpsons portraits: the images of the built-in dataset (synthetic.py).

With no ``--data``, springfield trains on cartoon portraits of Bart, Homer, Lisa and Marge drawn
here with Pillow. Each character is recognisable by its silhouette and a few colours, the way a
person would recognise it:

* Bart: yellow head with a zig-zag crown of spikes, orange-red shirt;
* Homer: bald round head with two curved hairs, an "M" of hair above the ear and a grey-brown
  stubble muzzle, white shirt collar;
* Lisa: round head ringed by star-point spikes, red dress, sometimes a pearl necklace;
* Marge: small face under a tall blue beehive, green dress, red bead necklace.

To keep the task from being trivially separable, every image gets a random background (solid,
gradient, a "room" or a mosaic of shapes), random clutter that reuses the characters' colours
(yellow discs, blue columns, red and green patches, star shapes), random position, scale,
rotation and mirroring, optional partial occlusion, colour jitter and sensor noise. A small CNN
needs a few epochs to pass 90% validation accuracy but gets well above it.

Every image is drawn from its own ``np.random.Generator`` seeded with ``[seed, class, index]``,
so the output does not depend on generation order and the same seed gives the same JPEG bytes
(for a given Pillow/libjpeg build).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "draw_character"]

CLASSES: tuple[str, ...] = ("bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson")

# Drawing at 2x and downsampling with LANCZOS is our antialiasing: ImageDraw has none.
_SUPERSAMPLE = 2

Color = tuple[int, int, int]
Point = tuple[float, float]

_BLACK: Color = (20, 20, 20)
_WHITE: Color = (250, 250, 250)
_SKIN: Color = (254, 217, 15)
_MARGE_BLUE: Color = (40, 90, 200)
_BART_SHIRT: Color = (240, 90, 40)
_LISA_DRESS: Color = (225, 45, 40)
_MARGE_DRESS: Color = (130, 195, 70)
_STUBBLE: Color = (185, 160, 115)
# Clutter reuses the characters' colours so that colour alone never identifies a class.
_DECOY_COLORS: tuple[Color, ...] = (
    _SKIN,
    _SKIN,
    _MARGE_BLUE,
    _MARGE_BLUE,
    _BART_SHIRT,
    _LISA_DRESS,
    _MARGE_DRESS,
    _STUBBLE,
    _WHITE,
    _BLACK,
)


# ---------------------------------------------------------------------------------------------
# Small drawing helpers
# ---------------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, color: Color, amount: int) -> Color:
    """Return `color` with each channel moved by up to +-amount (clipped to 0..255)."""
    r, g, b = (
        int(v) for v in np.clip(np.array(color) + rng.integers(-amount, amount + 1, 3), 0, 255)
    )
    return (r, g, b)


def _random_color(rng: np.random.Generator) -> Color:
    r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
    return (r, g, b)


def _bezier(p0: Point, p1: Point, p2: Point, n: int = 10) -> list[Point]:
    """Points on a quadratic Bezier curve (ImageDraw has no curves, only polylines)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [(float(x), float(y)) for x, y in pts]


def _arc_points(
    cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 16
) -> list[Point]:
    """Points on an elliptical arc from angle a0 to a1 (radians, image y axis points down)."""
    a = np.linspace(a0, a1, n)
    return [(float(cx + rx * math.cos(t)), float(cy + ry * math.sin(t))) for t in a]


class _Pen:
    """ImageDraw wrapper taking unit-square coordinates (x right, y down, centre at 0.5, 0.5).

    It scales, mirrors, rotates and places the character by transforming coordinates, so the
    character is drawn straight onto the canvas: no RGBA layer to rotate and paste, which was
    most of the generation time. Ellipses become polygons so they rotate too.
    """

    def __init__(
        self,
        draw: ImageDraw.ImageDraw,
        side: float,
        center: Point = (0.5, 0.5),
        angle_deg: float = 0.0,
        mirror: bool = False,
    ) -> None:
        self.draw = draw
        self.side = side
        self.lw = max(1, round(0.012 * side))
        a = math.radians(angle_deg)
        flip = -1.0 if mirror else 1.0
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        self._m = rot @ np.diag([flip * side, side])
        self._c = np.asarray(center, dtype=np.float64)

    def _p(self, pts: Sequence[Point]) -> list[Point]:
        xy = (np.asarray(pts, dtype=np.float64) - 0.5) @ self._m.T + self._c
        return [(float(x), float(y)) for x, y in xy]

    def ellipse(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        fill: Color | None,
        outline: Color | None = _BLACK,
    ) -> None:
        n = 12 if max(rx, ry) < 0.03 else 32
        self.polygon(_arc_points(cx, cy, rx, ry, 0.0, 2 * math.pi, n)[:-1], fill, outline)

    def polygon(
        self, pts: Sequence[Point], fill: Color | None, outline: Color | None = _BLACK
    ) -> None:
        self.draw.polygon(self._p(pts), fill=fill, outline=outline, width=self.lw if outline else 0)

    def line(self, pts: Sequence[Point], fill: Color = _BLACK, width: float = 1.0) -> None:
        self.draw.line(self._p(pts), fill=fill, width=max(1, round(self.lw * width)), joint="curve")


def _eyes(pen: _Pen, rng: np.random.Generator, cx: float, cy: float, r: float) -> None:
    """Two big touching white eyes with black pupils looking in a shared random direction."""
    gap = r * rng.uniform(0.85, 1.05)
    look = rng.uniform(-0.35, 0.35, size=2) * r
    for ex in (cx - gap, cx + gap):
        pen.ellipse(ex, cy, r, r * rng.uniform(1.0, 1.1), _WHITE)
        pen.ellipse(ex + look[0], cy + look[1], 0.2 * r, 0.2 * r, _BLACK, None)


def _nose(pen: _Pen, skin: Color, cx: float, cy: float, r: float) -> None:
    pen.ellipse(cx, cy, r * 0.55, r * 0.9, skin)


def _mouth(pen: _Pen, rng: np.random.Generator, cx: float, cy: float, w: float) -> None:
    """Overbite mouth: a wide curved upper lip with a short lower-lip curve tucked under it."""
    smile = rng.uniform(-0.2, 0.45) * w
    pen.line(_bezier((cx - w / 2, cy), (cx, cy + smile), (cx + w / 2, cy - 0.1 * w)), width=1.0)
    lip_y = cy + max(smile, 0) * 0.5 + 0.06 * w
    pen.line(
        _bezier((cx - w * 0.2, lip_y), (cx, lip_y + 0.18 * w), (cx + w * 0.2, lip_y)), width=0.8
    )


def _torso(
    pen: _Pen, color: Color, top: float, half_w: float, skin: Color, neck: float = 0.08
) -> None:
    """Neck (reaching `neck` up into the head) plus a trapezoid of clothing off the bottom."""
    pen.polygon(
        [(0.44, top - neck), (0.56, top - neck), (0.56, top + 0.02), (0.44, top + 0.02)], skin
    )
    pen.polygon(
        [
            (0.5 - half_w * 0.65, top),
            (0.5 + half_w * 0.65, top),
            (0.5 + half_w, 1.02),
            (0.5 - half_w, 1.02),
        ],
        color,
    )


# ---------------------------------------------------------------------------------------------
# The four characters, each in a unit square (x right, y down); the face sits near the middle.
# ---------------------------------------------------------------------------------------------


def _draw_bart(pen: _Pen, rng: np.random.Generator, skin: Color, body: bool) -> None:
    if body:
        _torso(pen, _jitter(rng, _BART_SHIRT, 20), 0.86, rng.uniform(0.26, 0.32), skin)
    x0, x1 = 0.5 - rng.uniform(0.17, 0.21), 0.5 + rng.uniform(0.17, 0.21)
    n = int(rng.integers(7, 11))
    tip, valley = rng.uniform(0.06, 0.1), rng.uniform(0.19, 0.23)
    # The flat-topped head with a zig-zag crown is Bart's silhouette.
    crown = [(x0, valley)]
    for k in range(n):
        crown.append((x0 + (k + 0.5) * (x1 - x0) / n, tip + rng.uniform(-0.015, 0.015)))
        crown.append((x0 + (k + 1) * (x1 - x0) / n, valley))
    chin = _arc_points(0.5, 0.68, (x1 - x0) / 2, 0.14, 0.0, math.pi)
    head = crown + [(x1, 0.68)] + chin[1:-1] + [(x0, 0.68)]
    pen.ellipse(x0, 0.5, 0.04, 0.055, skin)  # ears sit behind the head outline
    pen.ellipse(x1, 0.5, 0.04, 0.055, skin)
    pen.polygon(head, skin)
    _eyes(pen, rng, 0.5, 0.4, rng.uniform(0.065, 0.08))
    _nose(pen, skin, 0.5 + rng.uniform(-0.02, 0.02), 0.5, 0.04)
    _mouth(pen, rng, 0.5, 0.65, rng.uniform(0.16, 0.22))


def _draw_homer(pen: _Pen, rng: np.random.Generator, skin: Color, body: bool) -> None:
    if body:
        _torso(pen, _jitter(rng, _WHITE, 12), 0.86, rng.uniform(0.3, 0.36), skin, neck=0.2)
    rx, ry = rng.uniform(0.19, 0.23), rng.uniform(0.26, 0.3)
    cy = 0.44
    top = cy - ry
    # Ear and the "M" of hair above it, on the left so mirroring moves it to either side.
    pen.ellipse(0.5 - rx, 0.5, 0.045, 0.055, skin)
    pen.polygon(_arc_points(0.5, cy, rx, ry, 0.0, 2 * math.pi, 40), skin)
    ex = 0.5 - rx + 0.02
    pen.line(
        [
            (ex - 0.01, 0.44),
            (ex + 0.01, 0.39),
            (ex + 0.03, 0.43),
            (ex + 0.05, 0.38),
            (ex + 0.06, 0.44),
        ],
        width=1.0,
    )
    pen.line(
        _bezier((0.5 - rx + 0.01, 0.48), (0.5 - rx + 0.04, 0.5), (0.5 - rx + 0.01, 0.53)), width=0.7
    )
    # The two hairs on the bald dome are Homer's signature.
    for dx in (-0.04, 0.03):
        x = 0.5 + dx + rng.uniform(-0.01, 0.01)
        h = rng.uniform(0.09, 0.13)
        pen.line(
            _bezier((x, top + 0.01), (x - 0.08, top - h * 0.5), (x + 0.02, top - h)), width=1.6
        )
    # Grey-brown stubble muzzle across the lower face.
    mcy = cy + ry * rng.uniform(0.62, 0.72)
    pen.ellipse(0.5 + 0.01, mcy, rx * rng.uniform(0.8, 0.92), 0.11, _jitter(rng, _STUBBLE, 18))
    _eyes(pen, rng, 0.51, 0.38, rng.uniform(0.065, 0.08))
    _nose(pen, skin, 0.51, 0.48, 0.045)
    _mouth(pen, rng, 0.52, mcy + 0.01, rng.uniform(0.17, 0.23))


def _draw_lisa(pen: _Pen, rng: np.random.Generator, skin: Color, body: bool) -> None:
    if body:
        _torso(pen, _jitter(rng, _LISA_DRESS, 20), 0.84, rng.uniform(0.2, 0.26), skin)
        if rng.random() < 0.6:
            for px, py in _arc_points(0.5, 0.8, 0.09, 0.06, 0.15 * math.pi, 0.85 * math.pi, 7):
                pen.ellipse(px, py, 0.017, 0.017, _WHITE)
    r = rng.uniform(0.18, 0.21)
    cx, cy = 0.5, 0.55
    n = int(rng.integers(7, 10))
    spike = rng.uniform(0.13, 0.17)
    # Star-point hair: spikes radiating over the top half of a round head.
    a0, a1 = math.pi * 1.02, math.pi * 1.98
    outline: list[Point] = []
    for k in range(n + 1):
        a = a0 + (a1 - a0) * k / n
        outline.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        if k < n:
            am = a + (a1 - a0) / (2 * n)
            ro = r + spike * rng.uniform(0.85, 1.1)
            outline.append((cx + ro * math.cos(am), cy + ro * math.sin(am)))
    outline += _arc_points(cx, cy + 0.02, r, r + 0.01, 0.0, math.pi, 16)
    pen.polygon(outline, skin)
    _eyes(pen, rng, 0.5, 0.52, rng.uniform(0.06, 0.072))
    _nose(pen, skin, 0.5, 0.6, 0.035)
    _mouth(pen, rng, 0.5, 0.68, rng.uniform(0.12, 0.16))


def _draw_marge(pen: _Pen, rng: np.random.Generator, skin: Color, body: bool) -> None:
    blue = _jitter(rng, _MARGE_BLUE, 25)
    if body:
        _torso(pen, _jitter(rng, _MARGE_DRESS, 20), 0.88, rng.uniform(0.24, 0.3), skin)
        for px, py in _arc_points(0.5, 0.82, 0.1, 0.07, 0.1 * math.pi, 0.9 * math.pi, 7):
            pen.ellipse(px, py, 0.02, 0.02, _jitter(rng, (205, 30, 40), 15))
    hw = rng.uniform(0.15, 0.19)  # half width of the beehive
    top = rng.uniform(0.0, 0.06)
    bulge = rng.uniform(0.0, 0.03)
    # A tall rounded column of hair; its shape, not only its blue, marks Marge.
    hive = _arc_points(0.5, top + hw, hw, hw, math.pi, 2 * math.pi, 14)
    hive += [(0.5 + hw + bulge, 0.32), (0.5 + hw, 0.62), (0.5 - hw, 0.62), (0.5 - hw - bulge, 0.32)]
    pen.polygon(hive, blue)
    for _ in range(2):  # a couple of curls hint at the beehive's texture
        y = rng.uniform(top + 0.12, 0.32)
        pen.line(
            _bezier((0.5 - hw * 0.6, y), (0.5, y + 0.04), (0.5 + hw * 0.6, y - 0.01)), width=0.7
        )
    fr = rng.uniform(0.13, 0.16)
    pen.ellipse(0.5, 0.6, fr, 0.19, skin)
    # Fringe over the forehead keeps the hair visibly "on" the head.
    fringe = _arc_points(0.5, 0.44, fr + 0.01, 0.06, math.pi, 2 * math.pi, 10)
    fringe += _arc_points(0.5, 0.44, fr + 0.01, 0.03, 0.0, math.pi, 10)
    pen.polygon(fringe, blue)
    _eyes(pen, rng, 0.5, 0.55, rng.uniform(0.055, 0.066))
    _nose(pen, skin, 0.5, 0.63, 0.033)
    _mouth(pen, rng, 0.5, 0.71, rng.uniform(0.12, 0.16))


_DRAWERS: dict[str, Callable[[_Pen, np.random.Generator, Color, bool], None]] = {
    "bart_simpson": _draw_bart,
    "homer_simpson": _draw_homer,
    "lisa_simpson": _draw_lisa,
    "marge_simpson": _draw_marge,
}


# ---------------------------------------------------------------------------------------------
# Backgrounds, clutter and photometric noise
# ---------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    kind = rng.choice(4)
    if kind == 0:  # solid
        return Image.new("RGB", (w, h), _random_color(rng))
    if kind == 1:  # linear gradient in a random direction
        c0 = np.array(_random_color(rng), np.float32)
        c1 = np.array(_random_color(rng), np.float32)
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx / w * math.cos(a) + yy / h * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        arr = c0 + t[..., None] * (c1 - c0)
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    img = Image.new("RGB", (w, h), _random_color(rng))
    d = ImageDraw.Draw(img)
    if kind == 2:  # a room: wall, floor, and a few framed rectangles (window, picture, door)
        floor = int(h * rng.uniform(0.55, 0.85))
        d.rectangle([0, floor, w, h], fill=_random_color(rng))
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, floor * 0.7)
            x1, y1 = x0 + rng.uniform(0.1, 0.35) * w, y0 + rng.uniform(0.1, 0.4) * h
            d.rectangle(
                [x0, y0, x1, y1],
                fill=_random_color(rng),
                outline=_random_color(rng),
                width=max(1, w // 80),
            )
        return img
    for _ in range(int(rng.integers(4, 10))):  # mosaic of large shapes
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.2, 0.6) * w, y0 + rng.uniform(0.2, 0.6) * h
        if rng.random() < 0.5:
            d.rectangle([x0, y0, x1, y1], fill=_random_color(rng))
        else:
            d.ellipse([x0, y0, x1, y1], fill=_random_color(rng))
    return img


def _clutter(rng: np.random.Generator, d: ImageDraw.ImageDraw, w: int, h: int, big: float) -> None:
    """One distractor shape; `big` scales it (occluders are drawn smaller than background junk)."""
    color = _DECOY_COLORS[rng.integers(len(_DECOY_COLORS))] if rng.random() < 0.6 else None
    fill = _jitter(rng, color, 20) if color else _random_color(rng)
    m = min(w, h)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    sx, sy = rng.uniform(0.04, 0.25) * m * big, rng.uniform(0.04, 0.25) * m * big
    outline = _BLACK if rng.random() < 0.5 else None
    lw = max(1, m // 120)
    kind = rng.choice(6)
    if kind == 0:
        d.ellipse([cx - sx, cy - sy, cx + sx, cy + sy], fill=fill, outline=outline, width=lw)
    elif kind == 1:
        d.rectangle([cx - sx, cy - sy, cx + sx, cy + sy], fill=fill, outline=outline, width=lw)
    elif kind == 2:  # tall rounded column, a decoy for Marge's beehive colour
        # A hand-made capsule polygon: Pillow's rounded_rectangle rejects some float boxes.
        rr, half = sx * 0.4, max(sy * 1.6 - sx * 0.4, 0.0)
        pts = _arc_points(cx, cy - half, rr, rr, math.pi, 2 * math.pi, 10)
        pts += _arc_points(cx, cy + half, rr, rr, 0.0, math.pi, 10)
        d.polygon(pts, fill=fill, outline=outline, width=lw)
    elif kind == 3:  # star / spiky blob, a decoy for Bart's and Lisa's spikes
        n = int(rng.integers(5, 10))
        pts = []
        rot = rng.uniform(0, 2 * math.pi)
        for k in range(2 * n):
            r = sx if k % 2 == 0 else sx * rng.uniform(0.4, 0.6)
            a = rot + math.pi * k / n
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        d.polygon(pts, fill=fill, outline=outline, width=lw)
    elif kind == 4:  # random triangle
        pts = [(cx + rng.uniform(-sx, sx) * 1.5, cy + rng.uniform(-sy, sy) * 1.5) for _ in range(3)]
        d.polygon(pts, fill=fill, outline=outline, width=lw)
    else:  # thick stroke
        d.line([cx - sx, cy - sy, cx + sx, cy + sy], fill=fill, width=max(2, int(m * 0.02 * big)))


def _photometric(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Per-channel gain, brightness/contrast shift and Gaussian noise, so exact colour values
    (e.g. the skin's #FED90F) are never a reliable feature."""
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.88, 1.12, size=3).astype(np.float32)
    contrast = np.float32(rng.uniform(0.8, 1.15))
    offset = np.float32(rng.uniform(-18, 18))
    # float64 mean: a float32 SIMD sum may round differently across CPUs and change the bytes.
    mean = np.float32(arr.mean(dtype=np.float64))
    arr = (arr - mean) * contrast + mean
    arr = arr * gain + offset
    sigma = rng.uniform(0.0, 7.0)
    if sigma > 0.5:
        arr += rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def draw_character(
    name: str, rng: np.random.Generator, size: tuple[int, int] = (128, 128)
) -> Image.Image:
    """Draw one RGB portrait of `name` (one of CLASSES); size is (height, width).

    All randomness (pose, background, clutter, occlusion, colour jitter, noise) comes from `rng`,
    so a generator seeded the same way gives the same image.
    """
    try:
        drawer = _DRAWERS[name]
    except KeyError:
        raise ValueError(f"unknown character {name!r}; expected one of {CLASSES}") from None
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width), got {size}")
    w, h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    m = min(w, h)

    canvas = _background(rng, w, h)
    d = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 7))):
        _clutter(rng, d, w, h, 1.0)

    side = m * rng.uniform(0.6, 1.05)
    # Let up to ~12% of the unit square fall off the sides/top (and more at the bottom, where
    # only the clothes are), but keep the head in frame: it carries the identity.
    lo_x, hi_x = -0.12 * side, w - 0.88 * side
    lo_y, hi_y = -0.08 * side, h - 0.75 * side
    cx = (rng.uniform(lo_x, hi_x) if hi_x > lo_x else (w - side) / 2) + side / 2
    cy = (rng.uniform(lo_y, hi_y) if hi_y > lo_y else (h - side) / 2) + side / 2
    pen = _Pen(d, side, (cx, cy), float(rng.uniform(-15, 15)), bool(rng.random() < 0.5))
    drawer(pen, rng, _jitter(rng, _SKIN, 14), bool(rng.random() < 0.85))

    if rng.random() < 0.3:  # partial occlusion by a smaller shape in front
        _clutter(rng, d, w, h, 0.6)

    img = canvas.resize((width, height), Image.Resampling.LANCZOS)
    return _photometric(rng, img)
