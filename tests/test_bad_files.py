"""Bad input end to end: a folder full of broken, odd and hostile files still trains, and
every file left out is reported exactly once, with its reason, before training starts."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from springfield.cli import main

FAST = [
    "--image-size",
    "32",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--no-tensorboard",
    "--no-report",
]

# A PNG bomb: 30000 x 30000 px in about 110 kB. Decoded it would take 0.9 GB as 1-bit
# pixels (one byte each in Pillow) and 2.7 GB as RGB.
BOMB_SIDE = 30_000


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A real, fully decodable 1-bit black PNG of ``side`` x ``side`` pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row * 1000) for _ in range(side // 1000)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is patched to claim ``width`` x ``height``."""
    data = bytearray(_encode(_photo(0), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# name -> reason substring for every file the run must leave out
BAD = {
    "bart_simpson/zero.jpg": "empty file",
    "bart_simpson/notes.jpg": "not an image (text?)",
    "homer_simpson/truncated.jpg": "truncated JPEG file",
    "homer_simpson/truncated.png": "truncated PNG file",
    "lisa_simpson/bomb.png": "too large: 900 Mpx (limit 89 Mpx)",
    "lisa_simpson/bomb.jpg": "too large: 3600 Mpx (limit 89 Mpx)",
    "marge_simpson/locked.jpg": "permission denied",
    "marge_simpson/loop.jpg": "Too many levels of symbolic links",
    "bart_simpson/r\udce9sum\udce9.jpg": "not an image (text?)",  # Latin-1 bytes in the name
}
# odd but valid: these must be used for training, not skipped
ODD = [
    "homer_simpson/one_pixel.png",
    "lisa_simpson/sixteen_bit.png",
    "marge_simpson/animated.gif",
    "bart_simpson/cmyk.jpg",
    "marge_simpson/caf\udce9.jpg",
]


def make_bad_folder(tiny_folder: Path, root: Path) -> Path:
    """A copy of ``tiny_folder`` with every file of BAD and ODD added."""
    shutil.copytree(tiny_folder, root)
    good = _encode(_photo(1), "JPEG", quality=90)
    png = _encode(_photo(2), "PNG")
    files = {
        "bart_simpson/zero.jpg": b"",
        "bart_simpson/notes.jpg": b"shopping list: donuts, duff\n",
        "homer_simpson/truncated.jpg": good[: len(good) * 2 // 3],
        "homer_simpson/truncated.png": png[: len(png) // 2],
        "lisa_simpson/bomb.png": png_bomb(),
        "lisa_simpson/bomb.jpg": jpeg_claiming(60_000, 60_000),
        "marge_simpson/locked.jpg": good,
        "bart_simpson/r\udce9sum\udce9.jpg": b"not a photo at all\n",
        "homer_simpson/one_pixel.png": _encode(Image.new("RGB", (1, 1), (255, 217, 15)), "PNG"),
        "lisa_simpson/sixteen_bit.png": _encode(
            Image.fromarray(np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)),
            "PNG",
        ),
        "bart_simpson/cmyk.jpg": _encode(_photo(3).convert("CMYK"), "JPEG"),
        "marge_simpson/caf\udce9.jpg": good,
    }
    frames = [_photo(4 + i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["marge_simpson/animated.gif"] = buf.getvalue()
    for name, data in files.items():
        # fsencode: the undecodable names go to disk as their original bytes.
        with open(os.fsencode(root / name), "wb") as f:
            f.write(data)
    os.chmod(root / "marge_simpson/locked.jpg", 0)
    os.symlink("loop.jpg", root / "marge_simpson/loop.jpg")
    assert Image.open(root / "lisa_simpson/sixteen_bit.png").mode.startswith("I")
    assert Image.open(root / "marge_simpson/animated.gif").n_frames == 3
    assert Image.open(root / "bart_simpson/cmyk.jpg").mode == "CMYK"
    return root


# A child for `python CHILD MODULE ARGS...`: runs MODULE like `python -m`, then prints its
# peak RSS (VmHWM: this process's own peak since exec; ru_maxrss would include the parent's
# memory at fork). Root reads any file, so a chmod 000 file would not be unreadable: as root,
# the child first drops the two capabilities that bypass file permissions and re-executes
# itself without them. (All in the child: forking a process that runs JAX's threads with
# preexec_fn is unsafe.)
CHILD = """
import ctypes, os, runpy, sys
if os.geteuid() == 0 and "SPRINGFIELD_TEST_NO_DAC" not in os.environ:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    os.environ["SPRINGFIELD_TEST_NO_DAC"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\npeak-rss-kib {peak}\\n")
"""


def run_measured(argv: list[str], tmp_path: Path) -> tuple[int, str, str, int]:
    """Run ``python CHILD argv`` (``argv`` = module and its arguments) to completion:
    ``(status, stdout, stderr, peak RSS in bytes)``."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    done = subprocess.run(
        [sys.executable, str(child), *argv],
        capture_output=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=600,
    )
    err = done.stderr.decode(errors="replace")
    peak = int(re.findall(r"^peak-rss-kib (\d+)$", err, re.M)[-1]) * 1024
    return done.returncode, done.stdout.decode(errors="replace"), err, peak


def _shown(path: Path) -> str:
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def test_folder_of_bad_files_trains_and_reports_each_bad_file_once(tiny_folder, tmp_path, capsys):
    data = make_bad_folder(tiny_folder, tmp_path / "data")
    workdir = tmp_path / "run"
    status, _, stderr, peak = run_measured(
        [
            "springfield.cli",
            "train",
            "--data",
            str(data),
            "--workdir",
            str(workdir),
            "--epochs",
            "1",
            *[f for f in FAST if f != "--no-report"],  # the report lists skipped files too
        ],
        tmp_path,
    )
    assert status == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert (workdir / "eval.json").exists() and (workdir / "report.html").exists()
    # Decoded, the bomb alone would need 2.7 GB as RGB (0.9 GB as Pillow's 1-bit pixels).
    print(f"peak RSS of the training process: {peak / 2**20:.0f} MiB")
    assert peak < 1.5 * 2**30

    # skipped.txt: one line per bad file, its name's exact bytes, with its reason.
    by_path: dict[bytes, str] = {}
    for line in (workdir / "skipped.txt").read_bytes().splitlines():
        path, reason = line.split(b"\t")
        assert path not in by_path, f"{path!r} reported twice"
        by_path[path] = reason.decode()
    expected = {os.fsencode(data / name): reason for name, reason in BAD.items()}
    assert set(by_path) == set(expected)
    for path, reason in expected.items():
        assert reason in by_path[path], (path, by_path[path])

    # dataset.json: the same files, once each, as strict UTF-8 JSON with printable names.
    record = json.loads((workdir / "dataset.json").read_bytes().decode("utf-8"))
    printed = {s["path"]: s["reason"] for s in record["skipped"]}
    assert len(record["skipped"]) == len(printed) == len(BAD)
    for name, reason in BAD.items():
        assert reason in printed[_shown(data / name)]
    assert str(data / "bart_simpson" / "r\\xe9sum\\xe9.jpg") in printed
    used = sum(record["train_counts"].values()) + sum(record["val_counts"].values())
    assert used == 4 * 14 + len(ODD)

    # The console: the count, then each file with its reason, once.
    assert f"Skipped {len(BAD)} file(s)" in " ".join(stderr.split())
    for name in BAD:
        assert stderr.count(f"skipped {_shown(data / name)}:") == 1, name

    # predict on the same folder: odd names printed and written without crashing.
    csv_path = tmp_path / "predictions.csv"
    capsys.readouterr()
    folder = data / "marge_simpson"
    assert main(["predict", str(workdir), str(folder), "--csv", str(csv_path), "--top-k", "1"]) == 0
    printed = "".join(capsys.readouterr().out.split())  # the console wraps long paths
    cafe = folder / "caf\udce9.jpg"
    assert _shown(cafe) + ":" in printed
    assert os.fsencode(cafe) + b",1," in csv_path.read_bytes()


def test_decompression_bombs_are_refused_in_bounded_memory(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    (tmp_path / "bomb.jpg").write_bytes(jpeg_claiming(60_000, 60_000))
    (tmp_path / "decode_all.py").write_text(
        "import sys\n"
        "from springfield.data.decode import load_rgb, probe_image\n"
        "from springfield.errors import BadImageError\n"
        "for name in sys.argv[1:]:\n"
        "    for decode in (probe_image, load_rgb):\n"
        "        try:\n"
        "            decode(name)\n"
        "        except BadImageError as e:\n"
        "            print(decode.__name__, e)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    names = [str(tmp_path / "bomb.png"), str(tmp_path / "bomb.jpg")]
    status, out, err, peak = run_measured(["decode_all", *names], tmp_path)
    assert status == 0, err
    assert out.splitlines() == [
        "probe_image too large: 900 Mpx (limit 89 Mpx)",
        "load_rgb too large: 900 Mpx (limit 89 Mpx)",
        "probe_image too large: 3600 Mpx (limit 89 Mpx)",
        "load_rgb too large: 3600 Mpx (limit 89 Mpx)",
    ]
    print(f"peak RSS while refusing both bombs: {peak / 2**20:.0f} MiB")
    assert peak < 256 * 2**20  # decoding the PNG would take 900 MiB at the very least


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    # Without whitespace: the console wraps long paths at any "/".
    return "".join(captured.err.split())


@pytest.mark.parametrize(
    "name, content, reason",
    [
        # found by the folder scan (the header is not an image)
        ("notes.jpg", b"shopping list: donuts, duff\n", "not an image (text?)"),
        # passes the header scan, fails when the images are decoded, before the first step
        ("truncated.jpg", None, "truncated JPEG file"),
    ],
)
def test_on_bad_image_fail_refuses_the_run_naming_the_file(
    tiny_folder, tmp_path, capsys, name, content, reason
):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    if content is None:
        good = _encode(_photo(1), "JPEG", quality=90)
        content = good[: len(good) * 2 // 3]
    (data / "lisa_simpson" / name).write_bytes(content)
    workdir = tmp_path / "run"
    argv = ["train", "--data", str(data), "--workdir", str(workdir), "--epochs", "1", *FAST]
    msg = _error(capsys, [*argv, "--on-bad-image", "fail"])
    assert "".join(f"{data / 'lisa_simpson' / name}: {reason}".split()) in msg
    assert "--on-bad-imageskip" in msg
    assert not (workdir / "checkpoints").exists()  # refused before training
