"""A plain PyTorch training script: the side ``benchmarks/endtoend.py`` races springfield with.

Written the way a practitioner writes one (a torchvision-style ImageFolder dataset and
transforms, a DataLoader with worker processes, AdamW with OneCycleLR, an evaluation pass per
epoch), with
springfield's recipe: the same network (``resnet``, springfield's default, or ``refcnn``),
the same optimizer, schedule, weight decay, batch size, input size and light augmentation
(random resized crop of 70-100% of the area, horizontal flip, colour jitter 0.1), on the
GPU when there is one (pinned DataLoader memory, non-blocking copies). Only
PyTorch, Pillow and numpy: it imports nothing from springfield. (torchvision itself has no
wheel for the CPU build of torch 2.13 on PyPI, so its ImageFolder and the four transforms
are written out below, as torchvision defines them.)

    python benchmarks/torch_train.py --data SPLIT --epochs 10 [--compile] [--bf16]

``SPLIT`` holds ``train/<class>/`` and ``val/<class>/``. The last line printed is one JSON
object: wall and first-step times, per-epoch train img/s, the final validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import nn

EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def process_seconds() -> float:
    """Seconds since this process started (its imports included), from /proc on Linux."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


class ImageFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder: ``root/<class>/<image>``, classes in sorted order."""

    def __init__(self, root: str, transform) -> None:
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.samples = [
            (os.path.join(root, c, f), i)
            for i, c in enumerate(self.classes)
            for f in sorted(os.listdir(os.path.join(root, c)))
            if f.lower().endswith(EXTENSIONS)
        ]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def to_tensor(im: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize(0.5, 0.5): CHW float32 in [-1, 1], as springfield normalises."""
    x = torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1)
    return x * (2.0 / 255.0) - 1.0


def train_transform(size: tuple[int, int]):
    """RandomResizedCrop(size, scale=(0.7, 1)), RandomHorizontalFlip, ColorJitter(0.1, 0.1,
    0.1): springfield's ``light`` augmentation."""
    h, w = size

    def tf(im: Image.Image) -> torch.Tensor:
        rng = np.random  # DataLoader seeds each worker's numpy generator
        iw, ih = im.size
        area = rng.uniform(0.7, 1.0) * iw * ih
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = min(iw, round(np.sqrt(area * aspect)))
        ch = min(ih, round(np.sqrt(area / aspect)))
        x0, y0 = rng.randint(0, iw - cw + 1), rng.randint(0, ih - ch + 1)
        im = im.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        if rng.rand() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            im = enhance(im).enhance(rng.uniform(0.9, 1.1))
        return to_tensor(im)

    return tf


def val_transform(size: tuple[int, int]):
    """Resize(size) (antialiased bilinear), then the tensor conversion."""
    h, w = size
    return lambda im: to_tensor(im.resize((w, h), Image.BILINEAR))


class BasicBlock(nn.Module):
    """springfield's basic block: conv-bn-relu-conv-bn plus a (projected) shortcut, relu."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.1)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, momentum=0.1)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet(nn.Module):
    """springfield's ``resnet``: stride-2 stem, one block per stage (32, 64, 128), global
    average pool, linear head. (BatchNorm momentum 0.1 here is flax's 0.9.)"""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0], momentum=0.1),
            nn.ReLU(),
        )
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks.append(BasicBlock(cin, cout, 2 if i > 0 else 1))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def refcnn(num_classes: int, size: tuple[int, int]) -> nn.Module:
    """springfield's ``refcnn``: three conv3x3-relu-avgpool blocks, dense 256, head."""
    layers: list[nn.Module] = []
    (h, w), cin = size, 3
    for c in (32, 64, 128):
        layers += [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
        h, w, cin = h // 2, w // 2, c
    layers += [nn.Flatten(), nn.Linear(h * w * cin, 256), nn.ReLU(), nn.Linear(256, num_classes)]
    return nn.Sequential(*layers)


def build_model(name: str, num_classes: int, size: tuple[int, int]) -> nn.Module:
    """``resnet``, ``resnet4`` or ``refcnn`` in PyTorch (PyTorch's default initialisation)."""
    if name == "resnet":
        return ResNet(num_classes)
    if name == "resnet4":
        return ResNet(num_classes, widths=(32, 64, 128, 256))
    if name == "refcnn":
        return refcnn(num_classes, size)
    raise SystemExit(f"--model {name!r}: choose resnet, resnet4 or refcnn")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--model", default="resnet", help="resnet (default), resnet4 or refcnn")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--bf16", action="store_true", help="torch.autocast(dtype=torch.bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = (args.image_size, args.image_size)
    train_set = ImageFolder(os.path.join(args.data, "train"), train_transform(size))
    val_set = ImageFolder(os.path.join(args.data, "val"), val_transform(size))
    # The GPU when there is one, as a PyTorch user's script picks it.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader_kw = dict(
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        pin_memory=device.type == "cuda",
    )
    train_loader = torch.utils.data.DataLoader(
        train_set, args.batch_size, shuffle=True, drop_last=True, **loader_kw
    )
    val_loader = torch.utils.data.DataLoader(val_set, 128, **loader_kw)

    model = build_model(args.model, len(train_set.classes), size)
    model = model.to(device, memory_format=torch.channels_last)
    fwd = torch.compile(model) if args.compile else model
    # fused=True: PyTorch's fastest AdamW on a CPU (benchmarks/torch_adam.py).
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True
    )
    # optax.cosine_onecycle_schedule's shape (springfield's onecycle); no momentum cycling.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, args.lr, total_steps=args.epochs * len(train_loader), cycle_momentum=False
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    first_step_s, epochs = None, []
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
        for x, y in train_loader:
            x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast:
                loss = F.cross_entropy(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            # Summed where it is: a float() per step would wait for the GPU every step.
            loss_sum += loss.detach().float() * len(y)
            if first_step_s is None:
                float(loss)
                first_step_s = process_seconds()
        loss_sum = float(loss_sum)  # waits for the epoch's last step
        train_s = time.perf_counter() - t0
        model.eval()
        correct = total = 0
        with torch.inference_mode(), autocast:
            for x, y in val_loader:
                x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
                pred = fwd(x).argmax(1).cpu()
                correct += int((pred == y).sum())
                total += len(y)
        epochs.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "train_img_s": seen / train_s,
                "epoch_seconds": train_s,
                "val_accuracy": correct / total,
            }
        )
        print(
            f"epoch {epoch:3d}  loss {loss_sum / seen:.4f}  val acc {correct / total:.3f}  "
            f"{seen / train_s:.0f} img/s",
            flush=True,
        )
    print(
        json.dumps(
            {
                "first_step_s": first_step_s,
                "wall_s": process_seconds(),
                "val_accuracy": epochs[-1]["val_accuracy"],
                "val_n": len(val_set),
                "epochs": epochs,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
