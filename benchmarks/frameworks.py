"""Train/eval throughput of one CNN in springfield, PyTorch and Keras 3, on the same machine.

The same network (``refcnn``, ``seed``, or springfield's default ``resnet``/``resnet4``:
same layers, Adam, batch, input size and real image batch) is trained and evaluated, each
in float32 and in bfloat16 (the ``-bf16`` rows; the "multiplies in" column), by

* ``springfield``: springfield's own jitted steps (``make_train_step``/``make_eval_step`` on
  ``springfield.models``), fed uint8 batches through ``parallel.shard_batch`` like the
  training loop, float32 throughout; ``springfield-bf16``: the same with ``--precision
  bfloat16`` (bfloat16 products in the convolutions, float32 sums, and since 2026-12-06
  bfloat16 activations between the layers of the ResNets, as autocast has); plus, to show what
  springfield's oneDNN kernels, its XLA flags and its convolution layer each buy,
  ``springfield-xla-conv`` (``SPRINGFIELD_ONEDNN=0``: XLA's convolutions),
  ``springfield-xla-default`` (that and ``SPRINGFIELD_XLA_FLAGS=0``: plain JAX) and
  ``springfield-lax-conv`` (``SPRINGFIELD_CONV=lax``);
* ``torch-eager`` (channels_last) and ``torch-compile`` (PyTorch), and both under
  ``torch.autocast(dtype=torch.bfloat16)`` (``torch-eager-bf16``, ``torch-compile-bf16``);
* ``keras-tf`` (TensorFlow graph mode, oneDNN), ``keras-tf-xla`` (``jit_compile=True``), both
  with the ``mixed_bfloat16`` policy (``keras-tf-bf16``, ``keras-tf-xla-bf16``), and
  ``keras-jax`` (Keras 3 on the JAX backend, default XLA flags).

The "springfield / this" columns compare a row with springfield's row of the same
precision; the lines under the table name the fastest PyTorch/Keras row of each precision.
"Of GEMM peak" is against the best 2048^3 matmul of that precision measured in the same run
(numpy/OpenBLAS with the machine's OPENBLAS_CORETYPE/L2_SIZE overrides unset, JAX, PyTorch,
TF). A bfloat16 row on a CPU without AVX512_BF16 or AMX measures conversions to float32,
not bfloat16 kernels: the note under the table says which the machine has.

springfield's rows (except ``springfield-xla-default``) run with the environment the
``springfield`` command gives itself (huge pages for malloc, ``springfield.runtime.malloc_env``);
``--hugepages-all`` gives it to every framework, to show what the setting alone is worth.

Every framework lives in its own worker subprocess (no thread-pool interference, own
environment variables). All workers start first; then, per configuration, the parent asks
one worker at a time to build and warm up (compile time is measured alone), and then runs
the timed repeats round-robin: repeat 1 of every framework, repeat 2 of every framework, ...
with the starting framework rotating, so every framework sees the same machine load. Only
one worker runs at any moment: the others are paused (SIGSTOP to their process groups, so
no idle thread pool or compile worker of theirs takes a core) until their turn, and a short
pause between hand-overs lets spinning OpenMP threads go idle. The table shows medians over
the repeats.

On a machine with a GPU the same command runs the JAX and PyTorch rows on the GPU (each JSON
row's ``device`` says where it ran); rows whose framework is not installed there (e.g. Keras
without TensorFlow) are reported as skipped and left out of the table.

PyTorch, TensorFlow and Keras are the ``bench`` extra only (``pip install -e '.[bench]'``,
ideally in its own venv); springfield itself never imports them. Example::

    python benchmarks/frameworks.py --configs refcnn:64:32 --repeats 3 \\
        --frameworks springfield,torch-compile,keras-tf --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Net:
    """Conv3x3 (SAME) -> relu -> avg-pool 2 per conv width; flatten; dense+relu; dense head."""

    convs: tuple[int, ...]
    dense: tuple[int, ...]


NETS = {
    "refcnn": Net(convs=(32, 64, 128), dense=(256,)),
    "seed": Net(convs=(128, 128, 64, 32, 16), dense=(256, 64)),
}


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
        Row(
            "springfield-xla-default",
            "springfield-xla-default",
            (("SPRINGFIELD_XLA_FLAGS", "0"), ("SPRINGFIELD_ONEDNN", "0")),
        ),
        Row("springfield-lax-conv", "springfield-lax-conv", (("SPRINGFIELD_CONV", "lax"),)),
        Row("springfield-xla-conv", "springfield-xla-conv", (("SPRINGFIELD_ONEDNN", "0"),)),
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
DEFAULT_CONFIGS = "refcnn:64:32,refcnn:64:128,refcnn:128:128,resnet:64:64,seed:160x120:32"


def precision_of(row: str) -> str:
    """What a row's convolutions and dense layers multiply in: ``bfloat16`` for the -bf16
    rows (springfield ``--precision bfloat16``, torch.autocast, Keras mixed_bfloat16)."""
    return "bfloat16" if row.endswith("-bf16") else "float32"


# springfield's residual models, written in PyTorch (benchmarks/torch_train.py) and Keras
# below; any other springfield model name (e.g. resnet-wide:112:64) runs in springfield only.
RESNETS = {"resnet": (32, 64, 128), "resnet4": (32, 64, 128, 256)}


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
    """``net:H[xW]:batch``, e.g. ``refcnn:64:32`` or ``seed:160x120:32``."""
    try:
        net, size, batch = text.split(":")
        h, _, w = size.partition("x")
        cfg = Config(net, (int(h), int(w or h)), int(batch), classes)
    except ValueError:
        raise SystemExit(
            f"--configs {text!r}: expected NET:H[xW]:BATCH, e.g. refcnn:64:32"
        ) from None
    from springfield.models import MODELS

    if net not in NETS and net not in MODELS:
        raise SystemExit(
            f"--configs {text!r}: unknown network; choose {', '.join(NETS)} (all frameworks) "
            f"or a springfield model ({', '.join(MODELS)})"
        )
    return cfg


# ---------------------------------------------------------------------------------------------
# Workers: each builds the network in its framework and answers timing requests.

LR = 1e-3


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


class Runner:
    """Framework-neutral driver: ``train(n)``/``eval(n)`` run n steps and sync at the end."""

    params: int
    device: str = "cpu"  # what the steps run on, as the framework names it

    def train(self, n: int) -> None:
        raise NotImplementedError

    def eval(self, n: int) -> None:
        raise NotImplementedError


def _trunc_normal_std(fan_in: int) -> float:
    # lecun_normal as flax and Keras define it: truncated at 2 sigma, rescaled to unit variance.
    return (1.0 / fan_in) ** 0.5 / 0.87962566103423978


class SpringfieldRunner(Runner):
    """springfield's real steps on springfield's model, Adam via springfield's optimizer
    factory, batches through ``parallel.shard_batch`` as in the training loop."""

    def __init__(
        self, cfg: Config, images: np.ndarray, labels: np.ndarray, precision: str = "float32"
    ) -> None:
        import jax
        import optax

        from springfield import parallel
        from springfield.models import build_model, count_params
        from springfield.training.fused_adam import make_fused_update
        from springfield.training.optim import make_optimizer
        from springfield.training.steps import init_state, make_eval_step, make_train_step

        model = build_model(cfg.net, cfg.classes, image_size=cfg.size, precision=precision)
        self.params = count_params(model)
        schedule = optax.constant_schedule(LR)
        tx = make_optimizer("adam", schedule)
        graphdef, state = init_state(model, tx)
        self.mesh = parallel.make_mesh()
        self.state = parallel.replicate(state, self.mesh)
        # As the training loop does: Adam as one in-place pass where the kernel runs.
        fused = make_fused_update("adam", schedule, weight_decay=0.0)
        self.step = make_train_step(graphdef, tx, fused_update=fused)
        self.eval_step = make_eval_step(graphdef)
        self.batch = {"image": images, "label": labels, "mask": np.ones(len(labels), np.float32)}
        self.key = jax.random.key(0)
        self.device = jax.devices()[0].device_kind
        self._jax = jax
        self._shard = parallel.shard_batch

    def train(self, n: int) -> None:
        state = self.state
        for _ in range(n):
            state, m = self.step(state, self._shard(self.batch, self.mesh), self.key)
        self._jax.block_until_ready((state, m))
        self.state = state

    def eval(self, n: int) -> None:
        for _ in range(n):
            logits, _ = self.eval_step(
                self.state.params, self.state.rest, self._shard(self.batch, self.mesh)
            )
        self._jax.block_until_ready(logits)


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
    ) -> None:
        import torch
        from torch import nn

        torch.manual_seed(0)
        if cfg.net in RESNETS:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
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
                    std = _trunc_normal_std(m.weight[0].numel())
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
        return x.float() * (2.0 / 255.0) - 1.0

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


class KerasRunner(Runner):
    """Keras 3 on the backend named by KERAS_BACKEND (set before the worker imported it);
    ``bf16``: the ``mixed_bfloat16`` policy (bfloat16 compute, float32 weights)."""

    def __init__(
        self, cfg: Config, images: np.ndarray, labels: np.ndarray, jit: bool, bf16: bool = False
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
        if cfg.net in RESNETS:
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


def make_runner(row: str, cfg: Config, images: np.ndarray, labels: np.ndarray) -> Runner:
    """The runner of framework row ``row``."""
    if row.startswith("springfield"):
        precision = "bfloat16" if row.endswith("-bf16") else "float32"
        return SpringfieldRunner(cfg, images, labels, precision)
    if cfg.net not in NETS and cfg.net not in RESNETS:
        raise NotImplementedError(f"{cfg.net} is a springfield-only network")
    bf16 = precision_of(row) == "bfloat16"
    if row.startswith("torch"):
        return TorchRunner(cfg, images, labels, compiled="compile" in row, bf16=bf16)
    if row.startswith("keras"):
        return KerasRunner(cfg, images, labels, jit="xla" in row or "jax" in row, bf16=bf16)
    raise ValueError(row)


def gemm_gflops(proc: str, n: int = 2048, reps: int = 10) -> dict[str, float]:
    """Best n x n matmul rate of this worker's framework in GFLOP/s, in float32 and in
    bfloat16 (bfloat16 inputs; float32 accumulation where the framework chooses it)."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        if proc.startswith(("springfield", "keras-jax")):
            import jax
            import jax.numpy as jnp

            a = jnp.ones((n, n), getattr(jnp, dtype))
            mm = jax.jit(lambda a: a @ a)

            def run(k, a=a, mm=mm):
                for _ in range(k):
                    r = mm(a)
                r.block_until_ready()
        elif proc == "torch":
            import torch

            cuda = torch.cuda.is_available()
            a = torch.ones(n, n, device="cuda" if cuda else "cpu", dtype=getattr(torch, dtype))

            def run(k, a=a, cuda=cuda):
                for _ in range(k):
                    torch.mm(a, a)
                if cuda:
                    torch.cuda.synchronize()
        else:
            import tensorflow as tf

            a = tf.ones((n, n), dtype=dtype)
            mm = tf.function(lambda a: tf.linalg.matmul(a, a))

            def run(k, a=a, mm=mm):
                for _ in range(k):
                    r = mm(a)
                r.numpy()

        # A CPU without bfloat16 units can take seconds per product: bounded repeats.
        one = _timed(run, 1)
        k = max(1, min(reps, round(1.0 / one)))
        best = min([one, *(_timed(run, k) / k for _ in range(3 if one < 1.0 else 0))])
        out[dtype] = 2.0 * n**3 / best / 1e9
    return out


