"""Models by name. Every model maps a float batch ``(B, H, W, 3)`` to logits ``(B, classes)``
and is called as ``model(x, train=..., rngs=...)``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
from flax import nnx

from springfield import kernels as _kernels
from springfield.errors import SpringfieldError
from springfield.models import pretrained
from springfield.models.activations import ACTIVATIONS, get_activation
from springfield.models.efficientnet import VARIANTS, EfficientNetLite
from springfield.models.ensemble import Ensemble
from springfield.models.refcnn import RefCNN
from springfield.models.resnet import ResNet
from springfield.models.seed import SeedCNN
from springfield.models.timm_resnet import DEPTHS, TimmResNet


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and the input size it was designed for, as (height, width)."""

    build: Callable[..., nnx.Module]
    image_size: tuple[int, int]
    min_size: int
    about: str
    any_size: bool = False
    """Global pooling before the head: the same weights take any input size (so
    ``--early-size`` can train it on smaller images first)."""
    mixstyle: bool = False
    """Takes ``mixstyle=P`` in training calls (``--mixstyle``)."""
    load_pretrained: Callable[[nnx.Module], None] | None = None
    """Loads the model's ImageNet weights (all but the head) into a built model, for
    ``--pretrained``; such a model also takes ``frozen=True`` in training calls."""


MODELS: dict[str, ModelSpec] = {
    "resnet": ModelSpec(
        lambda n, size, act, rngs: ResNet(n, act=act, rngs=rngs),
        (64, 64),
        ResNet.min_size,
        "small residual CNN with BatchNorm and global pooling (default)",
        any_size=True,
        mixstyle=True,
    ),
    "resnet-wide": ModelSpec(
        lambda n, size, act, rngs: ResNet(n, act=act, rngs=rngs, widths=(48, 96, 192), depth=2),
        (112, 112),
        ResNet.min_size,
        "wider, deeper residual CNN for real photos",
        any_size=True,
        mixstyle=True,
    ),
    "resnet4": ModelSpec(
        lambda n, size, act, rngs: ResNet(n, act=act, rngs=rngs, widths=(32, 64, 128, 256)),
        (96, 96),
        ResNet.min_size * 2,
        "resnet with a fourth stage (256 channels at 1/16 of the input): a 95 px receptive "
        "field instead of 47, for 1.25x the cost",
        any_size=True,
        mixstyle=True,
    ),
    "resnet-hires": ModelSpec(
        lambda n, size, act, rngs: ResNet(n, act=act, rngs=rngs, stem_convs=2),
        (128, 128),
        ResNet.min_size * 2,
        "resnet with a two-convolution stride-4 stem: 2x the input size at about its cost",
        any_size=True,
        mixstyle=True,
    ),
    "seed": ModelSpec(
        lambda n, size, act, rngs: SeedCNN(n, image_size=size, act=act, rngs=rngs),
        (160, 120),
        SeedCNN.min_size,
        "the original tutorial CNN (326,452 parameters for 4 classes)",
    ),
    "refcnn": ModelSpec(
        lambda n, size, act, rngs: RefCNN(n, image_size=size, act=act, rngs=rngs),
        (64, 64),
        RefCNN.min_size,
        "the framework benchmark's reference CNN",
    ),
}

for _name, _v in VARIANTS.items():
    MODELS[_name] = ModelSpec(
        functools.partial(
            lambda name, n, size, act, rngs: EfficientNetLite(n, name, rngs=rngs), _name
        ),
        (_v.image_size, _v.image_size),
        EfficientNetLite.min_size,
        f"{_name.replace('efficientnet', 'EfficientNet')} (ReLU6, no squeeze-excite), "
        f"pretrained on ImageNet at {_v.image_size} px by default (--no-pretrained: random)",
        any_size=True,
        load_pretrained=functools.partial(
            lambda name, model: pretrained.load_lite(model, name), _name
        ),
    )

