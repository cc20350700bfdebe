"""Decode one image file (or its bytes) into a fixed-size RGB ``uint8`` array.

This is the only place springfield touches image codecs, and it runs inside the input
pipeline (thread pools in :mod:`springfield.data.cache`), so it is built to be

* **robust**: every failure (unknown format, truncated data, decompression bomb, unreadable
  path, codec error) becomes a :class:`~springfield.errors.BadImageError` whose message is a
  short, one-line reason without the path (callers prefix the path themselves). A bad file
  must never take a worker down;
* **content-based**: formats are sniffed from the first bytes, never from the extension, and
  only the six formats a classifier dataset realistically holds are handed to Pillow (which
  keeps e.g. Ghostscript-backed EPS out of reach of a file merely named ``.jpg``);
* **bounded in memory**: the pixel count is read from the header and checked against
  :data:`MAX_PIXELS` before any pixel is decoded;
* **fast**: JPEGs are decoded at reduced size in the DCT domain (``Image.draft``) when a
  target size is given.

Resizing squashes: ``size=(h, w)`` gives exactly ``h x w`` pixels and does *not* preserve the
aspect ratio (no crop, no padding), as in the tutorial this project follows.

Measured on one core of the (shared, noisy: +-10 %) dev box with Pillow 13.0 /
libjpeg-turbo 3.2: a 400x300 quality-90 photo JPEG held in memory, ``load_rgb(data, size)``
in a loop, against the same open/load/convert/resize without ``draft()``::

    target     with draft (default)    without draft    full decode, no resize
    64x64      ~1950 img/s             ~850 img/s       ~1800 img/s
    128x128    ~1170 img/s             ~680 img/s

About a third of the 128x128 time is Pillow's resize itself; BILINEAR instead of BICUBIC would
give ~2300 / ~1450 img/s (see :data:`_RESAMPLE` for why we pay that).
"""

from __future__ import annotations

import codecs
import io
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from springfield.errors import BadImageError

__all__ = ["MAX_PIXELS", "SUPPORTED_FORMATS", "load_rgb", "probe_image", "sniff_format"]

MAX_PIXELS = 89_478_485
"""Largest width*height we decode (Pillow's default ``MAX_IMAGE_PIXELS``, ~89 Mpx, i.e. about
256 MiB as RGB). Checked against the header before decoding, independently of Pillow's own
(warning-only up to twice this) decompression-bomb check and of whatever a caller has set
``Image.MAX_IMAGE_PIXELS`` to."""

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
"""Formats :func:`sniff_format` recognises and :func:`load_rgb` decodes (Pillow names)."""

# Enough for every magic number below and for a meaningful "is this text?" guess.
_HEAD_BYTES = 512

# DIB header sizes Pillow's BMP plugin understands. "BM" alone is too weak a signature: a
# text file may start with it, but never followed by one of these as a little-endian u32.
_BMP_DIB_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic + BigTIFF

# Transpositions for EXIF orientations 2..8 (same table as ImageOps.exif_transpose). We apply
# them ourselves so that the transpose runs on the small resized image and so that images
# without orientation are not copied (exif_transpose returns a full copy in that case).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

# Resize filter, picked by measurement (one core; quality = PSNR against an exact float
# area-average downscale, cross-checked against float LANCZOS; 400x300 and 2000x1500 photos
# to 64x64 and 128x128). Pillow's filters are all antialiased (support scales with the
# reduction), so BILINEAR is not aliased, only blurrier: BICUBIC scored 1.5-4 dB above it
# against both references, BOX was no better than BILINEAR after draft(), and LANCZOS was
# slower without beating BICUBIC against the area reference. BICUBIC costs ~10-20 % over
# BILINEAR in the JPEG draft path (libjpeg's DCT scaling has already done most of the work).
# reducing_gap=3 box-reduces by an integer factor while the image stays >= 3x the target
# before the bicubic pass: 3.5-6x faster on a 2000x1500 image for <= 0.4 dB. After draft()
# it usually does nothing (the shorter-ratio axis is already within 2x of the target).
_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_PIXELS_IN_MSG = re.compile(r"\((\d+) pixels\)")


def sniff_format(head: bytes) -> str | None:
    """Image format from the first bytes ('JPEG', 'PNG', 'GIF', 'BMP', 'WEBP', 'TIFF'), or None.

    Identify files by content, not by extension. ``head`` should hold at least the first 18
    bytes of the file (shorter input is fine but can only match the shorter signatures).
    """
    head = bytes(head[:18])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(_TIFF_MAGICS):
        return "TIFF"
    if (
        head.startswith(b"BM")
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES
    ):
        return "BMP"
    return None