NUMPY_GEMM = """
import json, time, numpy as np
from threadpoolctl import threadpool_info
a = np.ones((2048, 2048), np.float32)
a @ a
times = []
for _ in range(10):
    t = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - t)
info = [(i["internal_api"], i.get("architecture")) for i in threadpool_info()]
print(json.dumps({"gflops": 2 * 2048**3 / min(times) / 1e9, "kernel": info}))
"""


def numpy_gemm(python: str) -> dict:
    """numpy's float32 2048^3 matmul in a fresh process with OPENBLAS_CORETYPE and
    OPENBLAS_L2_SIZE unset (machine-wide overrides that slow a current OpenBLAS), and the
    BLAS kernel it then ran (threadpoolctl)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    }
    done = subprocess.run(
        [python, "-c", NUMPY_GEMM], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-200:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_main(proc: str) -> None:
    """Answer JSON requests from the parent, one per line on stdin, until ``quit``."""
    if proc.startswith("springfield"):
        from springfield.runtime import setup_runtime

        setup_runtime()
    runners: dict[tuple[str, str], Runner] = {}
    steps: dict[tuple[str, str, str], int] = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # framework chatter must not corrupt the protocol
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "quit":
                break
            if op == "gemm":
                reply = {"gflops": gemm_gflops(proc)}  # {"float32": .., "bfloat16": ..}
            elif op == "setup":
                reply = _setup(req, runners, steps)
            elif op in ("train", "eval"):
                key = (req["row"], req["config"])
                runner = runners[key]
                n = steps[(*key, op)]
                dt = _timed(runner.train if op == "train" else runner.eval, n)
                reply = {"img_s": n * req["batch"] / dt}
            elif op == "release":
                runners.pop((req["row"], req["config"]), None)
                import gc

                gc.collect()
                reply = {}
            else:
                raise ValueError(f"unknown op {op}")
        except Exception as e:  # noqa: BLE001 - report any framework failure to the parent
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _setup(req: dict, runners: dict, steps: dict) -> dict:
    cfg = Config(req["net"], tuple(req["size"]), req["batch"], req["classes"])
    data = np.load(req["batch_file"])
    images, labels = data["images"], data["labels"]
    key = (req["row"], req["config"])
    t0 = time.perf_counter()
    runner = make_runner(req["row"], cfg, images, labels)
    build_s = time.perf_counter() - t0
    first_s = _timed(runner.train, 1)
    first_eval_s = _timed(runner.eval, 1)
    runners[key] = runner
    # Warm-up (also any late recompilation), then size each repeat to ~target seconds.
    for op, fn in (("train", runner.train), ("eval", runner.eval)):
        n, dt = 1, _timed(fn, 1)
        while dt < req["warmup_s"]:
            n *= 2
            dt = _timed(fn, n)
        steps[(*key, op)] = max(2, round(req["repeat_s"] * n / dt))
    return {
        "params": int(runner.params),
        "device": runner.device,
        "build_s": build_s,
        "first_step_s": first_s,
        "first_eval_s": first_eval_s,
        "train_steps": steps[(*key, "train")],
        "eval_steps": steps[(*key, "eval")],
    }


# ---------------------------------------------------------------------------------------------
# Parent: data, scheduling, table.


def _die_with_parent() -> None:
    # In a session of its own a worker outlives a killed parent, paused ones forever: the
    # kernel kills it when the parent dies (Linux; elsewhere close() is all there is).
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    """A worker subprocess speaking one JSON line per request."""

    def __init__(self, proc: str, env: dict[str, str], python: str) -> None:
        self.proc = proc
        # Several JAX workers share one GPU: none may grab 75% of its memory up front.
        full_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **os.environ, **env}
        self.p = subprocess.Popen(
            [python, "-u", __file__, "--worker", proc],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL,
            text=True,
            env=full_env,
            start_new_session=True,  # its own process group: paused with its helpers
            preexec_fn=_die_with_parent,
        )
        self.paused = False

    def pause(self, on: bool) -> None:
        """Stop (SIGSTOP) or continue (SIGCONT) the worker and every process it started
        (torch.compile's compile workers, Keras' threads live inside it), so that another
        framework is timed with the machine to itself."""
        if on == self.paused or self.p.poll() is not None:
            return
        try:
            os.killpg(self.p.pid, signal.SIGSTOP if on else signal.SIGCONT)
        except ProcessLookupError:
            return
        self.paused = on

    def ask(self, **req) -> dict:
        self.pause(False)
        if self.p.poll() is not None:
            return {"error": f"worker {self.proc} exited with {self.p.returncode}"}
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            return {"error": f"worker {self.proc} died (exit {self.p.wait()})"}
        return json.loads(line)

    def close(self) -> None:
        self.pause(False)
        if self.p.poll() is None:
            try:
                self.ask(op="quit")
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()


def load_batch(data: Path | None, cfg: Config, out: Path) -> tuple[Path, list[str]]:
    """``cfg.batch`` real images of ``data`` decoded by springfield's loader at ``cfg.size``,
    a fixed seeded sample spread over the classes; saved as ``.npz`` for the workers."""
    from springfield.data.decode import load_rgb
    from springfield.data.index import scan_folder
    from springfield.data.synthetic import ensure_default_dataset

    root = Path(data) if data else ensure_default_dataset()
    index = scan_folder(root)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(index), cfg.batch, replace=cfg.batch > len(index))
    images = np.stack([load_rgb(Path(index.paths[i]), size=cfg.size) for i in rows])
    labels = np.asarray([index.labels[i] for i in rows], np.int32)
    path = out / f"{cfg.net}-{cfg.size[0]}x{cfg.size[1]}-{cfg.batch}.npz"
    np.savez(path, images=images, labels=labels)
    return path, list(index.classes)


def _cpu_times() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def idle_fraction(seconds: float = 0.5) -> float:
    """Share of all CPUs idle over the next ``seconds`` (1.0 where /proc/stat is missing)."""
    a = _cpu_times()
    time.sleep(seconds)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return 1.0
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_idle(threshold: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the machine is at least ``threshold`` idle, so that
    other users' jobs on a shared machine disturb the timed repeat as little as possible."""
    deadline = time.monotonic() + max_wait
    idle = idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        idle = idle_fraction()
    return idle


