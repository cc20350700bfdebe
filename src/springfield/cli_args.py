"""The flags of every ``springfield`` command but ``train`` (whose flags are
:class:`~springfield.config.TrainConfig`'s), as typed dataclasses for tyro: each field's
docstring is its ``--help``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from springfield.config import TrainConfig
from springfield.inference import DEFAULT_BATCH_SIZES


@dataclass(frozen=True)
class EvalArgs:
    """Evaluate a trained run: loss, accuracy, per-class precision/recall/F1, confusion."""

    run: Annotated[Path, tyro.conf.Positional]
    """Run folder written by `springfield train` (its --workdir)."""

    data: Path | None = None
    """Folder to evaluate (<data>/<class>/<image>; uses <data>/val if present). Default:
    the run's own validation split."""

    batch_size: int = 64
    """Evaluation batch size (the last batch is padded and masked, nothing is dropped)."""

    json: bool = False
    """Print one JSON object instead of tables."""

    report: Path | None = None
    """Also write confusion.png, mistakes.png and report.html for this evaluation into this folder."""

    allow_import: bool = False
    """Allow importing the run's custom module:function activation (runs that module)."""


@dataclass(frozen=True)
class ReportArgs:
    """Regenerate a run folder's figures and report.html from its latest checkpoint."""

    run: Annotated[Path, tyro.conf.Positional]
    """Run folder written by `springfield train`."""

    batch_size: int = 64
    """Evaluation batch size."""

    allow_import: bool = False
    """Allow importing the run's custom module:function activation (runs that module)."""


@dataclass(frozen=True)
class PredictArgs:
    """Top-k classes with probabilities for each image (folders are searched recursively)."""

    run: Annotated[Path, tyro.conf.Positional]
    """Run folder written by `springfield train`, or a folder written by `springfield export`."""

    images: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """Image files or folders of images."""

    top_k: int = 3
    """How many classes to show per image."""

    json: bool = False
    """Print one JSON object per image (JSON lines)."""

    csv: Path | None = None
    """Also write path, rank, class, probability rows to this CSV file."""

    allow_import: bool = False
    """Allow importing the run's custom module:function activation (runs that module)."""


@dataclass(frozen=True)
class ExportArgs:
    """Write a run as a folder that predicts without springfield's training code: model.jaxexport (jax.export StableHLO of the inference forward pass, parameters baked in, any batch size, XLA convolutions so it runs on CPU and CUDA), classes.json, preprocess.json (input size, decoding, normalisation, test-time augmentation) and export.json. The export is checked against the run (probabilities within 1e-5) before it is written. `springfield predict OUT` and `springfield serve OUT` take the folder; so does springfield.inference.load(OUT)."""

    run: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """Run folder written by `springfield train` (its --workdir)."""

    out: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """Folder to write (must be new or empty, unless --overwrite)."""

    overwrite: bool = False
    """Replace OUT if it already holds an export."""

    platform: tuple[str, ...] = ("cpu", "cuda")
    """JAX platforms to lower for (one module runs on any of them): cpu, cuda, rocm, tpu."""

    allow_import: bool = False
    """Allow importing the run's custom module:function activation (runs that module)."""


