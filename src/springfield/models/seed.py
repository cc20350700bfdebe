"""The original tutorial network, faithfully: five conv/avg-pool blocks and three dense layers.

Input 160x120 (height x width) RGB. 326,452 parameters for four classes. The only change is
where the softmax lives: the model returns logits and the loss applies log-softmax itself,
which is numerically safe where the tutorial took ``log`` of softmax outputs.
"""

from __future__ import annotations

import jax
from flax import nnx

from springfield.models.activations import Activation
from springfield.models.layers import Conv, Dense, conv_act_pool

CHANNELS = (128, 128, 64, 32, 16)


class SeedCNN(nnx.Module):
    """Conv3x3(SAME) -> act -> avg-pool 2x2 for 128, 128, 64, 32, 16 channels; flatten;
    Dense 256 -> act -> Dense 64 -> act -> Dense(num_classes)."""

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
        self.fc1 = Dense(h * w * CHANNELS[-1], 256, rngs=rngs)
        self.fc2 = Dense(256, 64, rngs=rngs)
        self.head = Dense(64, num_classes, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        for i, conv in enumerate(self.convs):
            # The image needs no gradient: the first block skips computing it.
            x = conv_act_pool(conv, self.act, x, input_grad=i > 0)
        x = x.reshape(x.shape[0], -1)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.head(x)