def alone(procs: dict, worker: Worker) -> None:
    """Pause every worker but ``worker``: the one being timed has the machine to itself."""
    for w in procs.values():
        w.pause(w is not worker)


def measure_peaks(procs: dict, peaks: dict, args: argparse.Namespace) -> None:
    """Each worker's best 2048^3 float32 and bfloat16 matmul so far, and numpy's float32
    (measured again after every configuration: a single measurement on a shared machine can
    land in a busy moment). ``peaks[(source, dtype)]`` is in GFLOP/s."""
    for proc, w in procs.items():
        if args.wait_idle > 0:
            wait_idle(args.wait_idle, args.wait_max)
        alone(procs, w)
        r = w.ask(op="gemm")
        for dtype, gflops in r.get("gflops", {}).items():
            peaks[(proc, dtype)] = max(peaks.get((proc, dtype), 0.0), gflops)
        time.sleep(args.pause)
    for w in procs.values():
        w.pause(True)
    r = numpy_gemm(args.python)
    for w in procs.values():
        w.pause(False)
    if "gflops" in r:
        peaks[("numpy", "float32")] = max(peaks.get(("numpy", "float32"), 0.0), r["gflops"])
        peaks["numpy_kernel"] = r["kernel"]


def best_peaks(peaks: dict) -> dict[str, tuple[float, str]]:
    """``{dtype: (GFLOP/s, source)}``: the best matmul of each precision in this run."""
    best: dict[str, tuple[float, str]] = {}
    for key, gflops in peaks.items():
        if isinstance(key, tuple) and gflops > best.get(key[1], (0.0, ""))[0]:
            best[key[1]] = (gflops, key[0])
    return best


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    names = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for name in names:
        if name not in ROWS:
            raise SystemExit(f"--frameworks {name!r}: unknown; choose from {', '.join(ROWS)}")
    if "springfield" not in names:
        names.insert(0, "springfield")  # the ratio column needs it
    tmp = Path(tempfile.mkdtemp(prefix="springfield-bench-"))
    say = print if not args.quiet else (lambda *a, **k: None)

    # Data first (decoding must not overlap the measurements), then the workers.
    configs, batches = [], {}
    for text in args.configs.split(","):
        cfg = parse_config(text.strip(), classes=4)
        path, classes = load_batch(args.data, cfg, tmp)
        cfg = Config(cfg.net, cfg.size, cfg.batch, len(classes))
        configs.append(cfg)
        batches[cfg.key] = path
    from springfield.runtime import malloc_env

    procs: dict[str, Worker] = {}
    for name in names:
        row = ROWS[name]
        if row.proc not in procs:
            env = dict(row.env)
            # What the springfield command sets up for itself before it starts (huge pages
            # for XLA's buffers); plain JAX does not. --hugepages-all gives it to everyone.
            springfield = (
                row.proc.startswith("springfield") and row.proc != "springfield-xla-default"
            )
            if args.hugepages_all or springfield:
                env = {**malloc_env(), **env}
            if row.proc == "torch":
                # A fresh inductor cache: torch.compile's first step is then a cold compile,
                # like JAX's (which has no persistent cache here), not a cache hit.
                env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")
            procs[row.proc] = Worker(row.proc, env, args.python)
    say(f"workers: {', '.join(procs)}; configs: {', '.join(c.key for c in configs)}")

    peaks: dict = {}
    measure_peaks(procs, peaks, args)
    say(
        "GEMM 2048^3 GFLOP/s: "
        + ", ".join(f"{k[0]} {k[1]} {v:.0f}" for k, v in peaks.items() if isinstance(k, tuple))
    )

    results = []
    try:
        for cfg in configs:
            live, info = [], {}
            for name in names:
                w = procs[ROWS[name].proc]
                alone(procs, w)  # compile times measured alone too
                r = w.ask(
                    op="setup",
                    row=name,
                    config=cfg.key,
                    net=cfg.net,
                    size=list(cfg.size),
                    batch=cfg.batch,
                    classes=cfg.classes,
                    batch_file=str(batches[cfg.key]),
                    warmup_s=args.warmup,
                    repeat_s=args.repeat_seconds,
                )
                time.sleep(args.pause)
                if "error" in r:
                    say(f"  {name} {cfg.key}: {r['error']}")
                    continue
                info[name] = r
                live.append(name)
                first, params = r["first_step_s"], r["params"]
                say(
                    f"  {name} {cfg.key}: first step {first:.2f} s, {params:,} params, "
                    f"on {r['device']}"
                )
            times: dict[tuple[str, str], list[float]] = {
                (n, o): [] for n in live for o in ("train", "eval")
            }
            idles: dict[tuple[str, str], list[float]] = {k: [] for k in times}
            for rep in range(args.repeats):
                order = live[rep % len(live) :] + live[: rep % len(live)]
                for op in ("train", "eval"):
                    for name in order:
                        if args.wait_idle > 0:
                            idles[(name, op)].append(wait_idle(args.wait_idle, args.wait_max))
                        w = procs[ROWS[name].proc]
                        alone(procs, w)
                        r = w.ask(op=op, row=name, config=cfg.key, batch=cfg.batch)
                        time.sleep(args.pause)
                        if "img_s" in r:
                            times[(name, op)].append(r["img_s"])
            for name in live:
                procs[ROWS[name].proc].ask(op="release", row=name, config=cfg.key)
                tr, ev = times[(name, "train")], times[(name, "eval")]
                if not tr or not ev:
                    continue
                train_img_s, eval_img_s = float(np.median(tr)), float(np.median(ev))
                gflops = _finite(train_img_s * cfg.train_flops() / 1e9)
                results.append(
                    {
                        "framework": name,
                        "precision": precision_of(name),
                        "network": cfg.net,
                        "image_size": list(cfg.size),
                        "batch_size": cfg.batch,
                        "train_img_s": train_img_s,
                        "eval_img_s": eval_img_s,
                        "first_step_s": info[name]["first_step_s"],
                        "gflops": gflops,
                        "eval_gflops": _finite(eval_img_s * cfg.forward_flops() / 1e9),
                        "train_img_s_runs": tr,
                        "eval_img_s_runs": ev,
                        "first_eval_s": info[name]["first_eval_s"],
                        "params": info[name]["params"],
                        "device": info[name]["device"],
                        "idle_before_train_repeats": idles[(name, "train")],
                    }
                )
            measure_peaks(procs, peaks, args)
            _add_ratios(results, peaks)
            say(markdown(results, peaks, args))
            if args.json:  # after every config: a run cut short keeps what it measured
                args.json.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        for w in procs.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return results, peaks


