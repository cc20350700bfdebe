"""Where one springfield train (or eval) step spends its time on this CPU.

Builds a springfield model, compiles springfield's own step and prints

* XLA's cost analysis of the compiled step (FLOPs, bytes accessed);
* the step time (best of a few timed groups) and the implied GFLOP/s;
* the slowest XLA thunks in a ``jax.profiler`` trace (fusions, convolutions, YNN/Eigen
  calls, by HLO name). Convolutions run asynchronously in Eigen's thread pool, so their
  trace events show only the hand-off: their cost shows up as the gap between the step time
  and the sum of the listed fusions.

XLA's cost analysis does not see inside the oneDNN convolutions (FFI calls), so where they
run its FLOP count covers only the rest of the step.

``--conv-layers`` times each convolution of the model alone (forward, input gradient,
weight gradient) at the shapes the step uses, with the convolution the model uses.

``--compare-conv`` instead times the step in one process, interleaved, with each
convolution path: plain ``lax.conv_general_dilated`` (a portable model,
``springfield.kernels.portable``), XLA with springfield's layer (``--kernels xla``), oneDNN,
and oneDNN with bfloat16 products; ``--compare-norm`` the same with BatchNorm in XLA
(``KernelOptions.fuse_norm=False``) and in oneDNN, in float32 and with bfloat16 products,
with float32 activations between the layers (``bf16_activations=False``, the bfloat16 path
before 2026-12-06) and bfloat16 ones; ``--compare-adam`` with optax's Adam
(``fused_adam=False``) and the fused kernel; ``--compare-dense`` with bfloat16 products in
the convolutions only (the dense layers in XLA's float32, ``bf16_dense=False``) and in the
dense layers too (oneDNN). Each path's options are set with ``springfield.kernels.use``.

    python benchmarks/profile_step.py --model resnet --batch 64 --top 15
    python benchmarks/profile_step.py --model resnet --batch 64 --compare-conv
    python benchmarks/profile_step.py --model resnet4 --image-size 96 96 --compare-norm
    python benchmarks/profile_step.py --model resnet --batch 64 --top 0 --step-times 40
    python benchmarks/profile_step.py --model refcnn --image-size 64 64 --compare-adam
    python benchmarks/profile_step.py --model refcnn --image-size 64 64 --compare-dense
    python benchmarks/profile_step.py --model efficientnet-lite0 --image-size 160 160 \
        --compare-depthwise --rounds 3
    python benchmarks/profile_step.py --model efficientnet-lite0 --image-size 160 160 \
        --compare-lite --rounds 10
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile
import time

import numpy as np


def build(
    model_name: str, size: tuple[int, int], batch: int, mode: str, precision: str = "float32"
):
    """(step function, its arguments, a function that advances the arguments) on a fixed batch."""
    import jax
    import jax.numpy as jnp
    import optax

    from springfield import kernels
    from springfield.models import build_model
    from springfield.training.optim import make_optimizer
    from springfield.training.steps import init_state, make_eval_step, make_train_step

    model = build_model(model_name, 4, image_size=size, precision=precision)
    schedule = optax.constant_schedule(1e-3)
    tx = make_optimizer("adam", schedule)
    graphdef, state = init_state(model, tx)
    rng = np.random.default_rng(0)
    data = {
        "image": jnp.asarray(rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 4, batch).astype(np.int32)),
        "mask": jnp.ones(batch, jnp.float32),
    }
    if mode == "train":
        # The update the training loop uses: Adam in one pass where the kernel runs
        # (KernelOptions.fused_adam=False: optax's).
        update = kernels.optimizer_update(tx, name="adam", schedule=schedule)
        step = make_train_step(graphdef, tx, update=update)
        args = [state, data, jax.random.key(0)]

        def run(args):
            new_state, metrics = step(*args)
            return [new_state, data, args[2]], metrics

        return step, args, run
    step = make_eval_step(graphdef)
    args = [state.params, state.rest, data]
    return step, args, lambda args: (args, step(*args))


def time_step(run, args, groups: int = 5, per_group: int = 5) -> tuple[float, list]:
    """Best seconds per step over ``groups`` timed groups, and the advanced arguments."""
    import jax

    args, out = run(args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(groups):
        t0 = time.perf_counter()
        for _ in range(per_group):
            args, out = run(args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / per_group)
    return best, args


def step_times(run, args, steps: int) -> tuple[np.ndarray, float, list]:
    """Milliseconds of each of ``steps`` steps (each waited for), the img/s of the whole
    stretch, and the advanced arguments: the tail (slow steps) that a best-of time hides."""
    import jax

    times = []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        args, out = run(args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return np.array(times) * 1e3, time.perf_counter() - start, args


def top_thunks(run, args, steps: int = 3, top: int = 15) -> list[tuple[str, float]]:
    """Milliseconds per step of the slowest XLA thunks in a profiler trace."""
    import jax
    from jax.profiler import ProfileData

    folder = tempfile.mkdtemp(prefix="springfield-profile-")
    with jax.profiler.trace(folder):
        for _ in range(steps):
            args, out = run(args)
            jax.block_until_ready(out)
    trace = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    total: collections.Counter = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            if "Eigen" not in line.name and "PjRt" not in line.name:
                continue
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "end:", "Threadpool")):
                    total[event.name] += event.duration_ns
    return [(name, ns / steps / 1e6) for name, ns in total.most_common(top)]


def custom_call_names(hlo: str) -> dict[str, str]:
    """``ffi_call.N`` -> ``ffi_call.N: <kernel> -> <first result's shape>`` from compiled HLO."""
    import re

    names = {}
    pattern = r"%(ffi_call[.\d]*) = (\S+) .*?custom_call_target=\"(\w+)\""
    for m in re.finditer(pattern, hlo):
        target = m.group(3).removeprefix("springfield_onednn_conv_")
        names[m.group(1)] = f"{m.group(1)}: {target} -> {m.group(2).split('{')[0].strip('(')}"
    return names


