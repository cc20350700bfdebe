"""``springfield export RUN OUT``: the run's inference forward pass as a portable folder.

The forward pass is serialised with :mod:`jax.export` (StableHLO with a symbolic batch
dimension), with the parameters baked in as constants, on XLA's convolutions: the oneDNN
kernels (:mod:`springfield.kernels.onednn`) are an FFI custom call that exists only in a
process that built and registered them, so a model that used them would not run anywhere
else. :mod:`springfield.export_reader` reads the folder back without the training code.

Before writing, the export is run back and compared with the run folder itself on a few
images: a folder that would not give the run's probabilities (to 1e-5) is never written.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from springfield.errors import SpringfieldError
from springfield.export_reader import (
    CLASSES_FILE,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    MODEL_FILE,
    PREPROCESS_FILE,
    is_export_dir,
    load_export,
)

PLATFORMS = ("cpu", "cuda")
TOLERANCE = 1e-5


def _forward(trained):
    """``uint8 (B, H, W, 3) -> logits (B, classes)`` of a restored run, parameters closed over
    (so that the export bakes them in): the eval step's preprocessing and test-time
    augmentation, the very functions."""
    from flax import nnx

    from springfield.training.steps import inference_logits, preprocess

    model = nnx.merge(trained.graphdef, trained.params, trained.rest)
    tta = trained.config.tta

    def forward(images):
        return inference_logits(model, preprocess(images), tta=tta)

    return forward


def preprocess_spec(image_size: tuple[int, int], tta: bool) -> dict:
    """``preprocess.json``: what the images must look like before they go into the model,
    for programs that do not use springfield's decoder (the numbers are the train step's)."""
    from springfield.training.steps import INPUT_OFFSET, INPUT_SCALE

    h, w = image_size
    return {
        "image_size": [h, w],
        "input": "uint8 RGB, shape (batch, height, width, 3), any batch size",
        "decode": (
            "format sniffed from the bytes (JPEG, PNG, GIF, BMP, WEBP, TIFF); EXIF orientation "
            "applied; grayscale, palette, CMYK and 16-bit converted to RGB; transparency "
            "composited over white; first frame of an animation"
        ),
        "resize": f"bicubic (Pillow, reducing_gap=3) straight to {h}x{w}: no crop, no padding",
        "normalisation": {
            "formula": "x * scale + offset",
            "scale": INPUT_SCALE,
            "offset": INPUT_OFFSET,
            "where": "inside model.jaxexport: feed uint8",
        },
        "tta": {
            "enabled": tta,
            "what": "logits averaged with those of the mirrored image",
            "where": "inside model.jaxexport",
        },
        "output": "float32 logits (batch, classes) in classes.json order; softmax: probabilities",
    }


def export_run(
    run_dir: Path,
    out_dir: Path,
    *,
    allow_import: bool = False,
    overwrite: bool = False,
    platforms: tuple[str, ...] = PLATFORMS,
) -> dict:
    """Write the exported folder ``out_dir`` for the run folder ``run_dir``; returns its
    ``export.json`` record (plus ``max_abs_diff``, the check against the run folder).

    Raises:
        SpringfieldError: not a run folder, ``out_dir`` exists (without ``overwrite``) or is
            a run folder, a platform JAX cannot lower for, or an export that disagrees with
            the run.
    """
    import jax
    from jax import export

    from springfield.inference import classifier_of_run
    from springfield.models.layers import xla_convolutions
    from springfield.trained_run import load_run

    run_dir, out_dir = Path(run_dir).absolute(), Path(out_dir).absolute()
    if out_dir.exists():
        if (out_dir / "config.json").exists():
            raise SpringfieldError(f"{out_dir}: a run folder; export into a new folder.")
        if not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise SpringfieldError(
                f"{out_dir}: exists and is not empty. Pick a new folder, or pass --overwrite."
            )
        if overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
            if not is_export_dir(out_dir):
                raise SpringfieldError(
                    f"{out_dir}: not an exported folder; --overwrite replaces only those."
                )
    # Built inside xla_convolutions: XLA's convolutions, which serialise portably.
    with xla_convolutions():
        trained = load_run(run_dir, allow_import=allow_import)
    h, w = trained.image_size
    (batch,) = export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, h, w, 3), np.uint8)
    try:
        exp = export.export(jax.jit(_forward(trained)), platforms=tuple(platforms))(spec)
    except (ValueError, NotImplementedError) as e:
        raise SpringfieldError(f"--platform {', '.join(platforms)}: JAX cannot export: {e}") from e
    custom = [c for c in ("springfield_onednn",) if c in exp.mlir_module()]
    if custom:  # xla_convolutions() failed to keep the kernels out: never ship that
        raise SpringfieldError(f"{run_dir}: the export still calls {custom}; please report.")
    accuracy = None
    if (run_dir / "eval.json").exists():
        accuracy = json.loads((run_dir / "eval.json").read_text()).get("accuracy")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": trained.config.model,
        "classes": trained.classes,
        "image_size": [h, w],
        "step": trained.step,
        "val_accuracy": accuracy,
        "tta": trained.config.tta,
        "source": str(run_dir),
        "platforms": list(exp.platforms),
        "jax_version": jax.__version__,
        "springfield_version": importlib.metadata.version("springfield"),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    files = {
        MODEL_FILE: bytes(exp.serialize()),
        CLASSES_FILE: json.dumps(trained.classes, indent=1).encode(),
        PREPROCESS_FILE: json.dumps(preprocess_spec((h, w), trained.config.tta), indent=1).encode(),
        META_FILE: json.dumps(meta, indent=1).encode(),
    }
    # Written next to the target and renamed into place: no half-written export on failure.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would keep a serving user out
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        diff = _check_against_run(
            load_export(tmp), classifier_of_run(load_run(run_dir, allow_import=allow_import))
        )
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**meta, "max_abs_diff": diff}


def _check_against_run(exported, classifier) -> float:
    """Largest difference between the export's and the run's probabilities on random images
    at two batch sizes; raises when over :data:`TOLERANCE`."""
    import jax

    h, w = exported.image_size
    images = np.random.default_rng(0).integers(0, 256, (5, h, w, 3), dtype=np.uint8)
    worst = 0.0
    for n in (1, 5):
        ours = np.asarray(jax.nn.softmax(exported.logits(images[:n])))
        theirs = classifier.probabilities_of_arrays(images[:n])
        worst = max(worst, float(np.abs(ours - theirs).max()))
    if worst > TOLERANCE:
        raise SpringfieldError(
            f"the export's probabilities differ from the run's by {worst:.2g} (> {TOLERANCE}); "
            "nothing was written. Please report this with the run's config.json."
        )
    return worst


__all__ = ["PLATFORMS", "export_run"]