def probe_image(path: Path) -> tuple[int, int]:
    """Cheap validity check for a folder scan; return ``(height, width)``.

    Reads only the header (no pixel decoding): the format must be one of
    :data:`SUPPORTED_FORMATS` by content, the header must parse, and width*height must not
    exceed :data:`MAX_PIXELS`. The size is the one :func:`load_rgb` (without ``size``) would
    return, i.e. after the EXIF orientation, when the orientation sits in the header (it
    always does for JPEG, WebP and TIFF; for PNG only when the eXIf chunk precedes the pixel
    data, which is the usual layout).

    A truncated or corrupt *body* is not detected here (that needs a full decode);
    :func:`load_rgb` reports it.

    Raises:
        BadImageError: with a short reason, e.g. ``'empty file'``, ``'not an image (text?)'``,
            ``'truncated or corrupt PNG header'``, ``'too large: 30000x30000 px (limit 89
            Mpx)'``, ``'permission denied'``, ``'unreadable: is a directory'``.
    """
    fmt: str | None = None
    try:
        with _source(path) as fp:
            fmt = _identify(fp)
            with _open(fp, fmt) as im:
                width, height = im.size
                # PNG's getexif() decodes the whole image when the eXIf chunk comes after the
                # pixel data; a probe must stay header-only, so it skips that case.
                if fmt != "PNG" or "exif" in im.info:
                    if _orientation(im) in _SWAPS_AXES:
                        width, height = height, width
                return height, width
    except BadImageError:
        raise
    except Exception as e:  # Pillow raises a zoo of types for bad data; see _reason()
        raise BadImageError(_reason(e, fmt)) from e


