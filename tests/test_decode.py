"""Tests for springfield.data.decode on good input: format sniffing, then every format, mode,
orientation and size load_rgb takes, from real files written with Pillow. Bad input and
fuzzing: test_decode_bad.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from decode_common import BLUE, GREEN, RED, WHITE, close, encode, photo, write
from PIL import Image

from springfield.data.decode import load_rgb, probe_image, sniff_format

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
