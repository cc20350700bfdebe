"""`springfield serve` end to end: a real server process on a free loopback port, real
uploads over HTTP, the page in headless Chromium; compared with `springfield predict`."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import struct
import tempfile
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serving import Server

from springfield.cli import ServeArgs, main

MAX_FILES = 3
# A long micro-batching window, so that the concurrent requests below surely meet.
WINDOW_MS = 150


@pytest.fixture(scope="module")
def server(small_run, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "cache"
    s = Server(
        small_run,
        "--max-upload-mb",
        "1",
        "--max-files",
        str(MAX_FILES),
        "--batch-window-ms",
        str(WINDOW_MS),
        "--top-k",
        "4",
        cache=cache,
    )
    yield s
    # uvicorn shuts down gracefully, then (since 0.29) re-raises the SIGTERM it caught.
    assert s.stop() in (0, -signal.SIGTERM), "".join(s.lines)
    assert "Traceback" not in "".join(s.lines) and "Warning" not in "".join(s.lines)


@pytest.fixture(scope="module")
def images(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    """A real JPEG, a PNG named .jpg, and a JPEG with EXIF orientation and CMYK colours."""
    out = tmp_path_factory.mktemp("uploads")
    jpeg = out / "homer.jpg"
    shutil.copy(next(iter(sorted((tiny_folder / "homer_simpson").iterdir()))), jpeg)
    png = out / "lisa_really_a_png.jpg"
    Image.open(next(iter(sorted((tiny_folder / "lisa_simpson").iterdir())))).save(png, "PNG")
    cmyk = out / "marge_cmyk_rotated.jpg"
    im = Image.open(next(iter(sorted((tiny_folder / "marge_simpson").iterdir())))).convert("CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(cmyk, "JPEG", exif=exif)
    return {"jpeg": jpeg, "png": png, "cmyk": cmyk}


def _predict_json(capsys, run: Path, *files: Path) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", str(run), *map(str, files), "--json", "--top-k", "4"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _as_served(rows: list[dict]) -> list[list[tuple[str, float]]]:
    return [[(t["label"], t["probability"]) for t in r["top"]] for r in rows]


def _tops(body: dict) -> list[list[tuple[str, float]]]:
    return [[(t["label"], t["probability"]) for t in p["top"]] for p in body["predictions"]]


def _post_files(url: str, *paths: Path, **kw) -> httpx.Response:
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return httpx.post(f"{url}/predict", files=files, timeout=60, **kw)


def test_uploads_give_exactly_the_probabilities_of_predict_json(server, small_run, images, capsys):
    jpeg, png, cmyk = images["jpeg"], images["png"], images["cmyk"]
    for path in (jpeg, png, cmyk):
        r = _post_files(server.url, path)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [p["file"] for p in body["predictions"]] == [path.name]
        # Same decoder, same batch shape (one image): the very same floats, and the same
        # schema as predict --json (but for the file's name: a path there).
        (printed,) = _predict_json(capsys, small_run, path)
        assert _tops(body) == _as_served([printed])
        (served,) = body["predictions"]
        assert served == {**printed, "file": path.name}
        assert list(served) == ["file", "label", "probability", "top"]
        assert (served["label"], served["probability"]) == tuple(served["top"][0].values())
        assert sum(p for _, p in _tops(body)[0]) == pytest.approx(1.0, abs=1e-5)
    # Several files in one request run as one batch, as predict runs several files.
    r = _post_files(server.url, jpeg, png, cmyk)
    assert r.status_code == 200, r.text
    assert _tops(r.json()) == _as_served(_predict_json(capsys, small_run, jpeg, png, cmyk))
    # A raw body (no multipart) is the same image.
    r = httpx.post(
        f"{server.url}/predict?filename=raw.jpg",
        content=png.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["file"] == "raw.jpg"
    assert _tops(r.json()) == _as_served(_predict_json(capsys, small_run, png))
    model = r.json()["model"]
    assert model["classes"] == json.loads((small_run / "classes.json").read_text())
    assert model["model"] == "resnet" and model["image_size"] == [32, 32]
    assert model["format"] == "run" and model["name"] == small_run.name
    # top_k per request
    r = httpx.post(f"{server.url}/predict?top_k=1", files=[("f", jpeg.read_bytes())], timeout=60)
    assert len(r.json()["predictions"][0]["top"]) == 1


# A batch window far longer than any test, and batch shapes up to 8: a forward pass starts
# only once 8 images wait (or the server shuts down), so 8 concurrent requests share exactly
# one, however slowly they arrive.
PATIENT = ("--batch-sizes", "1", "2", "4", "8", "--batch-window-ms", "600000", "--top-k", "4")


@pytest.fixture(scope="module")
def patient_server(small_run, tmp_path_factory):
    s = Server(small_run, *PATIENT, cache=tmp_path_factory.getbasetemp() / "cache")
    yield s
    assert s.stop() in (0, -signal.SIGTERM), "".join(s.lines)


def test_concurrent_requests_share_one_forward_pass(patient_server, small_run, images, capsys):
    url = patient_server.url
    before = httpx.get(f"{url}/info").json()["serving"]
    paths = [images["jpeg"], images["png"]] * 4
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        responses = list(pool.map(lambda p: _post_files(url, p), paths))
    after = httpx.get(f"{url}/info").json()["serving"]
    assert [r.status_code for r in responses] == [200] * len(paths)
    assert after["requests"] - before["requests"] == len(paths)
    assert after["forward_passes"] - before["forward_passes"] == 1
    assert after["images"] - before["images"] == len(paths)
    # predict with the same 8 files runs them as one batch of 8 too: the very same floats.
    expected = _as_served(_predict_json(capsys, small_run, *paths))
    assert [_tops(r.json())[0] for r in responses] == expected


def _png_bomb(side: int = 10_000) -> bytes:
    """A real 1-bit PNG of side x side px (100 Mpx > the 89 Mpx limit) in ~12 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row * 1000) for _ in range(side // 1000)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + idat


FORM_WITHOUT_FILE = (
    b'--xyz\r\nContent-Disposition: form-data; name="who"\r\n\r\nhomer\r\n--xyz--\r\n'
)

PART_WITHOUT_NAME = (
    b'--xyz\r\nContent-Disposition: form-data; filename="a.jpg"\r\n\r\nx\r\n--xyz--\r\n'
)


def test_bad_requests_get_a_4xx_one_line_error_and_the_server_lives_on(server, images):
    url = f"{server.url}/predict"
    jpeg = images["jpeg"].read_bytes()
    over_limit = b"\xff\xd8\xff" + os.urandom(1024 * 1024 + 100)  # 1 MB limit
    multipart = "multipart/form-data; boundary=xyz"
    cases = {
        "not an image": (
            dict(files=[("file", ("notes.jpg", b"just some text, not a picture\n"))]),
            422,
            "notes.jpg: not an image (text?). Send a JPEG, PNG",
        ),
        "truncated": (
            dict(files=[("file", ("cut.jpg", jpeg[: len(jpeg) // 3]))]),
            422,
            "cut.jpg: truncated JPEG file",
        ),
        "decompression bomb": (
            dict(files=[("file", ("bomb.png", _png_bomb()))]),
            422,
            # Over the training limit too; the server's own, lower one answers first.
            "bomb.png: 10000x10000 px would decode to 100.0 Mpx, over this server's 12 Mpx",
        ),
        "empty file": (dict(files=[("file", ("zero.jpg", b""))]), 422, "zero.jpg: empty file"),
        "over the size limit": (
            dict(content=over_limit, headers={"Content-Type": "image/jpeg"}),
            413,
            "(1.0 MB) is over this server's 1 MB upload limit",
        ),
        "over the size limit, streamed without Content-Length": (
            dict(content=iter([over_limit]), headers={"Content-Type": "image/jpeg"}),
            413,
            "the request body is over this server's 1 MB upload limit",
        ),
        "empty body": (
            dict(content=b"", headers={"Content-Type": "image/jpeg"}),
            400,
            "empty request body: send an image",
        ),
        "wrong content type": (
            dict(content=jpeg, headers={"Content-Type": "text/plain"}),
            415,
            "Content-Type 'text/plain': send multipart/form-data",
        ),
        "no content type": (dict(content=jpeg), 415, "Content-Type '(none)'"),
        "too many files": (
            dict(files=[("file", (f"{i}.jpg", jpeg)) for i in range(MAX_FILES + 1)]),
            400,
            f"more than {MAX_FILES} files in one request",
        ),
        "a form without files": (
            dict(content=FORM_WITHOUT_FILE, headers={"Content-Type": multipart}),
            400,
            "no file in the form",
        ),
        "broken multipart": (
            dict(content=PART_WITHOUT_NAME, headers={"Content-Type": multipart}),
            400,
            "malformed multipart body",
        ),
        "bad top_k": (
            dict(files=[("file", ("a.jpg", jpeg))], params={"top_k": "zero"}),
            400,
            "top_k='zero': must be a whole number >= 1",
        ),
        # str.isdigit() says yes to these; int() says no, or takes long.
        "a superscript top_k": (
            dict(files=[("file", ("a.jpg", jpeg))], params={"top_k": "\u00b2"}),
            400,
            "top_k='\u00b2': must be a whole number >= 1",
        ),
        "a 5000-digit top_k": (
            dict(files=[("file", ("a.jpg", jpeg))], params={"top_k": "9" * 5000}),
            400,
            "top_k='99999999",
        ),
        "top_k twice": (
            dict(files=[("file", ("a.jpg", jpeg))], params=[("top_k", "1"), ("top_k", "2")]),
            400,
            "top_k given more than once",
        ),
        "an unknown query parameter": (
            dict(files=[("file", ("a.jpg", jpeg))], params={"topk": "2"}),
            400,
            "unknown query parameter 'topk': POST /predict takes top_k and filename",
        ),
        "a text field beside the file": (
            dict(files=[("file", ("a.jpg", jpeg))], data={"top_k": "2"}),
            400,
            "form field 'top_k' is not a file",
        ),
        "a file name of 300 characters": (
            dict(files=[("file", ("x" * 296 + ".jpg", jpeg))]),
            400,
            "a file name of 300 characters: send a name of at most 255",
        ),
        "a superscript Content-Length": (
            dict(content=jpeg, headers={"Content-Type": "image/jpeg", "Content-Length": "\u00b2"}),
            400,
            None,  # h11 refuses it before the app sees it
        ),
        "a 1-bit PNG bomb under the 89 Mpx limit, over --max-pixels": (
            dict(files=[("file", ("small_bomb.png", _png_bomb(4000)))]),
            422,
            "small_bomb.png: 4000x4000 px would decode to 16.0 Mpx, over this server's 12 Mpx "
            "limit",
        ),
    }
    for name, (kwargs, status, message) in cases.items():
        try:
            r = httpx.post(url, timeout=60, **kwargs)
        except UnicodeEncodeError:  # httpx itself refuses a non-latin-1 header value
            assert message is None, name
            continue
        assert r.status_code == status, (name, r.status_code, r.text)
        if message is not None:
            assert "\n" not in r.text.strip(), name
            assert message in r.json()["error"], (name, r.json())
    r = httpx.get(url)
    assert r.status_code == 405 and "not allowed" in r.json()["error"]
    r = httpx.get(f"{server.url}/nowhere")
    assert r.status_code == 404 and "POST /predict" in r.json()["error"]
    # Still alive, still right.
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert _post_files(server.url, images["jpeg"]).status_code == 200


def test_an_endless_upload_is_cut_off_at_the_limit(server):
    sent = 0

    def endless():
        nonlocal sent
        chunk = b"\xff\xd8\xff" + b"\0" * (64 * 1024 - 3)
        while sent < 256 * 1024 * 1024:
            sent += len(chunk)
            yield chunk

    r = httpx.post(
        f"{server.url}/predict", content=endless(), headers={"Content-Type": "image/jpeg"}
    )
    assert r.status_code == 413
    # 1 MB limit: what got sent beyond it sat in socket buffers, not in the server.
    assert sent < 64 * 1024 * 1024, sent
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_info_and_start_message(server, small_run):
    info = httpx.get(f"{server.url}/info").json()
    assert info["classes"] == json.loads((small_run / "classes.json").read_text())
    assert info["image_size"] == [32, 32] and info["step"] > 0
    assert info["val_accuracy"] == json.loads((small_run / "eval.json").read_text())["accuracy"]
    assert info["serving"]["batch_sizes"] == [1, 2, 4, 8, 16, 32]
    assert info["serving"]["max_files"] == MAX_FILES and info["serving"]["max_upload_mb"] == 1
    start = "".join(server.lines)
    assert "compiled batch sizes 1, 2, 4, 8, 16, 32" in start
    assert "this machine only; --host 0.0.0.0 to accept other machines" in start


def test_serve_and_export_help_explain_every_flag(capsys):
    from springfield.cli import ExportArgs

    for command, args in (("serve", ServeArgs), ("export", ExportArgs)):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for field in dataclasses.fields(args):
            if field.name not in ("run", "out"):
                assert f"--{field.name.replace('_', '-')}" in out, (command, field.name)
        if command == "serve":
            words = " ".join(out.split())  # the help wraps lines
            assert "127.0.0.1" in words and "needs --token (or --allow-no-token)" in words
            assert "Without either, there is no authentication" in words
            assert "--no-batching" in out


def test_user_errors_of_serve_are_one_line(small_run, tmp_path, capsys):
    for argv, message in {
        ("serve", str(tmp_path)): "not a springfield run folder (no config.json) nor an exported",
        ("serve", str(small_run), "--top-k", "0"): "--top-k 0: must be at least 1",
        ("serve", str(small_run), "--host", "no.such.host.invalid"): "--host no.such.host.invalid",
    }.items():
        capsys.readouterr()
        assert main(list(argv)) == 2
        err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
        assert message in err and "Traceback" not in err, (argv, err)


# --- the page, in headless Chromium ----------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _percent(p: float) -> str:
    # As page.html's pct(): whole percent at the extremes, else one decimal.
    if p < 0.001:
        return "<0.1%"
    return f"{100 * p:.0f}%" if p >= 0.995 else f"{100 * p:.1f}%"


def chromium(tmp_path: Path, width: int = 1280, height: int = 900):
    """A headless Chromium (selenium) with a private profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
    reason="chromium/chromedriver not installed (run .ci/chromium.sh); CI never skips this",
)
def test_page_uploads_through_the_file_chooser_and_shows_the_label(
    server, small_run, images, tmp_path, capsys
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = [
        _predict_json(capsys, small_run, p)[0]["top"] for p in (images["jpeg"], images["png"])
    ]
    driver = chromium(tmp_path)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "resnet" in d.find_element(By.ID, "model").text)
        chooser = driver.find_element(By.CSS_SELECTOR, "input[type=file]")
        chooser.send_keys(f"{images['jpeg']}\n{images['png']}")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == 2)
        cards = driver.find_elements(By.CSS_SELECTOR, ".card.done")
        shown = {c.get_attribute("data-file"): c for c in cards}
        for path, top in zip((images["jpeg"], images["png"]), expected, strict=True):
            card = shown[path.name]
            label = card.find_element(By.CSS_SELECTOR, ".label")
            assert label.get_attribute("data-label") == top[0]["label"]
            assert label.text == top[0]["label"].replace("_", " ").title()
            rows = card.find_elements(By.CSS_SELECTOR, ".row")
            assert [r.get_attribute("data-label") for r in rows] == [t["label"] for t in top]
            assert _percent(top[0]["probability"]) in rows[0].text
            assert card.find_element(By.TAG_NAME, "img").get_property("naturalWidth") > 0
        classes = driver.find_element(By.ID, "classes").text
        assert "Homer Simpson" in classes and "4 classes" in classes
        # Nothing refused by the page's CSP, no script errors.
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
        # Phone width: one column, nothing wider than the window.
        driver.set_window_size(390, 844)
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
    finally:
        driver.quit()
