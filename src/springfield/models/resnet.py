"""A small residual CNN for CPUs: the default model.

Stride-2 stem, one basic block (two 3x3 convs + BatchNorm + shortcut) per stage with the
width doubling and resolution halving at each stage, global average pooling, one dense
head. BatchNorm and the shortcut let it train at a high learning rate; global pooling keeps
the head tiny and makes it indifferent to the input size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from springfield.models.activations import Activation
from springfield.models.layers import Conv, activation_dtype, norm_impl
from springfield.models.mixstyle import mix_style

# Convolutions are springfield.models.layers.Conv and BatchNorm (+ ReLU) runs through
# layers.norm_impl: both from springfield.kernels, which runs them in one place (the same
# maths either way) and lets --precision bfloat16 hand bfloat16 activations between layers
# without a conversion pass at each BatchNorm (docs/performance.md).

# A short run's batch statistics drift too slowly with flax's default 0.99, which makes
# eval-mode accuracy look broken after a few hundred steps.
BN_MOMENTUM = 0.9


def _bn(n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # With bfloat16 activations it writes bfloat16 (statistics and parameters stay float32).
    return nnx.BatchNorm(n, momentum=BN_MOMENTUM, dtype=activation_dtype(), rngs=rngs)


class BasicBlock(nnx.Module):
    """``act(bn(conv(act(bn(conv(x))))) + shortcut(x))``; the shortcut is a strided 1x1 conv
    when the shape changes."""

    def __init__(
        self, cin: int, cout: int, stride: int, *, act: Activation, rngs: nnx.Rngs
    ) -> None:
        self.act = act
        self.norm = norm_impl()
        self.conv1 = Conv(
            cin, cout, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs
        )
        self.bn1 = _bn(cout, rngs)
        self.conv2 = Conv(cout, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = _bn(cout, rngs)
        self.proj = self.proj_bn = nnx.data(None)
        if stride != 1 or cin != cout:
            self.proj = Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.proj_bn = _bn(cout, rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = self.norm(self.bn1, self.conv1(x), train=train, act=self.act)
        y = self.norm(self.bn2, self.conv2(y), train=train)
        if self.proj is not None:
            x = self.norm(self.proj_bn, self.proj(x), train=train)
        return self.act(y + x)


class ResNet(nnx.Module):
    """Stem + ``len(widths)`` stages of ``depth`` basic blocks + global pool.

    The stem is ``stem_convs`` 3x3 stride-2 convolutions (each + BatchNorm + activation), so a
    2x larger input with one more stem convolution costs about the same in the stages.
    """

    min_size = 8

    def __init__(
        self,
        num_classes: int,
        *,
        act: Activation,
        rngs: nnx.Rngs,
        widths: tuple[int, ...] = (32, 64, 128),
        depth: int = 1,
        dropout: float = 0.0,
        stem_convs: int = 1,
    ) -> None:
        self.act = act
        self.norm = norm_impl()
        # Extra stem convolutions live apart from `stem`, so the one-conv models' parameter
        # names (and their saved checkpoints) stay as they were.
        self.pre_stem = self.pre_stem_bn = nnx.data(None)
        cin = 3
        if stem_convs > 1:
            pre, pre_bn = [], []
            for _ in range(stem_convs - 1):
                cout = max(8, widths[0] // 2)
                pre.append(
                    Conv(cin, cout, (3, 3), strides=2, padding="SAME", use_bias=False, rngs=rngs)
                )
                pre_bn.append(_bn(cout, rngs))
                cin = cout
            self.pre_stem, self.pre_stem_bn = nnx.List(pre), nnx.List(pre_bn)
        self.stem = Conv(
            cin, widths[0], (3, 3), strides=2, padding="SAME", use_bias=False, rngs=rngs
        )
        self.stem_bn = _bn(widths[0], rngs)
        blocks = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, act=act, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        # MixStyle's places, as in its paper: after the first two stages.
        self.mix_after = tuple(depth * (i + 1) - 1 for i in range(min(2, len(widths) - 1)))
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        mixstyle: float = 0.0,
    ) -> jax.Array:
        """Logits for ``x``. ``mixstyle``: in training, the chance per batch of MixStyle
        (:func:`~springfield.models.mixstyle.mix_style`) after each of the first two stages,
        drawing from ``rngs.mixstyle``."""
        if self.pre_stem is not None:
            for conv, bn in zip(self.pre_stem, self.pre_stem_bn, strict=True):
                x = self.norm(bn, conv(x), train=train, act=self.act)
        x = self.norm(self.stem_bn, self.stem(x), train=train, act=self.act)
        for i, block in enumerate(self.blocks):
            x = block(x, train=train)
            if train and mixstyle and i in self.mix_after:
                x = mix_style(x, rngs.mixstyle(), mixstyle)
        x = jnp.mean(x, axis=(1, 2))
        x = self.dropout(x, deterministic=not train or rngs is None, rngs=rngs)
        return self.head(x)
