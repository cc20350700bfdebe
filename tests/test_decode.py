"""Tests for springfield.data.decode: real files written with Pillow, plus fuzzing."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from springfield.data import decode
from springfield.data.decode import MAX_PIXELS, load_rgb, probe_image, sniff_format
from springfield.errors import BadImageError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def photo(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    """Smooth gradients plus mild noise: compresses and decodes like a photo, not like noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = np.random.default_rng(seed).normal(0, 8, (h, w, 3))
    a = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 7) * np.cos(y / 5)], -1)
    return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8))


def close(pixel: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(colour)) <= tol))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim width x height (CRC fixed up)."""
    data = bytearray(encode(Image.new("1", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ------------------------------------------------------------------------------------------
# sniff_format


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {}), ("TIFF", {})],
)
def test_sniff_format_recognises_each_supported_format(fmt: str, kw: dict) -> None:
    data = encode(photo(8, 8), fmt, **kw)
    assert sniff_format(data[:32]) == fmt
    assert sniff_format(data) == fmt


def test_sniff_format_bigtiff_and_big_endian_tiff() -> None:
    assert sniff_format(b"MM\x00*\x00\x00\x00\x08" + bytes(10)) == "TIFF"
    assert sniff_format(b"II+\x00\x08\x00\x00\x00" + bytes(10)) == "TIFF"


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"\xff\xd8",  # too short to be sure
        b"hello, world\n",
        b"<!DOCTYPE html><html><head>",
        b"BMW 3 series, 1998, 150000 km\n",  # "BM" but no DIB header size after it
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"\x00\x00\x00\x1cftypheic",
        b"P6\n4 4\n255\n",  # PPM: Pillow could open it, we deliberately do not
    ],
)
def test_sniff_format_rejects_non_images(head: bytes) -> None:
    assert sniff_format(head) is None


# ------------------------------------------------------------------------------------------
# load_rgb: formats, modes, sizes


def test_jpeg_decodes_to_writable_uint8_rgb(tmp_path: Path) -> None:
    path = write(tmp_path, "a.jpg", encode(Image.new("RGB", (40, 30), RED), "JPEG"))
    out = load_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    assert out.flags.writeable and out.flags.c_contiguous
    assert close(out[15, 20], RED)
    small = load_rgb(path, size=(16, 20))
    assert small.shape == (16, 20, 3) and close(small[8, 10], RED)


def test_size_squashes_without_preserving_aspect(tmp_path: Path) -> None:
    im = photo(400, 300)
    path = write(tmp_path, "p.jpg", encode(im, "JPEG", quality=90))
    assert load_rgb(path, size=(64, 64)).shape == (64, 64, 3)
    assert load_rgb(path, size=(128, 32)).shape == (128, 32, 3)
    assert load_rgb(path, size=(500, 700)).shape == (500, 700, 3)  # upscaling works too


def test_draft_output_close_to_full_decode() -> None:
    """DCT-domain downscaling must not change the picture, only the cost."""
    data = encode(photo(400, 300), "JPEG", quality=92)
    with Image.open(io.BytesIO(data)) as im:
        reference = np.asarray(
            im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC), dtype=float
        )
    out = load_rgb(data, size=(64, 64)).astype(float)
    assert np.abs(out - reference).mean() < 4


def test_png_named_jpg_is_decoded_by_content(tmp_path: Path) -> None:
    path = write(tmp_path, "really_a_png.jpg", encode(Image.new("RGB", (5, 4), BLUE), "PNG"))
    out = load_rgb(path)
    assert out.shape == (4, 5, 3) and (out == BLUE).all()
    assert probe_image(path) == (4, 5)


@pytest.mark.parametrize(("fmt", "kw"), [("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_other_formats_decode_exactly(fmt: str, kw: dict) -> None:
    im = photo(17, 9)
    out = load_rgb(encode(im, fmt, **kw))
    np.testing.assert_array_equal(out, np.asarray(im))


def test_grayscale(tmp_path: Path) -> None:
    path = write(tmp_path, "g.png", encode(Image.new("L", (6, 3), 100), "PNG"))
    out = load_rgb(path)
    assert out.shape == (3, 6, 3) and (out == 100).all()
    gray_jpeg = load_rgb(encode(Image.new("L", (64, 48), 200), "JPEG"), size=(8, 8))
    assert gray_jpeg.shape == (8, 8, 3) and (np.abs(gray_jpeg.astype(int) - 200) <= 2).all()


def test_one_bit_image() -> None:
    im = Image.new("1", (4, 2), 0)
    im.putpixel((1, 0), 1)
    out = load_rgb(encode(im, "PNG"))
    assert out.shape == (2, 4, 3)
    assert (out[0, 1] == 255).all() and (out[0, 0] == 0).all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_composites_on_white(fmt: str) -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, *BLUE] + [0] * (256 * 3 - 6))
    im.putpixel((1, 1), 1)
    out = load_rgb(encode(im, fmt, transparency=0))
    assert tuple(out[0, 0]) == WHITE  # transparent black -> white, not black
    assert tuple(out[1, 1]) == BLUE


def test_rgba_composites_on_white() -> None:
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    im.putpixel((2, 0), (0, 0, 255, 255))  # opaque blue
    out = load_rgb(encode(im, "PNG"))
    assert tuple(out[0, 0]) == WHITE
    assert close(out[0, 1], (127, 127, 127), tol=1)
    assert tuple(out[0, 2]) == BLUE


def test_la_composites_on_white() -> None:
    out = load_rgb(encode(Image.new("LA", (2, 2), (0, 0)), "PNG"))
    assert (out == 255).all()


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [((0, 255, 255, 0), RED), ((255, 0, 0, 0), (0, 255, 255)), ((0, 0, 0, 0), WHITE),
     ((0, 0, 0, 255), (0, 0, 0))],
)  # fmt: skip
def test_cmyk_jpeg_colours_are_sane(cmyk: tuple[int, ...], rgb: tuple[int, int, int]) -> None:
    data = encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=95)
    out = load_rgb(data)
    assert out.shape == (16, 16, 3) and close(out[8, 8], rgb, tol=20)
    assert load_rgb(data, size=(4, 4)).shape == (4, 4, 3)


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[65535, 32768, 0, 257, 1000]], dtype=np.uint16))
    path = write(tmp_path, "deep.png", encode(im, "PNG"))
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a 16-bit file
    out = load_rgb(path)
    assert out.shape == (1, 5, 3)
    assert list(out[0, :, 0]) == [255, 128, 0, 1, 4]
    assert (out == out[..., :1]).all()  # still gray


@pytest.mark.parametrize("size", [None, (64, 32), (32, 32)])
def test_exif_orientation_6_rotates_clockwise(tmp_path: Path, size: tuple | None) -> None:
    # Stored 400 wide x 200 high with a red top-left block; orientation 6 means "rotate 90
    # degrees clockwise to display", so it shows 200 wide x 400 high, red top-right.
    stored = Image.new("RGB", (400, 200), BLUE)
    stored.paste(RED, (0, 0, 100, 50))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write(tmp_path, "rot.jpg", encode(stored, "JPEG", exif=exif, quality=95))
    out = load_rgb(path, size=size)
    h, w = size or (400, 200)
    assert out.shape == (h, w, 3)
    assert close(out[h // 20, w - 1 - w // 20], RED, tol=30)  # top-right
    assert close(out[h // 20, w // 20], BLUE, tol=30)  # top-left
    assert close(out[h - 1 - h // 20, w - 1 - w // 20], BLUE, tol=30)  # bottom-right
    assert probe_image(path) == (400, 200)


def test_exif_orientation_3_and_png(tmp_path: Path) -> None:
    stored = Image.new("RGB", (20, 10), BLUE)
    stored.putpixel((0, 0), RED)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    out = load_rgb(encode(stored, "PNG", exif=exif))
    assert out.shape == (10, 20, 3) and tuple(out[-1, -1]) == RED


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_is_ignored() -> None:
    data = encode(Image.new("RGB", (8, 8), RED), "JPEG", exif=b"Exif\x00\x00II*\x00garbage")
    assert close(load_rgb(data)[4, 4], RED)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 6), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    path = write(tmp_path, "anim.gif", data)
    with Image.open(path) as check:
        assert check.n_frames == 3
    out = load_rgb(path)
    assert out.shape == (6, 8, 3) and (out == RED).all()
    assert (load_rgb(path, size=(3, 3)) == RED).all()


def test_one_pixel_image_resizes(tmp_path: Path) -> None:
    for fmt in ("PNG", "JPEG"):
        path = write(tmp_path, f"one.{fmt}", encode(Image.new("RGB", (1, 1), RED), fmt))
        assert load_rgb(path).shape == (1, 1, 3)
        out = load_rgb(path, size=(64, 64))
        assert out.shape == (64, 64, 3) and close(out[32, 32], RED)
        assert probe_image(path) == (1, 1)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "str"])
def test_input_kinds(tmp_path: Path, kind: str) -> None:
    data = encode(Image.new("RGB", (3, 2), GREEN), "PNG")
    path = write(tmp_path, "x.png", data)
    arg = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data)}.get(
        kind, str(path)
    )
    assert (load_rgb(arg) == GREEN).all()


@pytest.mark.parametrize("size", [(0, 5), (5, -1), (5,), (5.0, 5), (True, 5), "ab"])
def test_bad_size_argument_is_a_value_error(size: object) -> None:
    with pytest.raises(ValueError, match="size"):
        load_rgb(encode(Image.new("RGB", (2, 2)), "PNG"), size=size)  # type: ignore[arg-type]


def test_numpy_int_size_is_accepted() -> None:
    out = load_rgb(encode(Image.new("RGB", (2, 2)), "PNG"), size=(np.int64(3), np.int32(4)))
    assert out.shape == (3, 4, 3)


# ------------------------------------------------------------------------------------------
# bad input: always BadImageError with a short reason


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = encode(photo(200, 150), "JPEG", quality=90)
    path = write(tmp_path, "cut.jpg", data[: len(data) // 2])
    for size in (None, (32, 32)):
        with pytest.raises(BadImageError, match=r"^truncated JPEG"):
            load_rgb(path, size=size)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we must not flip the global switch
    assert probe_image(path) == (150, 200)  # header-only: the body is not checked


def test_truncated_header(tmp_path: Path) -> None:
    path = write(tmp_path, "cut.png", encode(photo(20, 20), "PNG")[:40])
    for fn in (load_rgb, probe_image):
        with pytest.raises(BadImageError, match="truncated"):
            fn(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.jpg", b"")
    for fn in (load_rgb, probe_image):
        with pytest.raises(BadImageError, match="^empty file$"):
            fn(path)
    with pytest.raises(BadImageError, match="^empty file$"):
        load_rgb(b"")


@pytest.mark.parametrize(
    "content",
    ["just some notes\n", "<html><body>404 Not Found</body></html>", "caf\u00e9 \u2603\n" * 100],
)
def test_text_named_jpg(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, "notes.jpg", content.encode())
    for fn in (load_rgb, probe_image):
        with pytest.raises(BadImageError, match=r"^not an image \(text\?\)$"):
            fn(path)


def test_unknown_binary_and_unsupported_formats() -> None:
    with pytest.raises(BadImageError, match="not an image"):
        load_rgb(bytes(range(256)) * 4)
    with pytest.raises(BadImageError, match="HEIC/AVIF"):
        load_rgb(b"\x00\x00\x00\x1cftypheic" + bytes(100))
    with pytest.raises(BadImageError, match="not an image"):
        load_rgb(encode(Image.new("RGB", (4, 4)), "PPM"))


# Run in a fresh process: ru_maxrss is the peak of the whole process, which an earlier test
# in this one may already have raised past any limit a test could set.
_PEAK_RSS_GROWTH = """
import resource, sys
from pathlib import Path
from PIL import Image
from springfield.data import decode
path, pillow_check, our_limit = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3])
if not pillow_check:
    Image.MAX_IMAGE_PIXELS = None