def conv_shapes(
    model_name: str, size: tuple[int, int], batch: int, precision: str = "float32"
) -> list[dict]:
    """Arguments of every convolution in one forward pass (recorded during tracing)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from springfield.models import build_model

    model = build_model(model_name, 4, image_size=size, precision=precision)
    seen: list[dict] = []
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Conv):
            inner = module.conv_general_dilated

            def record(lhs, rhs, *args, _inner=inner, **kw):
                seen.append(dict(x=lhs.shape, w=rhs.shape, args=args, kw=kw, fn=_inner))
                return _inner(lhs, rhs, *args, **kw)

            module.conv_general_dilated = record
    jax.eval_shape(lambda x: model(x, train=True), jnp.zeros((batch, *size, 3)))
    return seen


def time_conv_layers(
    model_name: str, size: tuple[int, int], batch: int, precision: str = "float32"
) -> None:
    """Print fwd / input-gradient / weight-gradient time and GFLOP/s of each convolution, run
    by the convolution function the model uses (oneDNN's where it runs, else XLA's)."""
    import jax
    import jax.numpy as jnp

    from springfield import kernels

    print(f"convolutions by {kernels.describe('auto', precision)}, {precision}")
    print("| conv | x | pass | ms | GFLOP/s |\n|---|---|---|---:|---:|")
    total_s = total_flops = 0.0
    for i, c in enumerate(conv_shapes(model_name, size, batch, precision)):
        x = jnp.ones(c["x"], jnp.float32)
        w = jnp.full(c["w"], 0.01, jnp.float32)

        def conv(x, w, c=c):
            return c["fn"](x, w, *c["args"], **c["kw"])

        y = jax.eval_shape(conv, x, w)
        dy = jnp.ones(y.shape, y.dtype)  # bfloat16 where activations are
        # Multiply-adds x 2: every output element sums kh * kw * cin/groups products.
        flops = 2.0 * np.prod(y.shape) * np.prod(c["w"][:-1])
        passes = {
            "forward": (jax.jit(conv), (x, w)),
            "weight grad": (
                jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)),
                (x, w, dy),
            ),
        }
        if i > 0:  # the first layer's input (the image) needs no gradient
            passes["input grad"] = (
                jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)),
                (x, w, dy),
            )
        for name, (fn, fargs) in passes.items():
            seconds, _ = time_step(lambda a, fn=fn: (a, fn(*a)), list(fargs), groups=3)
            total_s += seconds
            total_flops += flops
            print(
                f"| {i} {c['w'][2]}->{c['w'][3]} | {'x'.join(map(str, c['x'][1:3]))} | {name} "
                f"| {seconds * 1e3:.2f} | {flops / seconds / 1e9:.0f} |"
            )
    print(f"| all | | | {total_s * 1e3:.1f} | {total_flops / total_s / 1e9:.0f} |")


def compare(args, size: tuple[int, int], label: str, what: str, paths: dict) -> None:
    """Build one step per path (``springfield.kernels.use`` arguments, precision; the
    argument ``portable=True`` for a portable model) in this process and time them in
    interleaved rounds: a ratio between paths then shares the machine's state."""
    from springfield import kernels

    runs = {}
    for name, (options, precision) in paths.items():
        options = dict(options)
        portable = options.pop("portable", False)
        with kernels.use(**options), kernels.portable() if portable else kernels.use():
            _, step_args, run = build(args.model, size, args.batch, args.mode, precision)
        runs[name] = [run, step_args, []]
    for _ in range(args.rounds):
        for r in runs.values():
            seconds, r[1] = time_step(r[0], r[1], groups=1)
            r[2].append(args.batch / seconds)
    print(f"| {what} ({label}) | img/s median | best |\n|---|---:|---:|")
    for name, (_, _, rates) in runs.items():
        print(f"| {name} | {np.median(rates):.0f} | {max(rates):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="refcnn")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--top", type=int, default=15, help="how many thunks to list")
    p.add_argument("--compare-conv", action="store_true", help="time each convolution path")
    p.add_argument(
        "--compare-norm",
        action="store_true",
        help="time BatchNorm in XLA vs oneDNN, float32 and bfloat16 (products, activations)",
    )
    p.add_argument(
        "--compare-lite",
        action="store_true",
        help="time EfficientNet-Lite's 5x5 depthwise weight gradients (oneDNN's vs "
        "springfield's) and BatchNorm + ReLU6 (oneDNN + XLA vs one call), float32 and bfloat16",
    )
    p.add_argument(
        "--compare-adam",
        action="store_true",
        help="time optax's Adam vs the fused one-pass kernel, float32 and bfloat16",
    )
    p.add_argument(
        "--compare-dense",
        action="store_true",
        help="time bfloat16 steps with float32 (XLA) vs bfloat16 (oneDNN) dense layers",
    )
    p.add_argument(
        "--compare-depthwise",
        action="store_true",
        help="time depthwise layers as XLA shifted sums vs oneDNN (its own weight gradients "
        "or springfield's), float32 and bfloat16",
    )
    p.add_argument("--conv-layers", action="store_true", help="time each convolution alone")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds for --compare-*")
    p.add_argument(
        "--step-times",
        type=int,
        default=0,
        metavar="N",
        help="also time N single steps: median, 90th percentile and slowest step",
    )
    args = p.parse_args()
    if args.top:
        # Trace events per XLA thunk; must be set before JAX starts.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
        ).strip()
    from springfield.runtime import setup_runtime

    setup_runtime()
    from springfield.models import model_spec

    size = tuple(args.image_size or model_spec(args.model).image_size)
    label = f"{args.model} {size[0]}x{size[1]} batch {args.batch} {args.mode}"
    if args.conv_layers:
        time_conv_layers(args.model, size, args.batch, args.precision)
        return
    if args.compare_conv:
        compare(args, size, label, "conv", {
            "lax": ({"portable": True}, "float32"),
            "xla (springfield layer)": ({"kernels": "xla"}, "float32"),
            "onednn": ({}, "float32"),
            "onednn bfloat16": ({}, "bfloat16"),
        })  # fmt: skip
        return
    if args.compare_norm:
        f32_acts = {"bf16_activations": False}
        compare(args, size, label, "BatchNorm", {
            "XLA BatchNorm, float32": ({"fuse_norm": False}, "float32"),
            "oneDNN BatchNorm, float32": ({}, "float32"),
            "XLA BatchNorm, bf16 products, f32 activations": (
                {"fuse_norm": False, **f32_acts}, "bfloat16"),
            "oneDNN BatchNorm, bf16 products, f32 activations": (f32_acts, "bfloat16"),
            "oneDNN BatchNorm, bf16 products and activations": ({}, "bfloat16"),
        })  # fmt: skip
        return
    if args.compare_lite:
        before = {"own_depthwise_grad": False, "fuse_relu6": False}
        grads = {"fuse_relu6": False}
        compare(args, size, label, "EfficientNet-Lite kernels", {
            "oneDNN 5x5 depthwise weight grads, XLA ReLU6, float32": (before, "float32"),
            "own 5x5 depthwise weight grads, float32": (grads, "float32"),
            "own weight grads + BatchNorm-ReLU6 in one call, float32": ({}, "float32"),
            "oneDNN 5x5 depthwise weight grads, XLA ReLU6, bfloat16": (before, "bfloat16"),
            "own 5x5 depthwise weight grads, bfloat16": (grads, "bfloat16"),
            "own weight grads + BatchNorm-ReLU6 in one call, bfloat16": ({}, "bfloat16"),
        })  # fmt: skip
        return
    if args.compare_adam:
        optax_adam = {"fused_adam": False}
        compare(args, size, label, "Adam", {
            "optax Adam, float32": (optax_adam, "float32"),
            "fused Adam, float32": ({}, "float32"),
            "optax Adam, bfloat16": (optax_adam, "bfloat16"),
            "fused Adam, bfloat16": ({}, "bfloat16"),
        })  # fmt: skip
        return
    if args.compare_depthwise:
        sums, dnnl_grad = {"onednn_depthwise": False}, {"own_depthwise_grad": False}
        compare(args, size, label, "depthwise", {
            "XLA shifted sums, float32": (sums, "float32"),
            "oneDNN depthwise, float32": (dnnl_grad, "float32"),
            "oneDNN depthwise + own weight grads, float32": ({}, "float32"),
            "XLA shifted sums, bfloat16": (sums, "bfloat16"),
            "oneDNN depthwise, bfloat16": (dnnl_grad, "bfloat16"),
            "oneDNN depthwise + own weight grads, bfloat16": ({}, "bfloat16"),
        })  # fmt: skip
        return
    if args.compare_dense:
        xla, ours = {"bf16_dense": False}, {"bf16_dense": True}
        compare(args, size, label, "dense layers", {
            "float32 (XLA) dense layers, float32": (xla, "float32"),
            "float32 (XLA) dense layers, bfloat16": (xla, "bfloat16"),
            "bfloat16 (oneDNN) dense layers, bfloat16": (ours, "bfloat16"),
        })  # fmt: skip
        return
    step, step_args, run = build(args.model, size, args.batch, args.mode, args.precision)
    # The eval step picks its compiler options by batch size, so it has no single .lower().
    compiled = step.lower(*step_args).compile() if hasattr(step, "lower") else None
    cost = compiled.cost_analysis() if compiled is not None else {}
    cost = cost[0] if isinstance(cost, list) else cost
    flops, nbytes = cost.get("flops", float("nan")), cost.get("bytes accessed", float("nan"))
    seconds, step_args = time_step(run, step_args)
    print(
        f"{label}: {seconds * 1e3:.1f} ms/step = {args.batch / seconds:.0f} img/s; XLA cost "
        f"analysis {flops / 1e9:.2f} GFLOP, {nbytes / 1e6:.0f} MB accessed per step -> "
        f"{flops / seconds / 1e9:.0f} GFLOP/s"
    )
    if args.step_times:
        ms, total, step_args = step_times(run, step_args, args.step_times)
        print(
            f"{args.step_times} single steps: median {np.median(ms):.1f} ms, 90th percentile "
            f"{np.percentile(ms, 90):.1f} ms, slowest {ms.max():.1f} ms; "
            f"{args.batch * args.step_times / total:.0f} img/s over all of them"
        )
    if args.top:
        print("\n| thunk | ms/step |\n|---|---:|")
        names = custom_call_names(compiled.as_text()) if compiled is not None else {}
        for name, ms in top_thunks(run, step_args, top=args.top):
            print(f"| {names.get(name, name)} | {ms:.2f} |")


if __name__ == "__main__":
    main()