def load_rgb(path_or_bytes: Path | bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) to a writable RGB ``uint8`` array of shape (H, W, 3).

    * The format is sniffed from content (a PNG named ``.jpg`` decodes fine).
    * Only the first frame of animated / multi-page files (GIF, APNG, WebP, TIFF) is used.
    * The EXIF orientation is applied, so the array is upright as a viewer shows it.
    * Transparency (RGBA, LA, palette or colour-key transparency) is composited on white.
    * 16-bit grayscale is scaled to 8 bits (65535 -> 255, 32768 -> 128), not clipped;
      CMYK is converted with Pillow's (profile-free) conversion; 1-bit becomes 0/255.

    Args:
        path_or_bytes: a path (``Path`` or ``str``) or the encoded file content
            (``bytes``, ``bytearray`` or ``memoryview``).
        size: ``(height, width)`` of the output. The image is *squashed* to exactly this size:
            the aspect ratio is not preserved, like the tutorial this project reproduces.
            JPEGs are first decoded at a reduced scale in the DCT domain (``Image.draft``,
            which never goes below the requested size), then resized with Pillow's
            antialiased BICUBIC filter. ``None`` returns the full-size image.

    Raises:
        BadImageError: for anything that cannot be decoded (never another exception type
            for bad input); the message is a short one-line reason.
        ValueError: if ``size`` is not two positive ints (a caller bug, not a bad image).
    """
    target = _check_size(size)
    fmt: str | None = None
    try:
        with _source(path_or_bytes) as fp:
            fmt = _identify(fp)
            with _open(fp, fmt) as im:
                return _decode(im, fmt, target)
    except BadImageError:
        raise
    except Exception as e:  # Pillow raises a zoo of types for bad data; see _reason()
        raise BadImageError(_reason(e, fmt)) from e


# --------------------------------------------------------------------------------------------
# helpers


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (h, w)):
        raise ValueError(f"size must be two ints (height, width), got {size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(h), int(w)


@contextmanager
def _source(path_or_bytes: Path | str | bytes | bytearray | memoryview) -> Iterator[IO[bytes]]:
    """A seekable binary stream over the input, closed on exit."""
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        yield io.BytesIO(path_or_bytes)
        return
    name = os.fspath(path_or_bytes)
    # stat() first: open() on a FIFO would block forever, and directories / devices should get
    # a clear reason rather than a codec error. stat() follows symlinks, so a loop is an
    # OSError (ELOOP) here.
    st = os.stat(name)
    if stat.S_ISDIR(st.st_mode):
        raise BadImageError("unreadable: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError("unreadable: not a regular file")
    if st.st_size == 0:
        raise BadImageError("empty file")
    with open(name, "rb") as fp:
        yield fp


def _identify(fp: IO[bytes]) -> str:
    """Sniff the format of the stream (rewound afterwards) or raise BadImageError."""
    head = fp.read(_HEAD_BYTES)
    fp.seek(0)
    if not head:
        raise BadImageError("empty file")
    fmt = sniff_format(head)
    if fmt is not None:
        return fmt
    if _looks_like_text(head):
        raise BadImageError("not an image (text?)")
    # An ISO base media file ("ftyp" box) is what phones save as HEIC/AVIF.
    if head[4:8] == b"ftyp":
        raise BadImageError("not a supported image format (HEIC/AVIF?); convert to JPEG or PNG")
    raise BadImageError("not an image (unrecognised content)")


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        # Incremental so a multi-byte character cut off at the end of `head` is not an error.
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text.lstrip("\ufeff"))


def _open(fp: IO[bytes], fmt: str) -> ImageFile.ImageFile:
    """Open (header only) as ``fmt`` and enforce MAX_PIXELS before anything is decoded."""
    im = Image.open(fp, formats=[fmt])
    width, height = im.size
    if width <= 0 or height <= 0:
        im.close()
        raise BadImageError(f"corrupt {fmt} header (size {width}x{height})")
    if width * height > MAX_PIXELS:
        im.close()
        raise BadImageError(f"too large: {width}x{height} px (limit {_mpx(MAX_PIXELS)})")
    return im


def _decode(im: ImageFile.ImageFile, fmt: str, target: tuple[int, int] | None) -> np.ndarray:
    orientation = 1
    if fmt == "JPEG":
        # Must be known before load(): draft() is told the size in stored (unrotated) pixels.
        orientation = _orientation(im)
        if target is not None:
            # DCT-domain downscale by 1/2, 1/4 or 1/8: Pillow picks the largest factor that
            # keeps both sides >= the request, so the final resize never upsamples a draft.
            im.draft("RGB", _stored_wh(target, orientation))
    im.load()
    if fmt != "JPEG":
        orientation = _orientation(im)  # after load(): PNG may keep eXIf after the pixels
    rgb = _to_rgb(im)
    if target is not None:
        # Resize before transposing (equivalent, as the filters are symmetric) so that the
        # transpose touches only the small output, not the full-resolution decode.
        resize_to = _stored_wh(target, orientation)
        if rgb.size != resize_to:
            rgb = rgb.resize(resize_to, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    # np.array, not np.asarray: the latter is a read-only view of an immutable bytes object
    # and downstream augmentation writes in place.
    out = np.array(rgb, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:  # defensive: a mode _to_rgb did not anticipate
        raise BadImageError(f"unsupported {fmt} pixel layout {out.shape} (mode {im.mode})")
    return out


def _stored_wh(target: tuple[int, int], orientation: int) -> tuple[int, int]:
    """Pillow (width, height) in the file's stored orientation for a displayed (h, w)."""
    h, w = target
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def _orientation(im: Image.Image) -> int:
    # A corrupt EXIF block should not cost us an otherwise fine image: treat it as upright.
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips 16-bit values at 255 (all but black turns white), so
        # rescale: round(v * 255 / 65535). Mode "I" (32-bit) is assumed to hold 16-bit data,
        # as it does when Pillow or a TIFF writer widens 16-bit grayscale to it.
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        # convert("RGBA") also turns palette / colour-key transparency into an alpha channel
        # and un-premultiplies RGBa/La. Composite on white: black would turn transparent
        # line art and logos (common in scraped sets) into black blobs.
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    # L, 1, P, CMYK, YCbCr, LAB, HSV, F; ValueError for anything else -> BadImageError.
    return im.convert("RGB")


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} Mpx"


def _reason(e: BaseException, fmt: str | None) -> str:
    """One-line, path-free reason for an exception raised while opening/decoding."""
    what = fmt or "image"
    if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
        # Pillow's own check fired first (beyond twice its limit, or its warning was turned
        # into an error); it only tells us the pixel count.
        m = _PIXELS_IN_MSG.search(str(e))
        got = _mpx(int(m.group(1))) if m else "decompression bomb"
        return f"too large: {got} (limit {_mpx(MAX_PIXELS)})"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, OSError) and e.errno is not None:
        # A real I/O error (ELOOP, EIO, ENOENT, ...), as opposed to Pillow's errno-less
        # OSErrors for bad data.
        return f"unreadable: {e.strerror or e}"
    if isinstance(e, UnidentifiedImageError):
        # The magic matched but Pillow could not parse the header.
        return f"truncated or corrupt {what} header"
    msg = " ".join(str(e).split())  # one line
    if isinstance(e, EOFError) or "truncated" in msg.lower():
        return f"truncated {what} file"
    if isinstance(e, MemoryError):
        return f"corrupt {what}: out of memory while decoding"
    if len(msg) > 120:
        msg = msg[:117] + "..."
    return f"corrupt {what}: {msg or type(e).__name__}"