decode.MAX_PIXELS = our_limit
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refused = 0
for size in (None, (64, 64)):
    try:
        decode.load_rgb(path, size=size)
    except decode.BadImageError as e:
        refused += str(e).startswith("too large")
try:
    decode.probe_image(Path(path))
except decode.BadImageError:
    refused += 1
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(refused, (after - before) / 1024)
"""


def _peak_rss_growth_mb(path: Path, *, pillow_check: bool, our_limit: int) -> tuple[int, float]:
    """``(files refused as too large out of 3 tries, growth of the peak RSS in MB)`` of a
    fresh process that decodes ``path`` twice and probes it once."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_GROWTH, str(path), "on" if pillow_check else "off"]
        + [str(our_limit)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), float(out[1])


def _real_png_bomb(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG (every row present, all black) in a few kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row * 100) for _ in range(height // 100)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.mark.parametrize("pillow_check", [True, False], ids=["pillow-default", "pillow-disabled"])
def test_decompression_bomb_refused_from_header(tmp_path: Path, pillow_check: bool) -> None:
    # Just above our limit and below twice it, where Pillow's own check only warns; with
    # pillow_check False, some other code switched Pillow's check off: ours must hold alone.
    width, height = 10_000, 9_000
    assert width * height > MAX_PIXELS
    path = write(tmp_path, "bomb.png", _real_png_bomb(width, height))
    assert path.stat().st_size < 200_000
    refused, growth = _peak_rss_growth_mb(path, pillow_check=pillow_check, our_limit=MAX_PIXELS)
    assert refused == 3
    assert growth < 50, growth
    # The control: the same file with our limit raised past it is decoded, and the same
    # measurement sees the memory that costs (90 Mpx: 90 MB as 1-bit, 270 MB as RGB; a fresh
    # CI install measured 266 MB, so the bar sits at 4x the refused case's 50 MB).
    if not pillow_check:
        refused, growth = _peak_rss_growth_mb(path, pillow_check=False, our_limit=10**9)
        assert refused == 0 and growth > 200, growth


def test_bomb_claiming_900_mpx_refused_with_its_size(tmp_path: Path) -> None:
    path = write(tmp_path, "bomb.png", png_claiming(30000, 30000))
    for size in (None, (64, 64)):
        with pytest.raises(BadImageError, match=r"^too large: .*\(limit 89 Mpx\)$"):
            load_rgb(path, size=size)
    with pytest.raises(BadImageError, match="too large"):
        probe_image(path)


def test_bomb_just_above_our_limit_does_not_rely_on_pillow_warning(tmp_path: Path) -> None:
    # 10000 x 8948 = 89.48 Mpx: above MAX_PIXELS, below twice it, where Pillow only warns.
    assert 10000 * 8948 > MAX_PIXELS
    path = write(tmp_path, "bomb.png", png_claiming(10000, 8948))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(BadImageError, match=r"^too large: 10000x8948 px"):
            load_rgb(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(BadImageError, match="^too large"):
            load_rgb(path)


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    for fn in (load_rgb, probe_image):
        with pytest.raises(BadImageError, match="^unreadable: is a directory$"):
            fn(folder)


def test_symlink_loop(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.symlink_to(b)
    b.symlink_to(a)
    for fn in (load_rgb, probe_image):
        with pytest.raises(BadImageError, match="^unreadable: "):
            fn(a)


def test_missing_file_and_fifo(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="^unreadable: "):
        load_rgb(tmp_path / "nope.jpg")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(BadImageError, match="not a regular file"):  # and must not block
        probe_image(fifo)


def test_permission_denied_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # We run as root, who can read anything, so simulate what open() raises for other users.
    path = write(tmp_path, "secret.jpg", encode(Image.new("RGB", (2, 2)), "JPEG"))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(decode, "open", denied, raising=False)
    for fn in (load_rgb, probe_image):
        with pytest.raises(BadImageError, match="^permission denied$"):
            fn(path)


# ------------------------------------------------------------------------------------------
# properties: never any exception type but BadImageError


def _valid_image(draw: st.DrawFn) -> tuple[bytes, str, str, np.ndarray]:
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(pixels)
    if mode == "RGBA":
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    elif mode != "RGB":
        im = im.convert(mode)
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        im = im.convert("RGB")  # JPEG cannot store these; the encoder would refuse
    return encode(im, fmt), mode, fmt, pixels


valid_images = st.composite(_valid_image)()
sizes = st.tuples(st.integers(1, 48), st.integers(1, 48))


def _decodes_or_bad_image(data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    try:
        out = load_rgb(data, size=size)
    except BadImageError as e:
        assert str(e) and "\n" not in str(e)
        return None
    assert out.dtype == np.uint8 and out.shape == (*size, 3)
    return out


# Garbage behind a real signature gets past sniffing and exercises Pillow's parsers.
MAGICS = [
    b"",
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    b"II*\x00",
    b"MM\x00*",
    b"BM" + bytes(12) + b"(\x00\x00\x00",  # BITMAPINFOHEADER size 40
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" etc.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@settings(max_examples=200, deadline=None)
@given(magic=st.sampled_from(MAGICS), data=st.binary(max_size=512), size=sizes)
def test_random_bytes_never_raise_anything_else(
    magic: bytes, data: bytes, size: tuple[int, int]
) -> None:
    _decodes_or_bad_image(magic + data, size)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=valid_images, size=sizes)
def test_random_valid_images_decode(image: tuple, size: tuple[int, int]) -> None:
    data, mode, fmt, pixels = image
    assert _decodes_or_bad_image(data, size) is not None  # valid input must decode
    if fmt in ("PNG", "BMP") and mode == "RGB":
        np.testing.assert_array_equal(load_rgb(data), pixels)  # lossless round trip


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" etc.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=valid_images, size=sizes, cut=st.floats(0, 1), flips=st.lists(st.integers(0)))
def test_damaged_images_never_raise_anything_else(
    image: tuple, size: tuple[int, int], cut: float, flips: list[int]
) -> None:
    data = bytearray(image[0])
    for i in flips[:8]:  # corrupt a few bytes, headers included
        data[i % len(data)] ^= 0xFF
    _decodes_or_bad_image(bytes(data[: max(1, int(len(data) * cut))]), size)