for _name in DEPTHS:
    # No wheel ships their weights: --weights (a timm safetensors file or hub id), or random.
    MODELS[_name] = ModelSpec(
        functools.partial(lambda name, n, size, act, rngs: TimmResNet(n, name, rngs=rngs), _name),
        (224, 224),
        TimmResNet.min_size,
        f"{_name.replace('resnet', 'ResNet-')} as timm/torchvision build it (7x7 stem, "
        "max-pool, PyTorch padding): takes timm's ImageNet weights with --weights",
        any_size=True,
    )


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``, or a SpringfieldError listing the choices."""
    try:
        return MODELS[name]
    except KeyError:
        raise SpringfieldError(
            f"--model {name!r}: unknown; choose one of {', '.join(MODELS)}."
        ) from None


def check_image_size(
    name: str, image_size: tuple[int, int], flag: str = "--image-size"
) -> ModelSpec:
    """The spec of model ``name`` after checking that ``image_size`` (given by ``flag``) is
    large enough for it."""
    spec = model_spec(name)
    h, w = image_size
    if min(h, w) < spec.min_size:
        raise SpringfieldError(
            f"{flag} {h} {w}: too small for model {name!r}, which needs at least "
            f"{spec.min_size}x{spec.min_size} px (its default is "
            f"{spec.image_size[0]} {spec.image_size[1]})."
        )
    return spec


def check_ensemble(ensemble: int) -> None:
    """Refuse an ``--ensemble`` size below one."""
    if ensemble < 1:
        raise SpringfieldError(f"--ensemble {ensemble}: must be 1 (one model) or more.")


def build_model(
    name: str,
    num_classes: int,
    *,
    image_size: tuple[int, int],
    activation: str = "relu",
    seed: int = 0,
    ensemble: int = 1,
    precision: str = "float32",
    kernels: str | None = None,
) -> nnx.Module:
    """Build model ``name`` for ``num_classes`` classes and inputs of ``image_size``.

    ``ensemble > 1`` builds that many copies with different initial weights, wrapped in an
    :class:`~springfield.models.ensemble.Ensemble`. ``precision`` is that of the
    convolutions' products, ``kernels`` what runs the layers (``--kernels``; None: the
    enclosing :func:`springfield.kernels.use`'s, by default ``auto``).
    """
    check_image_size(name, image_size)
    check_ensemble(ensemble)
    key = (name, num_classes, tuple(image_size), get_activation(activation), seed, ensemble)
    # The structure is traced anew each time: the operations a layer uses are chosen when
    # it is built (springfield.kernels: --kernels, the precision).
    with _kernels.use(kernels, precision) as selection:
        graphdef = nnx.split(nnx.eval_shape(lambda: _construct(*key)))[0]
    return nnx.merge(graphdef, _init_program(*key, selection=selection)())


def _construct(
    name: str,
    num_classes: int,
    size: tuple[int, int],
    act: Callable,
    seed: int,
    ensemble: int,
) -> nnx.Module:
    # One Rngs stream for all members: each draws the next keys, so each starts elsewhere.
    rngs = nnx.Rngs(params=seed)
    members = [MODELS[name].build(num_classes, size, act, rngs) for _ in range(ensemble)]
    return members[0] if ensemble == 1 else Ensemble(members)


@functools.lru_cache(maxsize=32)
def _init_program(*key, selection: _kernels.Selection) -> Callable[[], nnx.State]:
    """The jitted program computing the initial weights of :func:`_construct` ``(*key)``,
    built with the kernels of ``selection``.

    Built eagerly, every initialiser compiles a program of its own (a truncated normal per
    weight shape): 18 s for the default model on a busy 2-core Zen 3. One program for all
    of them, compiled without LLVM's optimisations (it runs once), took 3.7 s there, and is
    kept for the next model of the same kind (tests, ensembles of runs, the LR finder). Its
    weights differ from the eager ones in the last bits at most.
    """

    def init() -> nnx.State:
        with _kernels.use_selection(selection):
            return nnx.state(_construct(*key))

    return jax.jit(init, compiler_options=_kernels.QUICK_COMPILE)


def model_of_config(cfg, num_classes: int, *, initial_weights: bool = True) -> nnx.Module:
    """:func:`build_model` with the model settings of a ``TrainConfig`` (training, the
    learning-rate finder and restoring a run all build the same network)."""
    model = build_model(
        cfg.model,
        num_classes,
        image_size=tuple(cfg.image_size),
        activation=cfg.activation,
        seed=cfg.seed,
        ensemble=cfg.ensemble,
        precision=cfg.precision,
        kernels=cfg.kernels,
    )
    if not initial_weights:  # a checkpoint's weights go in next
        return model
    if cfg.weights:
        pretrained.load_user_weights(model, cfg.model, cfg.weights)
    elif cfg.pretrained and MODELS[cfg.model].load_pretrained:
        MODELS[cfg.model].load_pretrained(model)
    return model


def starts_pretrained(cfg) -> bool:
    """Whether a run of ``cfg`` starts from trained weights (``--pretrained`` on a model that
    has them, or ``--weights``): fine-tuning, with ``--freeze-epochs`` and ``--lr-mult``."""
    return bool(cfg.weights) or bool(cfg.pretrained and MODELS[cfg.model].load_pretrained)


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "build_model",
    "check_ensemble",
    "check_image_size",
    "count_params",
    "model_spec",
    "starts_pretrained",
]
