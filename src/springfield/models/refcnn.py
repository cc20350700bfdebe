"""The reference network of the framework benchmark (benchmarks/frameworks.py).

conv3x3 32 -> act -> avg-pool 2, conv 64, conv 128 (same pattern), flatten, dense 256 ->
act, dense num_classes. The same network is written in PyTorch and Keras there.
"""

from __future__ import annotations

import jax
from flax import nnx

from springfield.models.activations import Activation
from springfield.models.layers import Conv, Dense, conv_act_pool

CHANNELS = (32, 64, 128)


class RefCNN(nnx.Module):
    """Three conv/avg-pool blocks (32, 64, 128 channels), dense 256, dense head."""

    min_size = 2 ** len(CHANNELS)

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: tuple[int, int],
        act: Activation,
        rngs: nnx.Rngs,
    ) -> None:
        self.act = act
        chans = (3, *CHANNELS)
        self.convs = nnx.List(
            Conv(cin, cout, (3, 3), materialise=False, padding="SAME", rngs=rngs)
            for cin, cout in zip(chans[:-1], chans[1:], strict=True)
        )
        h, w = image_size
        for _ in CHANNELS:
            h, w = h // 2, w // 2
        self.fc = Dense(h * w * CHANNELS[-1], 256, rngs=rngs)
        self.head = Dense(256, num_classes, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        for i, conv in enumerate(self.convs):
            # The image needs no gradient: the first block skips computing it.
            x = conv_act_pool(conv, self.act, x, input_grad=i > 0)
        x = x.reshape(x.shape[0], -1)
        return self.head(self.act(self.fc(x)))
