"""The ImageNet ResNets (He et al. 2015) as timm and torchvision build them, in flax.nnx.

ResNet-18 and -34 stack BasicBlocks (two 3x3 convolutions), ResNet-50 Bottlenecks (1x1
reduce, 3x3 with the stage's stride, as in torchvision's "ResNet v1.5", 1x1 expand to 4x the
width). All start with a 7x7 stride-2 convolution and a 3x3 stride-2 max-pool and end with
global average pooling and a linear classifier. Padding is PyTorch's: explicit and symmetric
(``k // 2`` on each side), not TensorFlow's "SAME", which pads stride-2 layers on the bottom
and right only and would shift every feature map by a pixel against the weights' training.

Layer names follow the structure (``stem``, ``layers[s][i].conv1...``, ``head``);
:func:`springfield.models.pretrained.timm_resnet_names` maps timm's keys onto them, so a
timm-format safetensors file loads with ``--weights``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from springfield.models.layers import Conv, activation_dtype, norm_impl

# PyTorch's BatchNorm2d defaults, which the weights were trained with; momentum is
# springfield's (0.9 is PyTorch's 0.1 written the other way round).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# torchvision's and timm's ImageNet normalisation of x / 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Depth:
    """One member of the family: its block type and blocks per stage."""

    bottleneck: bool
    blocks: tuple[int, int, int, int]


DEPTHS = {
    "resnet18": Depth(False, (2, 2, 2, 2)),
    "resnet34": Depth(False, (3, 4, 6, 3)),
    "resnet50": Depth(True, (3, 4, 6, 3)),
}

WIDTHS = (64, 128, 256, 512)


def _bn(n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        n, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=activation_dtype(), rngs=rngs
    )


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    p = k // 2
    return Conv(
        cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)), use_bias=False, rngs=rngs
    )


class Block(nnx.Module):
    """A BasicBlock (``bottleneck=False``: 3x3, 3x3) or a Bottleneck (1x1, 3x3 with the
    stride, 1x1 to ``4 * width``), each convolution followed by BatchNorm, ReLU after each
    but the last, which is added to the shortcut first. The shortcut is a strided 1x1
    convolution + BatchNorm (timm's ``downsample``) when the shape changes."""

    def __init__(
        self, cin: int, width: int, stride: int, *, bottleneck: bool, rngs: nnx.Rngs
    ) -> None:
        self.norm = norm_impl()
        cout = width * 4 if bottleneck else width
        if bottleneck:
            self.conv1 = _conv(cin, width, 1, 1, rngs)
            self.bn1 = _bn(width, rngs)
            self.conv2 = _conv(width, width, 3, stride, rngs)
            self.bn2 = _bn(width, rngs)
            self.conv3 = _conv(width, cout, 1, 1, rngs)
            self.bn3 = _bn(cout, rngs)
        else:
            self.conv1 = _conv(cin, width, 3, stride, rngs)
            self.bn1 = _bn(width, rngs)
            self.conv2 = _conv(width, width, 3, 1, rngs)
            self.bn2 = _bn(width, rngs)
            self.conv3 = self.bn3 = nnx.data(None)
        self.down = self.down_bn = nnx.data(None)
        if stride != 1 or cin != cout:
            self.down = _conv(cin, cout, 1, stride, rngs)
            self.down_bn = _bn(cout, rngs)
        self.out_features = cout

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        relu = jax.nn.relu
        y = self.norm(self.bn1, self.conv1(x), train=train, act=relu)
        if self.conv3 is None:
            y = self.norm(self.bn2, self.conv2(y), train=train)
        else:
            y = self.norm(self.bn2, self.conv2(y), train=train, act=relu)
            y = self.norm(self.bn3, self.conv3(y), train=train)
        if self.down is not None:
            x = self.norm(self.down_bn, self.down(x), train=train)
        return relu(y + x)


class TimmResNet(nnx.Module):
    """ResNet ``depth`` (``resnet18``, ``resnet34`` or ``resnet50``) with a
    ``num_classes``-way linear head.

    Takes springfield's input scaling (``x * 2 / 255 - 1``) and maps it to the ImageNet
    mean/std normalisation of ``x / 255`` the weights expect as its first operation, so the
    same weights work in every path (training, evaluation, export). :meth:`__call__` with
    ``frozen=True`` runs the body in inference mode and stops gradients at its output.
    """

    # The stem and max-pool divide by 4, the stages by 8 more: 32 px leave a 1x1 map.
    min_size = 32
    layer_groups = 3
    # x / 255 = (x_springfield + 1) / 2, then (x / 255 - mean) / std: one multiply-add per
    # channel, kept as Python floats so they are constants, not state.
    input_scale = tuple(0.5 / s for s in IMAGENET_STD)
    input_shift = tuple((0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))

    def __init__(self, num_classes: int, depth: str, *, rngs: nnx.Rngs) -> None:
        d = DEPTHS[depth]
        self.norm = norm_impl()
        self.stem = _conv(3, 64, 7, 2, rngs)
        self.stem_bn = _bn(64, rngs)
        stages = []
        cin = 64
        for s, (width, count) in enumerate(zip(WIDTHS, d.blocks, strict=True)):
            blocks = []
            for i in range(count):
                stride = 2 if s > 0 and i == 0 else 1
                block = Block(cin, width, stride, bottleneck=d.bottleneck, rngs=rngs)
                cin = block.out_features
                blocks.append(block)
            stages.append(nnx.List(blocks))
        self.layers = nnx.List(stages)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def layer_group(self, path: tuple[str, ...]) -> int:
        """Fine-tuning's layer group of the parameter at ``path``: 0 for the stem and the
        first two stages, 1 for the last two, 2 for the head."""
        if path[0] == "head":
            return 2
        if path[0].startswith("stem") or (path[0] == "layers" and int(path[1]) < 2):
            return 0
        return 1

    def features(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Pooled features (512 or 2048) of images scaled as springfield scales them."""
        x = x * jnp.asarray(self.input_scale, x.dtype) + jnp.asarray(self.input_shift, x.dtype)
        x = self.norm(self.stem_bn, self.stem(x), train=train, act=jax.nn.relu)
        # PyTorch's MaxPool2d(3, 2, padding=1): the padding never wins the maximum.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.layers:
            for block in stage:
                x = block(x, train=train)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        frozen: bool = False,
    ) -> jax.Array:
        """Logits for ``x``. ``frozen``: the body in inference mode and out of the gradient
        (fine-tuning's first phase)."""
        if frozen:
            feats = lax.stop_gradient(self.features(x, train=False))
        else:
            feats = self.features(x, train=train)
        return self.head(feats)