def _finite(x: float) -> float | None:
    # JSON has no NaN: unknown values (FLOPs of a springfield-only network) become null.
    return x if np.isfinite(x) else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _add_ratios(results: list[dict], peaks: dict) -> None:
    """Each row's share of the best matmul of its own precision, and springfield's speed over
    it (springfield's row of the same precision: ``springfield`` or ``springfield-bf16``)."""
    best = best_peaks(peaks)
    for r in results:
        gflops, source = best.get(r["precision"], (float("nan"), "none"))
        r["gemm_peak_gflops"], r["gemm_peak_source"] = gflops, source
        r["peak_fraction"] = _finite(r["gflops"] / gflops) if r["gflops"] else None
    base = {
        (r["precision"], r["network"], tuple(r["image_size"]), r["batch_size"]): r
        for r in results
        if r["framework"] in ("springfield", "springfield-bf16")
    }
    for r in results:
        b = base.get((r["precision"], r["network"], tuple(r["image_size"]), r["batch_size"]))
        if b:
            # springfield / this row: above 1 means springfield is faster.
            r["springfield_train_ratio"] = b["train_img_s"] / r["train_img_s"]
            r["springfield_eval_ratio"] = b["eval_img_s"] / r["eval_img_s"]


def versus_peers(results: list[dict]) -> list[str]:
    """One line per configuration and precision: springfield against the fastest peer
    framework (PyTorch or Keras, not springfield's own variants) of that precision."""
    lines = []
    keys = {
        (r["network"], tuple(r["image_size"]), r["batch_size"], r["precision"]) for r in results
    }
    for net, size, batch, precision in sorted(keys):
        rows = [
            r
            for r in results
            if (r["network"], tuple(r["image_size"]), r["batch_size"], r["precision"])
            == (net, size, batch, precision)
        ]
        ours = [r for r in rows if r["framework"] in ("springfield", "springfield-bf16")]
        peers = [r for r in rows if not r["framework"].startswith("springfield")]
        if not ours or not peers:
            continue
        parts = []
        for op in ("train", "eval"):
            top = max(peers, key=lambda r: r[f"{op}_img_s"])
            ratio = ours[0][f"{op}_img_s"] / top[f"{op}_img_s"]
            parts.append(f"{op} {ratio:.2f}x of {top['framework']} ({top[f'{op}_img_s']:.0f})")
        lines.append(f"{net} {size[0]}x{size[1]} batch {batch}, {precision}: " + ", ".join(parts))
    return lines


