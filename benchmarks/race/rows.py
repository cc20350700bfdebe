"""The race's rows (which worker process runs each, in which environment) and the one place
that knows how springfield's kernel variants are switched on.

The rows name their variant by what it means (``SPRINGFIELD_VARIANTS``); only the three
functions below turn that into springfield's interface: ``kernels.use`` / ``kernels.portable``
around model building and ``kernels.optimizer_update`` (:func:`springfield_kernels`),
``setup_runtime(xla_flags=...)`` (:func:`start_springfield`) and the huge-page malloc
setting the ``springfield`` command gives itself (:func:`springfield_env`).
"""

from __future__ import annotations

from dataclasses import dataclass

# springfield's variant workers, by meaning: "kernels" xla = XLA's kernels instead of
# oneDNN's; "xla_flags" default = plain JAX (none of springfield's XLA flags); "conv" lax =
# a portable model (plain lax.conv_general_dilated convolutions).
SPRINGFIELD_VARIANTS: dict[str, dict[str, str]] = {
    "springfield": {},
    "springfield-xla-default": {"kernels": "xla", "xla_flags": "default"},
    "springfield-lax-conv": {"conv": "lax"},
    "springfield-xla-conv": {"kernels": "xla"},
}


def springfield_env(proc: str, malloc: bool) -> dict[str, str]:
    """The environment variables of worker ``proc``: (``malloc``) the huge-page malloc
    setting the ``springfield`` command gives itself."""
    if not malloc:
        return {}
    from springfield.kernels.tuning import malloc_env

    return dict(malloc_env())


def start_springfield(proc: str) -> None:
    """In a springfield worker, before JAX starts: what the ``springfield`` command does at
    start (its XLA flags, except for plain JAX)."""
    from springfield.runtime import setup_runtime

    options = SPRINGFIELD_VARIANTS.get(proc, {})
    setup_runtime(xla_flags=options.get("xla_flags") != "default")


def springfield_kernels(proc: str) -> tuple[str, bool]:
    """``(kernels, portable)`` for building worker ``proc``'s model and optimizer update:
    ``--kernels`` (``auto`` or ``xla``) and whether the model is built portable."""
    options = SPRINGFIELD_VARIANTS.get(proc, {})
    return options.get("kernels", "auto"), options.get("conv") == "lax"


def uses_springfield_malloc(proc: str) -> bool:
    """springfield's own rows run with its malloc setting; plain JAX does not."""
    return proc in SPRINGFIELD_VARIANTS and proc != "springfield-xla-default"


@dataclass(frozen=True)
class Row:
    """One framework row: which worker process runs it and how."""

    name: str
    proc: str  # rows with the same proc share one worker process
    env: tuple[tuple[str, str], ...] = ()


ROWS = {
    r.name: r
    for r in (
        Row("springfield", "springfield"),
        Row("springfield-bf16", "springfield"),
        Row("springfield-xla-default", "springfield-xla-default"),
        Row("springfield-lax-conv", "springfield-lax-conv"),
        Row("springfield-xla-conv", "springfield-xla-conv"),
        Row("torch-eager", "torch"),
        Row("torch-compile", "torch"),
        Row("torch-eager-bf16", "torch"),
        Row("torch-compile-bf16", "torch"),
        Row("keras-tf", "keras-tf", (("KERAS_BACKEND", "tensorflow"),)),
        Row("keras-tf-xla", "keras-tf", (("KERAS_BACKEND", "tensorflow"),)),
        # Keras' dtype policy is global to a process: the mixed_bfloat16 rows get their own.
        Row("keras-tf-bf16", "keras-tf-bf16", (("KERAS_BACKEND", "tensorflow"),)),
        Row("keras-tf-xla-bf16", "keras-tf-bf16", (("KERAS_BACKEND", "tensorflow"),)),
        Row("keras-jax", "keras-jax", (("KERAS_BACKEND", "jax"),)),
    )
}
DEFAULT_FRAMEWORKS = (
    "springfield,springfield-bf16,springfield-xla-conv,springfield-xla-default,torch-eager,"
    "torch-compile,torch-eager-bf16,torch-compile-bf16,"
    "keras-tf,keras-tf-xla,keras-tf-bf16,keras-tf-xla-bf16,keras-jax"
)


def precision_of(row: str) -> str:
    """What a row's convolutions and dense layers multiply in: ``bfloat16`` for the -bf16
    rows (springfield ``--precision bfloat16``, torch.autocast, Keras mixed_bfloat16)."""
    return "bfloat16" if row.endswith("-bf16") else "float32"


def worker_env(proc: str, hugepages_all: bool) -> dict[str, str]:
    """The environment of worker ``proc`` on top of the parent's: its rows' variables, the
    springfield variant's switches, and (``hugepages_all``: every framework) springfield's
    malloc setting."""
    env: dict[str, str] = {}
    for row in ROWS.values():
        if row.proc == proc:
            env.update(row.env)
    if proc in SPRINGFIELD_VARIANTS:
        env.update(springfield_env(proc, malloc=hugepages_all or uses_springfield_malloc(proc)))
    elif hugepages_all:
        env = {**springfield_env("", malloc=True), **env}
    return env
