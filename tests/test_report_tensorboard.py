"""springfield.report's TensorBoard helpers: event files written by tensorboardX and read back
by our parser, truncated and corrupted ones included."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from report_run import (
    FIGURE_NAMES,
    write_run,
)

from springfield.errors import SpringfieldError
from springfield.report import (
    log_figures,
    read_scalars,
)
from springfield.report.tensorboard import iter_events


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run")
    path.joinpath("elapsed.json").write_text(json.dumps(write_run(path)))
    return path


# --- TensorBoard ---------------------------------------------------------------------------


def test_read_scalars_round_trip(tmp_path: Path) -> None:
    from tensorboardX import SummaryWriter

    logdir = tmp_path / "tb"
    with SummaryWriter(logdir=str(logdir)) as writer:
        for step in (0, 10, 20):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)
            writer.add_scalar("val/accuracy", 0.25 + step / 100, step)
        writer.add_scalar("train/lr", 3e-4, 20)
    scalars = read_scalars(logdir)
    assert set(scalars) == {"train/loss", "val/accuracy", "train/lr"}
    assert [s for s, _ in scalars["train/loss"]] == [0, 10, 20]
    # simple_value is a float32 on disk.
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.0, 1 / 11, 1 / 21], rel=1e-6)
    assert [v for _, v in scalars["val/accuracy"]] == pytest.approx([0.25, 0.35, 0.45], rel=1e-6)
    assert scalars["train/lr"] == [(20, pytest.approx(3e-4, rel=1e-6))]


def test_read_scalars_keeps_sub_writers_apart(tmp_path: Path) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(logdir=str(tmp_path)) as writer:
        writer.add_scalars("loss", {"train": 1.0, "val": 2.0}, 3)
        writer.add_scalar("lr", 0.5, 3)
    scalars = read_scalars(tmp_path)
    assert scalars["lr"] == [(3, 0.5)]
    assert scalars["loss/train/loss"] == [(3, 1.0)]
    assert scalars["loss/val/loss"] == [(3, 2.0)]


def test_read_scalars_tolerates_truncation_and_rejects_corruption(tmp_path: Path) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(logdir=str(tmp_path)) as writer:
        writer.add_scalar("loss", 0.5, 1)
        writer.add_scalar("loss", 0.25, 2)
    (events,) = [p for p in tmp_path.iterdir() if "tfevents" in p.name]
    data = events.read_bytes()

    # A writer killed mid-record leaves a partial record at the end: read what is complete.
    events.write_bytes(data[:-5])
    assert read_scalars(tmp_path) == {"loss": [(1, 0.5)]}
    events.write_bytes(data + data[:7])
    assert read_scalars(tmp_path) == {"loss": [(1, 0.5), (2, 0.25)]}

    # A flipped byte inside the last record's value fails its checksum.
    corrupt = bytearray(data)
    corrupt[-6] ^= 0xFF
    events.write_bytes(bytes(corrupt))
    with pytest.raises(SpringfieldError, match="corrupt"):
        read_scalars(tmp_path)

    with pytest.raises(SpringfieldError, match="does not exist"):
        read_scalars(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert read_scalars(tmp_path / "empty") == {}


def test_log_figures_writes_image_summaries(run_dir: Path, tmp_path: Path) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(logdir=str(tmp_path)) as writer:
        writer.add_scalar("train/loss", 1.5, 7)
        log_figures(writer, run_dir, step=7)
    images = {}
    for path in tmp_path.iterdir():
        for event in iter_events(path):
            for value in event.summary.value:
                if value.HasField("image"):
                    images[value.tag] = (event.step, value.image)
    assert set(images) == {f"figures/{Path(n).stem}" for n in FIGURE_NAMES}
    for name in FIGURE_NAMES:
        step, image = images[f"figures/{Path(name).stem}"]
        assert step == 7
        decoded = Image.open(io.BytesIO(image.encoded_image_string))
        assert decoded.size == Image.open(run_dir / name).size == (image.width, image.height)
    # The scalar next to the images still reads back.
    assert read_scalars(tmp_path) == {"train/loss": [(7, 1.5)]}
