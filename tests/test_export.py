"""`springfield export`: a jax.export folder that predicts like its run folder, loaded in a
fresh process without springfield's training code, through predict and serve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import Server

from springfield.cli import main

TRAINING_MODULES = ("flax", "optax", "grain", "orbax", "springfield.training", "springfield.models")


@pytest.fixture(scope="module")
def exported(small_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "homer-export"
    assert main(["export", str(small_run), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def files(tiny_folder, tmp_path_factory) -> list[Path]:
    """Real JPEGs of every class and a PNG named .jpg."""
    out = tmp_path_factory.mktemp("export-images")
    picked = [sorted(d.iterdir())[0] for d in sorted(tiny_folder.iterdir())]
    png = out / "really_a_png.jpg"
    Image.open(sorted((tiny_folder / "lisa_simpson").iterdir())[1]).save(png, "PNG")
    return [*picked, png]


def test_export_writes_a_self_describing_folder(exported, small_run):
    assert sorted(p.name for p in exported.iterdir()) == [
        "classes.json",
        "export.json",
        "model.jaxexport",
        "preprocess.json",
    ]
    classes = json.loads((small_run / "classes.json").read_text())
    assert json.loads((exported / "classes.json").read_text()) == classes
    meta = json.loads((exported / "export.json").read_text())
    assert meta["model"] == "resnet" and meta["classes"] == classes
    assert meta["platforms"] == ["cpu", "cuda"] and meta["source"] == str(small_run)
    assert meta["val_accuracy"] == json.loads((small_run / "eval.json").read_text())["accuracy"]
    pre = json.loads((exported / "preprocess.json").read_text())
    assert pre["image_size"] == [32, 32] and pre["tta"]["enabled"] is False
    assert (
        pre["normalisation"]["scale"] == pytest.approx(2 / 255)
        and pre["normalisation"]["offset"] == -1
    )

    from jax import export

    exp = export.deserialize(bytearray((exported / "model.jaxexport").read_bytes()))
    (aval,) = exp.in_avals
    assert not isinstance(aval.shape[0], int)  # symbolic batch
    assert aval.shape[1:] == (32, 32, 3) and str(aval.dtype) == "uint8"
    # XLA's convolutions, not springfield's oneDNN custom call, which would not load elsewhere.
    module = exp.mlir_module()
    assert "stablehlo.convolution" in module and "springfield_onednn" not in module


def test_exported_folder_predicts_the_runs_probabilities_without_training_code(
    exported, small_run, files
):
    script = textwrap.dedent(
        f"""
        import json, sys
        import springfield.inference as inference

        clf = inference.load({str(exported)!r})
        probs = clf.probabilities({[str(f) for f in files]!r})
        few = clf.probabilities({[str(f) for f in files[:3]]!r})  # another batch shape
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "optax", "grain",
            "orbax") or m.startswith(("springfield.training", "springfield.models")))
        print(json.dumps({{"probs": probs.tolist(), "few": few.tolist(), "loaded": loaded,
                          "info": clf.info}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["loaded"] == []
    assert out["info"]["format"] == "export" and out["info"]["run"] == str(small_run)

    from springfield.inference import load

    run = load(small_run)
    assert run.info["format"] == "run"
    expected = run.probabilities(files)
    np.testing.assert_allclose(out["probs"], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["few"], expected[:3], atol=1e-5, rtol=0)
    # Not all the same prediction: the comparison covers real, different outputs.
    assert len({tuple(np.round(p, 4)) for p in expected}) == len(files)


def _predict(capsys, folder: Path, files: list[Path]) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", str(folder), *map(str, files), "--json", "--top-k", "4"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _by_class(row: dict) -> dict[str, float]:
    return {t["label"]: t["probability"] for t in row["top"]}


def test_predict_and_serve_take_the_exported_folder(
    exported, small_run, files, capsys, tmp_path_factory
):
    from_run = _predict(capsys, small_run, files)
    from_export = _predict(capsys, exported, files)
    assert [r["file"] for r in from_export] == [str(f) for f in files]
    for a, b in zip(from_run, from_export, strict=True):
        pa, pb = _by_class(a), _by_class(b)
        assert set(pa) == set(pb)
        for c in pa:
            assert pb[c] == pytest.approx(pa[c], abs=1e-5)

    server = Server(
        exported, "--batch-sizes", "1", "4", cache=tmp_path_factory.getbasetemp() / "cache"
    )
    try:
        info = httpx.get(f"{server.url}/info").json()
        assert info["format"] == "export" and info["name"] == exported.name
        upload = [("file", (f.name, f.read_bytes())) for f in files[:4]]
        r = httpx.post(f"{server.url}/predict?top_k=4", files=upload, timeout=60)
        assert r.status_code == 200, r.text
        four = _predict(capsys, exported, files[:4])
        for row, p in zip(four, r.json()["predictions"], strict=True):
            # Four files, one batch of four, as predict runs them: the very same floats.
            assert {t["label"]: t["probability"] for t in p["top"]} == _by_class(row)
    finally:
        server.stop()
    assert "compiled batch sizes 1, 4" in "".join(server.lines)


def test_export_user_errors(exported, small_run, files, tmp_path, capsys):
    def error(argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        return " ".join(capsys.readouterr().err.split())

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "exists and is not empty" in error(["export", str(small_run), str(busy)])
    assert "not an exported folder; --overwrite replaces only those" in error(
        ["export", str(small_run), str(busy), "--overwrite"]
    )
    assert (busy / "notes.txt").read_text() == "mine"
    assert "a run folder; export into a new folder" in error(
        ["export", str(small_run), str(small_run)]
    )
    assert "not a springfield run folder" in error(["export", str(exported), str(tmp_path / "x")])
    # A damaged model file is a one-line error naming it, for predict and evaluate alike.
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "model.jaxexport").write_bytes(b"not flatbuffers")
    msg = error(["predict", str(broken), str(files[0])])
    assert "model.jaxexport: not a jax.export model" in msg and "Export the run again" in msg
    from springfield.errors import SpringfieldError
    from springfield.inference import load

    with pytest.raises(SpringfieldError, match="exported model predicts only"):
        load(exported).evaluate()
    # --overwrite replaces an export in place.
    again = tmp_path / "again"
    shutil.copytree(broken, again)
    assert main(["export", str(small_run), str(again), "--overwrite"]) == 0
    assert (again / "model.jaxexport").read_bytes() != b"not flatbuffers"
    assert load(again).classes == load(exported).classes


def test_a_tta_run_exports_its_mirror_averaging(small_run, files, tmp_path):
    # The same checkpoint evaluated with --tta (the flag only changes evaluation): the export
    # must average each image with its mirror image as the run's eval step does.
    run = tmp_path / "tta-run"
    shutil.copytree(small_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["tta"] = True
    (run / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "tta-export"
    assert main(["export", str(run), str(out)]) == 0
    assert json.loads((out / "preprocess.json").read_text())["tta"]["enabled"] is True

    from springfield.inference import load

    with_tta, without = load(run).probabilities(files), load(small_run).probabilities(files)
    assert np.abs(with_tta - without).max() > 1e-3  # TTA changes the answer here
    np.testing.assert_allclose(load(out).probabilities(files), with_tta, atol=1e-5, rtol=0)
