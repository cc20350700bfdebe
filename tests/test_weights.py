"""``--weights``: timm-format safetensors into springfield's models, checked against timm.

timm builds each model with random weights (nothing is downloaded); its ``state_dict`` goes
through a real safetensors file into springfield's model, whose logits must then be
timm's. The BatchNorm statistics and affine parameters are randomised first: timm's
initial ones (mean 0, variance 1, scale 1, bias 0) would hide a swapped or dropped one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from springfield.errors import SpringfieldError
from springfield.models import build_model
from springfield.models.efficientnet import EfficientNetLite
from springfield.models.layers import xla_convolutions
from springfield.models.pretrained import load_user_weights, timm_lite_names, timm_resnet_names
from springfield.models.timm_resnet import IMAGENET_MEAN, IMAGENET_STD, TimmResNet

# PyPI's torchvision wheels are CUDA builds: beside the CPU torch their C extension does not
# load, and torchvision 0.28 then fails at import registering fake kernels for two of its
# ops without checking they exist ("operator torchvision::nms does not exist"). Declaring
# the two schemas lets its pure-Python part import, which is all timm uses (FrozenBatchNorm2d,
# transforms). The Library must stay referenced: deleting it removes the definitions.
_TORCHVISION_OPS = None


def _import_timm():
    global _TORCHVISION_OPS
    try:
        torch.ops.torchvision.nms  # noqa: B018 - the lookup is the test for the op
    except (AttributeError, RuntimeError):
        if _TORCHVISION_OPS is None:
            _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _TORCHVISION_OPS.define(
                    f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                )
    import timm

    return timm


timm = _import_timm()

CLASSES = 7
# Odd, unequal sides: PyTorch's symmetric padding and TensorFlow's SAME disagree on them.
SIZE = (67, 45)


def _timm_model(name: str, num_classes: int = CLASSES) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model.eval()


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _images() -> np.ndarray:
    return np.random.default_rng(2).uniform(0, 255, (2, *SIZE, 3)).astype(np.float32)


def _springfield_logits(name: str, weights: Path, images: np.ndarray) -> np.ndarray:
    # XLA's own float32 convolutions: oneDNN's may sum in another order.
    with xla_convolutions():
        model = build_model(name, CLASSES, image_size=SIZE)
    load_user_weights(model, name, str(weights), head=True)
    return np.asarray(model(images * 2 / 255 - 1, train=False))


def _timm_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()


def _close(ours: np.ndarray, theirs: np.ndarray) -> None:
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * max(scale, 1.0))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnet_safetensors_give_timms_logits(name: str, tmp_path: Path) -> None:
    ref = _timm_model(name)
    path = _save(ref, tmp_path / "model.safetensors")
    images = _images()
    # timm's ResNets take the ImageNet mean/std normalisation of x / 255.
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    theirs = _timm_logits(ref, (images / 255 - mean) / std)
    ours = _springfield_logits(name, path, images)
    assert ours.shape == (2, CLASSES)
    _close(ours, theirs)


def test_timm_efficientnet_lite_safetensors_give_timms_logits(tmp_path: Path) -> None:
    # tf_efficientnet_lite0: timm's port of the TensorFlow weights, with their SAME padding
    # and BatchNorm epsilon, as springfield's EfficientNetLite has.
    ref = _timm_model("tf_efficientnet_lite0")
    path = _save(ref, tmp_path / "lite0.safetensors")
    images = _images()
    # The input EfficientNetLite maps springfield's scaling to, as its first operation.
    inputs = (images * 2 / 255 - 1) * EfficientNetLite.input_scale + EfficientNetLite.input_shift
    theirs = _timm_logits(ref, inputs.astype(np.float32))
    ours = _springfield_logits("efficientnet-lite0", path, images)
    _close(ours, theirs)


def test_head_is_new_and_a_backbone_only_file_loads(tmp_path: Path) -> None:
    # --weights leaves the head as initialised (a new task's classes), so a file saved
    # without a classifier (timm's num_classes=0) loads as well as one with it.
    ref = _timm_model("resnet18", num_classes=0)
    path = _save(ref, tmp_path / "backbone.safetensors")
    with xla_convolutions():
        model = build_model("resnet18", CLASSES, image_size=SIZE)
    head_before = np.asarray(model.head.kernel[...]).copy()
    load_user_weights(model, "resnet18", str(path))
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), head_before)
    np.testing.assert_array_equal(
        np.asarray(model.stem.kernel[...]), ref.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        np.asarray(model.layers[3][1].bn2.var[...]), ref.layer4[1].bn2.running_var.numpy()
    )


def test_every_timm_key_has_a_place() -> None:
    # The mappings cover exactly timm's state_dicts, no more, for every depth and width
    # (only the structure matters: abstract models, nothing initialised).
    for name in ("resnet18", "resnet34", "resnet50"):
        with torch.device("meta"):  # names only: no weights initialised
            keys = set(timm.create_model(name, pretrained=False).state_dict())
        model = nnx.eval_shape(lambda n=name: TimmResNet(CLASSES, n, rngs=nnx.Rngs(0)))
        assert set(timm_resnet_names(model)) == keys, name
    for v in ("0", "1", "2"):
        with torch.device("meta"):
            keys = set(timm.create_model(f"tf_efficientnet_lite{v}", pretrained=False).state_dict())
        model = nnx.eval_shape(
            lambda v=v: EfficientNetLite(CLASSES, f"efficientnet-lite{v}", rngs=nnx.Rngs(0))
        )
        assert set(timm_lite_names(model)) == keys, v


# --- bad weights ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18() -> object:
    return build_model("resnet18", CLASSES, image_size=(32, 32))


def _error(model: object, name: str, weights: str) -> str:
    with pytest.raises(SpringfieldError) as e:
        load_user_weights(model, name, weights)
    return str(e.value)


def test_missing_file(resnet18: object, tmp_path: Path) -> None:
    msg = _error(resnet18, "resnet18", str(tmp_path / "nope.safetensors"))
    assert "--weights" in msg and "nope.safetensors" in msg and "no such file" in msg


def test_not_a_safetensors_file(resnet18: object, tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(_timm_model("resnet18").state_dict(), path)
    msg = _error(resnet18, "resnet18", str(path))
    assert "model.pth" in msg and "not a .safetensors file" in msg and "save_file" in msg


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file(resnet18: object, tmp_path: Path, damage: str) -> None:
    path = _save(_timm_model("resnet18"), tmp_path / "model.safetensors")
    data = path.read_bytes()
    path.write_bytes(b"\x07not safetensors at all" if damage == "garbage" else data[:-1000])
    msg = _error(resnet18, "resnet18", str(path))
    assert str(path) in msg and "not a readable safetensors file" in msg


def test_weights_of_another_depth(resnet18: object, tmp_path: Path) -> None:
    for other in ("resnet34", "resnet50"):
        path = _save(_timm_model(other), tmp_path / f"{other}.safetensors")
        msg = _error(resnet18, "resnet18", str(path))
        assert f"{other}.safetensors" in msg and "--model resnet18" in msg
        assert "is it the weights of this --model?" in msg


def test_weights_of_another_family(tmp_path: Path) -> None:
    path = _save(_timm_model("resnet18"), tmp_path / "r18.safetensors")
    # The names are checked before any value is read: an abstract model will do.
    lite = nnx.eval_shape(lambda: EfficientNetLite(CLASSES, "efficientnet-lite0", rngs=nnx.Rngs(0)))
    msg = _error(lite, "efficientnet-lite0", str(path))
    assert "r18.safetensors" in msg and "does not match the model's layers" in msg


def test_a_model_that_takes_no_weights(tmp_path: Path) -> None:
    path = _save(_timm_model("resnet18"), tmp_path / "r18.safetensors")
    model = build_model("resnet", CLASSES, image_size=(32, 32))
    msg = _error(model, "resnet", str(path))
    assert "--model resnet takes no pretrained weights" in msg and "resnet18" in msg


def test_hub_id_offline_names_the_file_to_fetch(
    resnet18: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub's own offline switch and an empty cache: nothing can be fetched.
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    msg = _error(resnet18, "resnet18", "timm/resnet18.a1_in1k")
    assert "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors" in msg
    assert "--weights /path/to/model.safetensors" in msg


def test_hub_id_of_timms_own_lite_weights(tmp_path: Path) -> None:
    # timm's efficientnet_lite* (not tf_) share the TF port's names but were trained with
    # PyTorch's padding and BatchNorm epsilon: they would load and be quietly wrong.
    lite = nnx.eval_shape(lambda: EfficientNetLite(CLASSES, "efficientnet-lite0", rngs=nnx.Rngs(0)))
    msg = _error(lite, "efficientnet-lite0", "timm/efficientnet_lite0.ra_in1k")
    assert "timm/tf_efficientnet_lite0.in1k" in msg


def test_neither_file_nor_hub_id(resnet18: object) -> None:
    msg = _error(resnet18, "resnet18", "not a file or an id")
    assert "neither a .safetensors file nor a Hugging Face Hub id" in msg


# --- end to end ------------------------------------------------------------------------


def test_train_from_weights(tmp_path: Path, tiny_folder: Path) -> None:
    """springfield train --model resnet18 --weights FILE: a fine-tune that runs to the end."""
    from springfield.cli import main

    path = _save(_timm_model("resnet18"), tmp_path / "r18.safetensors")
    workdir = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(tiny_folder),
        "--workdir",
        str(workdir),
        "--model",
        "resnet18",
        "--weights",
        str(path),
        "--epochs",
        "2",
        "--freeze-epochs",
        "1",
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
    assert main(argv) == 0
    assert any(workdir.iterdir())
