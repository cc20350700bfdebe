"""Which kernels the models built now use: ``--kernels``, the precision, and finer options.

Read when a model is built (each layer keeps the functions chosen then), so a context
manager around the building is all it takes; nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

KERNELS = ("auto", "xla", "onednn")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class KernelOptions:
    """Finer choices within oneDNN's kernels, for tests and benchmarks; the defaults are what
    a run uses. (Set with :func:`use`; none changes a run's numbers except where noted.)"""

    fuse_blocks: bool = True
    """``refcnn``'s and ``seed``'s conv + bias + ReLU + 2x2 average-pool blocks as one oneDNN
    call each way (else a oneDNN convolution and XLA for the rest)."""
    fuse_norm: bool = True
    """BatchNorm (+ ReLU) in oneDNN (else XLA's, around oneDNN's convolutions)."""
    fuse_relu6: bool = True
    """With ``fuse_norm``, ReLU6 (EfficientNet-Lite's) in the same call as the BatchNorm
    before it (``norm.cc``'s own loops; else oneDNN's BatchNorm and XLA's ReLU6)."""
    bf16_activations: bool = True
    """Under ``--precision bfloat16``, bfloat16 activations between oneDNN's layers (else
    float32 ones, with bfloat16 products only)."""
    bf16_dense: bool | None = None
    """Under ``--precision bfloat16``, dense layers' products in bfloat16 in oneDNN: None
    does so except on CPUs with AMX, where oneDNN's skinny bfloat16 products measured no
    faster than XLA's float32 dot (docs/performance.md)."""
    onednn_depthwise: bool = True
    """Depthwise convolutions (EfficientNet-Lite) in oneDNN's depthwise kernels (else XLA's
    shifted sums, :mod:`springfield.kernels.depthwise`)."""
    own_depthwise_grad: bool = True
    """The depthwise layers' 5x5 weight gradients in springfield's own AVX-512 loop
    (``conv.cc``; else oneDNN's generic kernel: it has no depthwise one for them)."""
    fused_adam: bool = True
    """Adam and AdamW as one in-place kernel pass, with optax's numbers bit for bit."""
    block_chunk_kb: int = 4096
    """The fused blocks run this many kilobytes of their convolution's output at a time, so
    that it stays in cache (the weight gradient's sum over chunks depends on it)."""


@dataclass(frozen=True)
class Selection:
    """What :func:`selected` returns: ``--kernels``, ``--precision``, the options, and
    whether the model must be portable (XLA's plain operations only, for ``jax.export``)."""

    kernels: str = "auto"
    precision: str = "float32"
    options: KernelOptions = KernelOptions()
    portable: bool = False


_CURRENT: contextvars.ContextVar[Selection] = contextvars.ContextVar(
    "springfield_kernels",
    default=Selection(),  # noqa: B039 - frozen
)


def selected() -> Selection:
    """The selection models built now follow (the default: ``auto``, float32)."""
    return _CURRENT.get()


def check_kernels(kernels: str) -> None:
    """Refuse an unknown ``--kernels`` value."""
    if kernels not in KERNELS:
        from springfield.errors import SpringfieldError

        raise SpringfieldError(
            f"--kernels {kernels!r}: unknown; choose one of {', '.join(KERNELS)} "
            "(auto: oneDNN where it can run)."
        )


@contextlib.contextmanager
def use_selection(selection: Selection) -> Iterator[Selection]:
    """Models built inside follow ``selection`` (one :func:`selected` returned)."""
    token = _CURRENT.set(selection)
    try:
        yield selection
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def use(
    kernels: str | None = None, precision: str | None = None, **options: object
) -> Iterator[Selection]:
    """Models built inside run on ``kernels`` (``auto``, ``xla`` or ``onednn``) in
    ``precision`` (``float32``, or ``bfloat16`` products), with :class:`KernelOptions`
    fields changed as given; what is not given stays as the enclosing selection has it
    (inside :func:`portable`, the model stays portable)."""
    current = _CURRENT.get()
    if kernels is not None:
        check_kernels(kernels)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    changed = dataclasses.replace(
        current,
        kernels=current.kernels if kernels is None else kernels,
        precision=current.precision if precision is None else precision,
        options=dataclasses.replace(current.options, **options),
    )
    with use_selection(changed) as selection:
        yield selection


@contextlib.contextmanager
def portable() -> Iterator[Selection]:
    """Models built inside use XLA's plain operations only (``lax.conv_general_dilated``
    for every convolution, whatever ``--kernels`` and ``--precision`` say): no oneDNN custom
    call, whose FFI target exists only in a process that loaded springfield's kernels, so
    that ``jax.export`` can serialise the model for any machine
    (:mod:`springfield.export_writer`)."""
    with use_selection(dataclasses.replace(_CURRENT.get(), portable=True)) as selection:
        yield selection