@dataclass(frozen=True)
class ServeArgs:
    """Serve a model: GET / is a page to drop, choose or paste images into; POST /predict takes multipart files (curl -F file=@a.jpg -F file=@b.png) or one raw image body and answers JSON {"predictions": [{"file", "label", "probability", "top": [{"label", "probability"}]}], "model": {...}}; GET /health and GET /info. The model is loaded once and compiled for --batch-sizes at start-up; concurrent requests share forward passes (micro-batching). Bad uploads get a 4xx with a one-line JSON error. Probabilities are those of `springfield predict --json`."""

    run: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="FOLDER")]
    """Run folder written by `springfield train`, or a folder written by `springfield export`."""

    host: str = "127.0.0.1"
    """Address to listen on. The default accepts this machine only; 0.0.0.0 (or ::) accepts every machine that can reach this one, and then needs --token (or --allow-no-token). No TLS: put a reverse proxy in front for that."""

    port: int = 8000
    """TCP port to listen on (0: any free port, printed at start)."""

    top_k: int = 3
    """Classes returned per image (a request may ask for others with ?top_k=N)."""

    max_upload_mb: float = 10.0
    """Largest request body in MB (2**20 bytes), checked against Content-Length and counted while the body streams in: a larger upload gets 413 and is read no further than the limit."""

    max_files: int = 16
    """Most image files in one request (more get 400)."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    """Batch shapes compiled at start-up (`springfield predict` runs the same ones, so a request gets the very floats predict prints for the same files); a forward pass takes as many waiting images as fill one, the largest is the most images per forward pass."""

    batching: bool = True
    """Micro-batching: requests that arrive together share forward passes. --no-batching runs each request on its own (for comparison: benchmarks/serve.py)."""

    batch_window_ms: float = 2.0
    """How long the first waiting request waits for others to join its forward pass (ms); requests that queue up during a forward pass join the next one regardless."""

    log_requests: bool = False
    """Print one access-log line per request."""

    allow_import: bool = False
    """Allow importing the run's custom module:function activation (runs that module)."""

    token: str | None = None
    """Bearer token that POST /predict and GET /info require (header 'Authorization: Bearer TOKEN'); default: the environment variable SPRINGFIELD_TOKEN, which unlike a flag is not shown by ps. Without either, there is no authentication."""

    allow_no_token: bool = False
    """Serve a non-loopback --host without a token (anyone who reaches the port may use it); refused otherwise. Prints a warning."""

    cors_origin: tuple[str, ...] = ()
    """Origins (https://example.org) whose pages may call the API from a browser; default none: same origin only."""

    max_pixels: int = 12_000_000
    """Largest image decoded, in pixels as decoded (a JPEG counts at the reduced scale its draft decode uses, 1/8 for a large photo and a small model); a larger one gets 422 from its header, before any pixel is decoded. With --max-decodes 2, decodes hold at most 2 x 12 Mpx x 24 bytes = 576 MB."""

    max_decodes: int = 2
    """Images decoded at once (more wait their turn)."""

    max_requests: int = 24
    """POST /predict requests held at once (reading, decoding, waiting for the model); more get 503 with Retry-After before their body is read."""

    header_timeout_s: float = 10.0
    """Seconds a connection may take to send a request's headers (slow clients are cut off)."""

    body_timeout_s: float = 30.0
    """Seconds a request body may take to arrive once its headers have (slower: 408)."""

    shutdown_timeout_s: float = 30.0
    """On SIGTERM or Ctrl-C: stop accepting, and give the requests in progress this long to finish."""


@dataclass(frozen=True)
class LrFindArgs(TrainConfig):
    """Learning-rate range test (Smith 2017, fastai lr_find): from a fresh model of these train flags, train one batch per step while the rate grows exponentially from --start-lr to --end-lr; stop when the smoothed loss exceeds 4x its minimum. Writes lr_find.png (smoothed loss vs rate, log axis, the suggestion marked) and lr_find.json into --workdir (default runs/lr-find-<timestamp>) and prints the suggested --lr by fastai's valley rule: a little past the middle of the longest stretch where the smoothed loss keeps falling. --lr itself is not used."""

    start_lr: float = 1e-6
    """First learning rate of the sweep."""

    end_lr: float = 10.0
    """Last learning rate of the sweep (it stops earlier when the loss diverges)."""

    steps: int = 100
    """Train steps (batches) in the sweep, one rate each."""


@dataclass(frozen=True)
class CompareArgs(TrainConfig):
    """Train every combination of the --vary settings (one value of each), once per seed, with the same data, split and epochs, one after another; each run is an ordinary run folder <workdir>/<variant>/seed<k>. Then write summary.md, summary.json (per variant: final and best validation accuracy, validation loss, train time, img/s, epochs to 90% of the best accuracy; mean and spread over seeds, from each run's metrics.jsonl), curves.png and compare.html into --workdir (default runs/compare-<timestamp>). Every other flag is a train flag and applies to all variants. Every variant is checked before the first trains. Running the same command again skips finished runs and resumes the interrupted one."""

    vary: tyro.conf.UseAppendAction[tuple[str, ...]] = ()
    """NAME=V1,V2,...: a train flag and its values, e.g. --vary activation=relu,gelu,mypkg.acts:squareplus --vary optimizer=adamw,lion (repeat for more; every combination runs). Tuples as "image_size=64 64,96 96" or image_size=64x64,96x96; booleans as tta=true,false."""

    seeds: tuple[int, ...] = ()
    """Seeds to run each variant with (split, initialisation, shuffling and augmentation), e.g. --seeds 0 1 2. Default: --seed."""