def markdown(results: list[dict], peaks: dict, args: argparse.Namespace) -> str:
    """The results as one markdown table (plus how they were measured and springfield
    against the fastest peer of each precision)."""
    from springfield import runtime

    head = (
        "| framework | multiplies in | network | input | batch | train img/s | eval img/s "
        "| first step s | train GFLOP/s | of GEMM peak | springfield / this, train "
        "| springfield / this, eval |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in results:
        tr = r["train_img_s_runs"]
        lines.append(
            f"| {r['framework']} | {r['precision']} | {r['network']} "
            f"| {r['image_size'][0]}x{r['image_size'][1]} "
            f"| {r['batch_size']} | {r['train_img_s']:.0f} ({min(tr):.0f}-{max(tr):.0f}) "
            f"| {r['eval_img_s']:.0f} | {r['first_step_s']:.2f} | {_fmt(r['gflops'], '.0f')} "
            f"| {_fmt(r['peak_fraction'], '.0%')} "
            f"| {_fmt(r.get('springfield_train_ratio'), '.2f')} "
            f"| {_fmt(r.get('springfield_eval_ratio'), '.2f')} |"
        )
    best = best_peaks(peaks)
    peak_text = "; ".join(
        f"{dtype} {g:.0f} GFLOP/s ({src})" for dtype, (g, src) in sorted(best.items())
    )
    kernel = peaks.get("numpy_kernel")
    bf16 = "native" if runtime.cpu_has_bf16() else "NOT native on this CPU (no AVX512_BF16/AMX)"
    note = (
        "\nspringfield / this compares rows of the same precision; "
        f"median of {args.repeats} interleaved repeats of ~{args.repeat_seconds:g} s, each "
        "framework alone (the others paused); "
        f"GEMM peaks (best 2048^3 matmul of numpy, JAX, PyTorch and TF in this run): "
        f"{peak_text}; numpy's BLAS: {kernel}; bfloat16 products {bf16}; "
        "train GFLOP/s = 3 x forward conv+dense FLOPs x img/s; first step includes compilation; "
        f"devices: {', '.join(sorted({str(r.get('device', '?')) for r in results}))}.\n"
    )
    versus = versus_peers(results)
    return (
        head
        + "\n".join(lines)
        + "\n"
        + note
        + (
            "\nspringfield against the fastest peer:\n" + "\n".join(f"- {v}" for v in versus) + "\n"
            if versus
            else ""
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--frameworks", default=DEFAULT_FRAMEWORKS, help=f"comma list of {', '.join(ROWS)}"
    )
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of NET:H[xW]:BATCH")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per framework (median)")
    p.add_argument("--repeat-seconds", type=float, default=2.0, help="length of one repeat")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up after compiling")
    p.add_argument("--pause", type=float, default=0.5, help="idle seconds between hand-overs")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each repeat wait until this share of the CPUs is idle (shared machines)",
    )
    p.add_argument("--wait-max", type=float, default=60.0, help="longest wait, seconds")
    p.add_argument("--data", type=Path, default=None, help="image folder (default: synthetic set)")
    p.add_argument("--json", type=Path, default=None, help="write the rows as a JSON list")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as markdown")
    p.add_argument("--python", default=sys.executable, help="interpreter of the worker processes")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument(
        "--hugepages-all",
        action="store_true",
        help="give every framework's worker the huge-page malloc setting springfield uses",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    t0 = time.time()
    load = os.getloadavg()[0]
    results, peaks = run(args)
    table = markdown(results, peaks, args)
    footer = (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {load:.2f} at "
        f"start / {os.getloadavg()[0]:.2f} at end, {time.time() - t0:.0f} s\n"
    )
    print("\n" + table + footer)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table + footer)


if __name__ == "__main__":
    main()
