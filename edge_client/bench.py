"""`tierfl bench`: how fast, how large and how heavy each device tier of a model is on this device.

Each tier is measured in its own fresh child process, `python -m edge_client.bench --child tier`
with its request as JSON on stdin, which loads the tier's training artifacts, times training
steps after a few warm-up steps, encodes the resulting update with every codec, trains E epochs
on the data and prints its result as one JSON line on stdout. Its `ru_maxrss` is that tier's
peak resident memory (KiB on Linux; macOS reports bytes and is converted).

The tiers come from an export folder (--artifacts), from the fleet's aggregator over MQTT as the
client fetches them (--broker, edge_client.bench_fetch: into the device's artifact cache), or
are exported here (needs the onnx package).

The parent stays light on purpose: Linux carries the memory high-water mark of the process that
calls exec into the new program's `ru_maxrss`, and subprocess spawns with vfork, so a heavy
parent would show up as every child's peak. Loading the data set, fetching or exporting the
artifacts therefore run in a `prepare` child too (the data reaches the tier children as .npy
files, read without a transient copy), matplotlib is imported only after the last measurement,
and the report records the parent's own peak beside the children's. Requests travel on stdin,
never on the command line, because a fetch request holds the broker URL with its password.

When PyTorch is importable and the model is a zoo mlp or cnn (the graphs `_torch_op` reads), a
`torch` child runs the same graph (read from the tier's inference.onnx) with torch.optim.SGD for
the same steps and batch size. The data is shaped for the model's card (models.data.fit_to_model).
Nothing crosses a process boundary but JSON and .npy files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from edge_client.backends import BACKENDS
from edge_client.fleet_options import (FleetAccess, add_aggregator_arguments, add_cache_argument, add_fleet_arguments,
                                       add_message_size_argument)
from models.data import Dataset, fit_to_model, load_dataset
from models.manifest import MANIFEST_NAME, ExportIndex, ModelCard, TierManifest
from models.spec import BN_EPSILON, BN_MOMENTUM, ModelSpec
from models.tiers import TIER_RATES, tier_rate
from protocol.frame import encode_frame
from protocol.messages import Update, new_id

if TYPE_CHECKING:  # onnxruntime is imported only where training runs, never in the parent
    import onnx

    from edge_client.trainer import Trainer, TrainStats

log = logging.getLogger(__name__)

UPDATE_CODECS = ("float32", "float16", "int8", "int8-row", "int4", "topk:0.1", "topk:0.1+int8")
WARMUP_STEPS = 3
LEARNING_RATE = 0.05
_USER_ERRORS = (OSError, ValueError, RuntimeError, ImportError)  # ImportError: an optional package missing
_Result = TypeVar("_Result", bound=BaseModel)
BROKER_ENV = "TIERFL_BROKER"  # the client's variable for its broker URL (with the password): a fetch reads it too
TORCH_ARCHS = ("mlp", "cnn")  # the zoo archs whose graphs `_torch_op` reads
DEFAULT_DATA = {(1, 8, 8): "digits", (1, 28, 28): "fashion-mnist"}  # a model's sample shape -> the built-in data set
_CHILD_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
_RELAYED = {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BenchSettings(_Frozen):
    """What was measured and how: data, tiers, steps, batch size, epochs, threads, codecs."""

    data: str
    tiers: list[str]
    batch_size: int
    warmup_steps: int
    steps: int
    epochs: int
    threads: int
    codecs: list[str]
    backend: str = "auto"  # the training backend asked for (edge_client.backends); each tier says which ran


class TierResult(_Frozen):
    """One tier's measurements; times in ms or s, memory in KiB, sizes in bytes."""

    tier: str
    rate: float
    params: int
    artifact_bytes: int  # sum of the sizes of the files in the tier's manifest
    step_p50_ms: float
    step_p95_ms: float
    samples_per_second: float  # samples of the timed steps / their total time
    peak_rss_kib: int | None  # ru_maxrss of the tier's own child process (None without `resource`)
    baseline_rss_kib: int | None  # the same child's peak after imports and data, before the tier loads
    epochs_seconds: float | None  # E epochs over the whole data set (None when E = 0)
    update_bytes: dict[str, int]  # codec -> bytes of one encoded update frame
    torch_step_p50_ms: float | None = None
    ort_over_torch: float | None = None  # step p50 ratio; > 1 means ONNX Runtime is slower
    backend: str = "ort-training"  # the training backend that ran: ort-training or portable


class BenchReport(_Frozen):
    """bench.json: the model's card, the settings, the host and one result per tier."""

    model: ModelCard
    settings: BenchSettings
    samples: int
    host: dict[str, str]
    parent_peak_rss_kib: int | None
    tiers: list[TierResult]


class _FetchRequest(_Frozen):
    access: FleetAccess
    required: bool  # the tiers were named (--tiers): one the fleet does not export is an error
    timeout_s: float
    cache_max_mb: float


class _PrepareRequest(_Frozen):
    data: str
    model: ModelCard | None  # what the data must fit; None: the exported or fetched tiers' card
    work_dir: str
    export: ModelSpec | None  # export these tiers into work_dir/artifacts, or use existing ones
    fetch: _FetchRequest | None = None  # or fetch them from the fleet's aggregator
    tiers: list[str]
    backend: str = "auto"


class _Prepared(_Frozen):
    samples: int
    fetched: dict[str, str] = {}  # tier -> its folder in the device's artifact cache


class _TierRequest(_Frozen):
    tier_dir: str
    data_dir: str
    batch_size: int
    warmup: int
    steps: int
    epochs: int
    threads: int
    codecs: list[str]
    backend: str


class _TierRun(_Frozen):
    step_seconds: list[float]
    step_samples: list[int]
    update_bytes: dict[str, int]
    epochs_seconds: float | None
    baseline_rss_kib: int | None
    peak_rss_kib: int | None
    backend: str


class _TorchRun(_Frozen):
    step_seconds: list[float]
    version: str


# -- timing, reusable on a device -------------------------------------------------------------


def step_batches(data: Dataset, batch_size: int, count: int, seed: int = 0) -> list[Dataset]:
    """`count` shuffled mini-batches of min(batch_size, len(data)) samples, reshuffling as the data runs out."""
    if not len(data):
        raise ValueError("the data set has no samples")
    size = min(batch_size, len(data))
    rng = np.random.default_rng(seed)
    passes = -(-count * size // len(data))
    order = np.concatenate([rng.permutation(len(data)) for _ in range(passes)])
    return [data.subset(order[i * size : (i + 1) * size]) for i in range(count)]


def time_steps(trainer: Trainer, batches: Sequence[Dataset]) -> list[TrainStats]:
    """Run one training step per batch through `trainer.train`; each step's stats carry its seconds."""
    return [
        trainer.train(batch, epochs=1, batch_size=len(batch), learning_rate=LEARNING_RATE, seed=i)
        for i, batch in enumerate(batches)
    ]


# -- child processes ---------------------------------------------------------------------------


def _peak_rss_kib() -> int | None:
    """This process's peak resident set size in KiB (ru_maxrss), None where `resource` is missing."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _prepare(request: _PrepareRequest) -> _Prepared:
    """Load the data set, fetch the tiers if asked, shape the data for the model's card (models.data.fit_to_model)
    and save it as .npy; export the tiers if asked."""
    data = load_dataset(request.data)
    fetched: dict[str, str] = {}
    model = request.model
    if request.export is not None:
        from models.export import zoo_card

        model = zoo_card(request.export)
    if request.fetch is not None:
        from edge_client.backends import resolve_backend
        from edge_client.bench_fetch import fetch_tiers

        folders = fetch_tiers(request.fetch.access, request.tiers, data, required=request.fetch.required,
                              timeout_s=request.fetch.timeout_s, backend=resolve_backend(request.backend),
                              cache_max_mb=request.fetch.cache_max_mb)
        fetched = {tier: str(folder) for tier, folder in folders.items()}
        model = TierManifest.load(next(iter(folders.values())) / MANIFEST_NAME).model
    if model is None:
        raise ValueError("no model to shape the data for: give the bench an export, a fleet to fetch from, or a model "
                         "to export")
    data = fit_to_model(data, model.input_shape, model.num_classes, request.data)  # before a slow export
    work = Path(request.work_dir)
    np.save(work / "x.npy", data.x, allow_pickle=False)
    np.save(work / "y.npy", data.y, allow_pickle=False)
    if request.export is not None:
        from models.export import export_all

        export_all(request.export, request.tiers, work / "artifacts")
    return _Prepared(samples=len(data), fetched=fetched)


def _load_saved(data_dir: str) -> Dataset:
    """The data set `_prepare` saved (np.load reads straight into the array: no transient copy)."""
    folder = Path(data_dir)
    return Dataset(np.load(folder / "x.npy", allow_pickle=False), np.load(folder / "y.npy", allow_pickle=False))


def initial_weights(manifest: TierManifest, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights to train a tier from where the artifacts give none: the zoo's scheme from the manifest alone (weights
    and biases U(+-1/sqrt(fan_in)), batch norm's scale and variance 1, shift and mean 0); the zoo's bounds, not its
    values. A device always trains the weights its task sends; this is for measuring."""
    shapes = {p.name: tuple(p.shape) for p in manifest.params}
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in shapes.items():
        layer, kind = name.rsplit(".", 1)
        if f"{layer}.running_var" in shapes:  # a batch-norm layer
            weights[name] = np.full(shape, 1.0 if kind in ("weight", "running_var") else 0.0, np.float32)
            continue
        fan_in = int(np.prod(shapes.get(f"{layer}.weight", shape)[1:]))
        bound = 1.0 / np.sqrt(max(fan_in, 1))
        weights[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return weights


def _update_bytes(tier: str, stats: list[TrainStats], delta: dict[str, np.ndarray], codecs: list[str]) -> dict[str, int]:
    """Bytes of the update frame a device would publish for `delta`, per codec."""
    seen = sum(s.samples_seen for s in stats)
    body = Update(
        update_id=new_id(), round=1, base_version=0, tier=tier, num_samples=seen, steps=len(stats),
        train_loss=float(np.mean([s.loss for s in stats])),
        train_accuracy=float(np.mean([s.accuracy for s in stats])),
        train_seconds=sum(s.seconds for s in stats),
    )
    return {codec: len(encode_frame("bench", "bench-device", body, delta, codec)) for codec in codecs}


def _measure_tier(request: _TierRequest) -> _TierRun:
    """Time the steps, size the update per codec and time E epochs of one tier."""
    from edge_client.backends import open_trainer, resolve_backend

    backend = resolve_backend(request.backend)
    data = _load_saved(request.data_dir)
    baseline = _peak_rss_kib()
    tier_dir = Path(request.tier_dir)
    manifest = TierManifest.load(tier_dir / MANIFEST_NAME)
    trainer = open_trainer(backend, tier_dir, manifest, request.threads)
    start = trainer.get_weights()
    if not any(value.any() for value in start.values()):  # the portable step graph holds no initial weights
        start = initial_weights(manifest)
        trainer.set_weights(start)
    batches = step_batches(data, request.batch_size, request.warmup + request.steps)
    stats = time_steps(trainer, batches)[request.warmup :]
    trained = trainer.get_weights()
    update_bytes = _update_bytes(manifest.tier, stats, {n: trained[n] - start[n] for n in start}, request.codecs)
    epochs_seconds = None
    if request.epochs:
        trainer.set_weights(start)
        epochs_seconds = trainer.train(data, request.epochs, request.batch_size, LEARNING_RATE, seed=0).seconds
    return _TierRun(
        step_seconds=[s.seconds for s in stats], step_samples=[s.samples_seen for s in stats],
        update_bytes=update_bytes, epochs_seconds=epochs_seconds, baseline_rss_kib=baseline,
        peak_rss_kib=_peak_rss_kib(), backend=backend,
    )


def _torch_op(node: onnx.NodeProto, args: list[Any], torch: Any) -> Any:
    """One node of a zoo forward graph (models/zoo.py writes exactly these ops) in PyTorch."""
    functional = torch.nn.functional
    op = node.op_type
    if op == "Gemm":  # the zoo writes transB=1: y = x W^T + b, which is F.linear
        return functional.linear(*args)
    if op == "Conv":  # 3x3, pads 1
        return functional.conv2d(*args, padding=1)
    if op == "BatchNormalization":  # ORT training normalises with batch statistics and updates the running ones
        x, weight, bias, mean, var = args
        return functional.batch_norm(
            x, mean, var, weight, bias, training=True, momentum=1 - BN_MOMENTUM, eps=BN_EPSILON
        )
    if op == "Relu":
        return functional.relu(args[0])
    if op == "MaxPool":  # 2x2, stride 2
        return functional.max_pool2d(args[0], 2, 2)
    if op == "Flatten":
        return torch.flatten(args[0], 1)
    raise RuntimeError(f"no PyTorch equivalent for ONNX op {op} in node {node.name}")


def _torch_model(tier_dir: Path, torch: Any) -> tuple[Callable[[Any], Any], list[Any]]:
    """The tier's training forward pass in PyTorch, read off its inference graph, plus its trainable tensors.

    With the manifest's HeteroFL scaler on, hidden fc/conv outputs are multiplied by 1/rate, as the
    training graph does (the inference graph has no scaler).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(tier_dir / "inference.onnx")).graph
    manifest = TierManifest.load(tier_dir / MANIFEST_NAME)
    trainable = {p.name for p in manifest.params if p.trainable}
    scale, output = (1 / manifest.rate if manifest.scaler else 1.0), graph.output[0].name
    params = {
        t.name: torch.tensor(numpy_helper.to_array(t), requires_grad=t.name in trainable) for t in graph.initializer
    }

    def forward(x: Any) -> Any:
        values = {graph.input[0].name: x, **params}
        for node in graph.node:
            value = _torch_op(node, [values[name] for name in node.input], torch)
            hidden = node.op_type in ("Gemm", "Conv") and node.output[0] != output
            values[node.output[0]] = value * scale if hidden and scale != 1 else value
        return values[output]

    return forward, [params[name] for name in sorted(trainable)]


def _time_torch(request: _TierRequest) -> _TorchRun:
    """Time the same SGD steps as `_measure_tier` on the same graph in PyTorch (CPU)."""
    import torch

    torch.set_num_threads(request.threads)
    forward, trainable = _torch_model(Path(request.tier_dir), torch)
    optimizer = torch.optim.SGD(trainable, lr=LEARNING_RATE)
    seconds = []
    for batch in step_batches(_load_saved(request.data_dir), request.batch_size, request.warmup + request.steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(torch.from_numpy(batch.x)), torch.from_numpy(batch.y))
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return _TorchRun(step_seconds=seconds[request.warmup :], version=torch.__version__)


_CHILD_MODES: dict[str, tuple[type[BaseModel], Callable[[Any], BaseModel]]] = {
    "prepare": (_PrepareRequest, _prepare),
    "tier": (_TierRequest, _measure_tier),
    "torch": (_TierRequest, _time_torch),
}


def child_main(mode: str, request_json: str) -> int:
    """Entry point of a child: run one request, print the result (or {"error": ...}) as one JSON line."""
    # prepare logs what a fetch does (the parent relays it at each line's level); the others only warnings
    logging.basicConfig(level=logging.INFO if mode == "prepare" else logging.WARNING, format=_CHILD_LOG_FORMAT)
    if mode == "tier":
        # The training wheel's `import onnxruntime` imports torch whenever torch is installed (its build
        # validation loads onnxruntime.training): hide it, to measure ONNX Runtime as on a device without
        # torch. Not in `prepare`: scikit-learn reads any "torch" key in sys.modules as a loaded torch.
        sys.modules["torch"] = None  # type: ignore[assignment]
    request_type, handler = _CHILD_MODES[mode]
    try:
        result = handler(request_type.model_validate_json(request_json)).model_dump_json()
    except _USER_ERRORS as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(result, flush=True)
    return 0


def _relay(line: str, what: str, relay: bool) -> str:
    """Log one stderr line of a child: when relayed (a `prepare` child), with its own logger and level; else at
    debug."""
    level, _, rest = line.partition(" ")
    name, colon, message = rest.partition(": ")
    if relay and level in _RELAYED and colon and " " not in name:
        logging.getLogger(name).log(_RELAYED[level], "%s", message)
    else:
        log.debug("%s: %s", what, line)
    return line


def _run_child(mode: str, request: BaseModel, result_type: type[_Result], what: str) -> _Result:
    """Run one child in a fresh interpreter (request on stdin) and parse its JSON line; RuntimeError says what failed."""
    command = [sys.executable, "-m", "edge_client.bench", "--child", mode]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(request.model_dump_json())
        proc.stdin.close()
        stderr = [_relay(line.rstrip("\n"), what, mode == "prepare") for line in proc.stderr]  # live, as it comes
        stdout = proc.stdout.read()
    lines = stdout.strip().splitlines()
    try:
        payload = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        payload = {}
    if "error" in payload:
        raise RuntimeError(f"{what}: {payload['error']}")
    if proc.returncode != 0 or not payload:
        tail = "\n".join(stderr[-15:])
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}):\n{tail}")
    return result_type.model_validate(payload)


# -- the parent: orchestration ----------------------------------------------------------------


class _Progress:
    """A tqdm bar over the child runs when tqdm is installed (demo extra), else one log line each."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)

    def begin(self, label: str) -> None:
        """Show what runs now."""
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            log.info("bench %d/%d: %s", self.done + 1, self.total, label)

    def resize(self, total: int) -> None:
        """Change the number of runs (fewer tiers than asked for were fetched)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def end(self) -> None:
        """Count one finished run."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class _Tier:
    """A tier to measure: its folder and manifest."""

    dir: Path
    manifest: TierManifest


def _tiers_in(artifacts: Path, tiers: list[str] | None) -> dict[str, _Tier]:
    """The requested tiers of an export folder (None: all of them, widest first); ValueError names a tier the
    folder lacks."""
    index_path = artifacts / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: export the tiers first (tierfl export --out {artifacts})")
    index = ExportIndex.load(index_path)
    if tiers is None:
        tiers = _parse_tiers(",".join(index.tiers))
    missing = [t for t in tiers if t not in index.tiers]
    if missing:
        raise ValueError(f"tier(s) {', '.join(missing)} not in {index_path} (it has {', '.join(index.tiers)})")
    manifests = {t: artifacts / index.tiers[t] for t in tiers}
    return {t: _Tier(path.parent, TierManifest.load(path)) for t, path in manifests.items()}


def _tier_result(tier: _Tier, run: _TierRun, torch_run: _TorchRun | None) -> TierResult:
    """Summarise one tier's child runs."""
    p50, p95 = (float(v) * 1000 for v in np.percentile(run.step_seconds, [50, 95]))
    torch_p50 = float(np.median(torch_run.step_seconds)) * 1000 if torch_run else None
    return TierResult(
        tier=tier.manifest.tier, rate=tier.manifest.rate, params=tier.manifest.param_count,
        artifact_bytes=tier.manifest.artifact_bytes, step_p50_ms=p50, step_p95_ms=p95,
        samples_per_second=sum(run.step_samples) / sum(run.step_seconds),
        peak_rss_kib=run.peak_rss_kib, baseline_rss_kib=run.baseline_rss_kib, epochs_seconds=run.epochs_seconds,
        update_bytes=run.update_bytes, torch_step_p50_ms=torch_p50,
        ort_over_torch=p50 / torch_p50 if torch_p50 else None, backend=run.backend,
    )


def _host(torch_version: str | None) -> dict[str, str]:
    """Where the numbers were taken: machine, CPUs, Python and runtime versions."""
    host = {"machine": platform.machine(), "cpus": str(os.cpu_count()), "python": platform.python_version()}
    for package in ("onnxruntime-training-cpu", "onnxruntime"):  # the training wheel, or plain onnxruntime
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            host["onnxruntime"] = importlib.metadata.version(package)
            break
    if torch_version:
        host["torch"] = torch_version
    return host


def _torch_runs(model: ModelCard, torch: bool) -> bool:
    """Whether PyTorch times the tiers too: asked for, and a zoo mlp or cnn (the only graphs `_torch_op` reads)."""
    readable = model.recipe is not None and model.recipe.arch in TORCH_ARCHS
    if torch and not readable:
        log.info("no PyTorch comparison for %s: it reads only the zoo's %s graphs", model.name, " and ".join(TORCH_ARCHS))
    return torch and readable


def run_bench(settings: BenchSettings, spec: ModelSpec | None, artifacts: Path | None, torch: bool,
              fetch: _FetchRequest | None = None) -> BenchReport:
    """Measure every tier of `settings.tiers`, each in fresh child processes; see the module docstring.

    The tiers come from `artifacts`, from the fleet (`fetch`: those of `settings.tiers` it exports),
    or are exported here from the zoo model `spec`.
    """
    found = _tiers_in(artifacts, settings.tiers) if artifacts else None
    model = next(iter(found.values())).manifest.model if found else None
    if model is not None:
        torch = _torch_runs(model, torch)
    progress = _Progress(1 + len(settings.tiers) * (2 if torch else 1))
    try:
        with tempfile.TemporaryDirectory(prefix="tierfl-bench-") as work:
            export = None if artifacts or fetch else spec
            prepare = _PrepareRequest(data=settings.data, model=model, work_dir=work, export=export, fetch=fetch,
                                      tiers=settings.tiers, backend=settings.backend)
            progress.begin("loading data" + (" and fetching tiers" if fetch else "" if artifacts else
                                             " and exporting tiers"))
            prepared = _run_child("prepare", prepare, _Prepared, "preparing data and artifacts")
            samples = prepared.samples
            progress.end()
            if found:
                tiers = found
            elif fetch:
                tiers = {t: _Tier(Path(folder), TierManifest.load(Path(folder) / MANIFEST_NAME))
                         for t, folder in prepared.fetched.items()}
                settings = settings.model_copy(update={"tiers": list(tiers)})
            else:
                tiers = _tiers_in(Path(work) / "artifacts", settings.tiers)
            if model is None:  # the fetched or exported tiers'
                model = next(iter(tiers.values())).manifest.model
                torch = _torch_runs(model, torch)
                progress.resize(1 + len(tiers) * (2 if torch else 1))
            results, torch_version = [], None
            for name, tier in tiers.items():
                request = _TierRequest(tier_dir=str(tier.dir), data_dir=work, batch_size=settings.batch_size,
                                       warmup=settings.warmup_steps, steps=settings.steps, epochs=settings.epochs,
                                       threads=settings.threads, codecs=settings.codecs, backend=settings.backend)
                progress.begin(f"tier {name}")
                run = _run_child("tier", request, _TierRun, f"tier {name}")
                progress.end()
                torch_run = None
                if torch:
                    progress.begin(f"tier {name} in PyTorch")
                    torch_run = _run_child("torch", request, _TorchRun, f"tier {name} in PyTorch")
                    torch_version = torch_run.version
                    progress.end()
                results.append(_tier_result(tier, run, torch_run))
    finally:
        progress.close()
    parent_peak = _peak_rss_kib()
    if parent_peak and any(r.peak_rss_kib and r.peak_rss_kib <= parent_peak for r in results):
        log.warning("a tier's peak RSS is not above this process's (%d KiB): it may be inherited, not its own",
                    parent_peak)
    return BenchReport(model=model, settings=settings, samples=samples, host=_host(torch_version),
                       parent_peak_rss_kib=parent_peak, tiers=results)


# -- output ------------------------------------------------------------------------------------


def _num(value: float) -> str:
    """Three significant digits below 100, whole numbers with thousands separators above."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


@dataclass(frozen=True)
class _Column:
    header: str
    meaning: str
    cell: Callable[[TierResult], str]


COLUMNS = (
    _Column("tier", "device tier (a is the full width)", lambda r: r.tier),
    _Column("rate", "HeteroFL width rate of the hidden layers", lambda r: f"{r.rate:g}"),
    _Column("params", "parameters of the tier's model", lambda r: f"{r.params:,}"),
    _Column("artifacts KiB", "size of the tier's files a device downloads (manifest sum)",
            lambda r: f"{r.artifact_bytes / 1024:,.0f}"),
    _Column("step p50 ms", "median time of one training step (forward, backward, SGD) on one batch",
            lambda r: _num(r.step_p50_ms)),
    _Column("step p95 ms", "95th percentile of the same", lambda r: _num(r.step_p95_ms)),
    _Column("samples/s", "training throughput over the timed steps", lambda r: f"{r.samples_per_second:,.0f}"),
    _Column("peak RSS MiB", "peak resident memory of the tier's own process (ru_maxrss: data, runtime, tier)",
            lambda r: _mib(r.peak_rss_kib)),
    _Column("tier MiB", "what loading and training the tier added to that peak (over imports and data)",
            lambda r: _mib(None if r.peak_rss_kib is None else r.peak_rss_kib - (r.baseline_rss_kib or 0))),
    _Column("E epochs s", "time of E epochs over the whole data set (shuffled mini-batches)",
            lambda r: "-" if r.epochs_seconds is None else _num(r.epochs_seconds)),
)
TORCH_COLUMNS = (
    _Column("torch p50 ms", "median step time of the same graph in PyTorch CPU (only if torch is installed)",
            lambda r: "-" if r.torch_step_p50_ms is None else _num(r.torch_step_p50_ms)),
    _Column("ORT/torch", "step p50 of ONNX Runtime over PyTorch's (> 1: ONNX Runtime is slower)",
            lambda r: "-" if r.ort_over_torch is None else f"{r.ort_over_torch:.2f}"),
)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(report: BenchReport) -> str:
    """bench.md: a heading, the per-tier table and the update bytes per codec."""
    s = report.settings
    columns = COLUMNS + (TORCH_COLUMNS if any(r.torch_step_p50_ms for r in report.tiers) else ())
    host = ", ".join(f"{k} {v}" for k, v in report.host.items())
    lines = [
        f"# tierfl bench: {report.model.name} on {s.data} ({report.samples:,} samples)",
        "",
        f"Batch {s.batch_size}, {s.steps} timed steps after {s.warmup_steps} warm-up, E = {s.epochs}, "
        f"{s.threads} thread(s), {', '.join(sorted({r.backend for r in report.tiers}))} backend; {host}.",
        "",
        *_table([c.header for c in columns], [[c.cell(r) for c in columns] for r in report.tiers]),
        "",
        "Bytes of one update frame (header and tensors) per codec:",
        "",
        *_table(["tier", *s.codecs], [[r.tier, *(f"{r.update_bytes[c]:,}" for c in s.codecs)] for r in report.tiers]),
    ]
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: Path) -> None:
    """bench.png: samples/s, step p50 (and PyTorch's) and peak RSS per tier."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    tiers = [f"{r.tier}\n{r.rate:g}" for r in report.tiers]
    x = np.arange(len(tiers))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    axes[0].bar(x, [r.samples_per_second for r in report.tiers], color="tab:blue")
    axes[0].set_ylabel("training samples/s")
    has_torch = any(r.torch_step_p50_ms for r in report.tiers)
    width = 0.4 if has_torch else 0.8
    axes[1].bar(x - (width / 2 if has_torch else 0), [r.step_p50_ms for r in report.tiers], width,
                yerr=[[0] * len(x), [r.step_p95_ms - r.step_p50_ms for r in report.tiers]],
                color="tab:orange", label="ONNX Runtime (bar p50, whisker p95)")
    if has_torch:
        axes[1].bar(x + width / 2, [r.torch_step_p50_ms or 0 for r in report.tiers], width,
                    color="tab:gray", label="PyTorch p50")
    axes[1].set_ylabel("ms per step")
    axes[1].legend(fontsize=8)
    baseline = [(r.baseline_rss_kib or 0) / 1024 for r in report.tiers]
    added = [(r.peak_rss_kib or 0) / 1024 - b for r, b in zip(report.tiers, baseline, strict=True)]
    axes[2].bar(x, baseline, color="tab:olive", alpha=0.5, label="imports and data")
    axes[2].bar(x, added, bottom=baseline, color="tab:green", label="added by the tier")
    axes[2].set_ylabel("peak RSS MiB")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, tiers)
        ax.set_xlabel("tier, width rate")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"tierfl bench: {report.model.name}, batch {report.settings.batch_size}, "
                 f"{report.settings.threads} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: BenchReport, out: Path) -> None:
    """Write bench.json, bench.md and bench.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(report.model_dump_json(indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    if importlib.util.find_spec("matplotlib") is None:  # a device install: the numbers, no plot
        log.info("no bench.png: matplotlib is not installed here (pip install 'tierfl[demo]' to plot)")
        return
    plot(report, out / "bench.png")


# -- command line ------------------------------------------------------------------------------

EPILOG = (
    "examples:\n"
    "  tierfl bench --tiers a,c,e --steps 100 --out runs/bench/mlp8\n"
    "  tierfl bench --arch cnn --image-size 28 --data fashion-mnist --threads 2 --out runs/bench/cnn28\n"
    "  tierfl bench --artifacts runs/artifacts/cnn8-bn --data /data/local.npz\n"
    "  tierfl bench --broker mqtt://192.168.1.10:1883 --fleet lab --device-id pi-1 --data /data/local.npz\n\n"
    "On a device install (tierfl[edge]: no onnx package) bench cannot export: give it the fleet's\n"
    "artifacts, a copy of the aggregator's STATE_DIR/artifacts (--artifacts), or let it fetch them\n"
    "from the fleet's aggregator over MQTT as `tierfl client` does (--broker, --fleet, --device-id:\n"
    "signed, by sha256, into the device's artifact cache). Bench says hello and asks for each tier's\n"
    "catalogue (its files by sha256, as a task names them), fetches and checks the files, trains\n"
    "nothing and leaves: no round is joined or waited for. Run it before `tierfl client`, not\n"
    "beside it: both are the same device.\n\n"
    "columns of bench.md:\n"
    + "\n".join(f"  {c.header:<14} {c.meaning}" for c in COLUMNS + TORCH_COLUMNS)
    + "\n\nbench.md also lists the bytes of one update frame per codec (a real encoded frame of the\n"
    "delta of the timed steps). bench.json holds the same numbers unrounded; memory there is in KiB\n"
    "(ru_maxrss, the Linux unit). Each tier runs in its own fresh process, so its peak memory is its own."
)


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl bench` options to `parser`."""
    parser.description = (
        "Benchmark every device tier of a model on this device: training step latency, throughput, "
        "peak memory, artifact bytes, update bytes per codec and the time of E epochs on local data. "
        "Writes bench.json, bench.md and bench.png. If PyTorch is installed, a zoo mlp's or cnn's graph is "
        "also timed in PyTorch CPU."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--arch", choices=["mlp", "cnn"], default="mlp", help="model family (default: mlp)")
    parser.add_argument("--image-size", type=int, choices=[8, 28], default=8, help="input side in pixels (default: 8)")
    parser.add_argument("--batch-norm", action="store_true", help="add BatchNorm after each hidden layer")
    parser.add_argument("--tiers", help="comma-separated tiers (default: every tier of --artifacts, every tier the "
                                        f"fleet exports with --broker, else {','.join(TIER_RATES)})")
    parser.add_argument("--data", help="FILE.npz (keys x, y) | digits | fashion-mnist[:train|:test] "
                                       "(default: digits for a model of 1x8x8 samples, fashion-mnist for 1x28x28; "
                                       "other models need --data)")
    parser.add_argument("--epochs", type=_at_least(0), default=1, help="E, epochs timed over the data; 0 skips (default: 1)")
    parser.add_argument("--batch-size", type=_at_least(1), default=32, help="samples per step (default: 32)")
    parser.add_argument("--steps", type=_at_least(1), default=50,
                        help=f"timed steps, after {WARMUP_STEPS} warm-up steps (default: 50)")
    parser.add_argument("--threads", type=_at_least(1), default=1, help="ONNX Runtime (and PyTorch) threads (default: 1)")
    parser.add_argument("--artifacts", type=Path,
                        help="existing `tierfl export` folder to measure, e.g. a copy of the aggregator's "
                             "STATE_DIR/artifacts (its index.json names the model; --arch/--image-size/--batch-norm "
                             "are then ignored); default: fetch them with --broker, else export into a temp folder")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="training backend to measure, as `tierfl client --backend`: auto takes onnxruntime-training "
                             "where its wheel works, else the portable step graph on plain onnxruntime (default: auto)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison even if torch is installed")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default: runs/bench)")
    fleet = parser.add_argument_group(
        "fetch the tiers from the fleet's aggregator (as `tierfl client`; needs --data, the device's own)")
    add_fleet_arguments(fleet, broker_help=f"; default: ${BROKER_ENV}, read as the client reads it (keeps a password "
                                            "off the command line)")
    add_aggregator_arguments(fleet)
    add_cache_argument(fleet)
    add_message_size_argument(fleet)
    fleet.add_argument("--cache-max-mb", type=float, default=512.0,
                       help="bound of the artifact cache in MB, as `tierfl client --cache-max-mb` (default: %(default)s)")
    fleet.add_argument("--fetch-timeout", type=float, default=600.0, metavar="S",
                       help="seconds to wait for the broker and for each tier's files (default: %(default)s)")


def _parse_tiers(text: str) -> list[str]:
    """"a,c" -> ["a", "c"]; ValueError names the known tiers."""
    tiers = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not tiers:
        raise ValueError("--tiers: no tiers given")
    for tier in tiers:
        tier_rate(tier)
    return sorted(tiers, key=list(TIER_RATES).index)


def _usage_error(message: str) -> argparse.ArgumentError:
    """Options that cannot run as given: `tierfl` says so in one line, exit status 2, like argparse."""
    return argparse.ArgumentError(None, message)


def run(args: argparse.Namespace) -> int:
    """Run `tierfl bench`: measure, write bench.json/.md/.png, print the table; returns the exit code."""
    tiers = _parse_tiers(args.tiers) if args.tiers else None
    spec: ModelSpec | None = None  # the zoo model to export here
    fetch = None
    broker = args.broker or (os.environ.get(BROKER_ENV) if not args.artifacts else None)
    if args.artifacts and args.broker:
        raise _usage_error("--artifacts and --broker both name where the tiers come from: give one")
    if args.artifacts:
        found = _tiers_in(args.artifacts, tiers)  # fail fast, before any child runs
        tiers, input_shape = list(found), next(iter(found.values())).manifest.model.input_shape
    elif broker:
        if not args.data:
            raise _usage_error(f"--broker (or ${BROKER_ENV}) needs --data: bench measures the tiers on the device's "
                               "own data, as `tierfl client --data` trains on it")
        fetch = _FetchRequest(access=FleetAccess.from_args(args, broker), required=tiers is not None,
                              timeout_s=args.fetch_timeout, cache_max_mb=args.cache_max_mb)
        input_shape = []  # the fetched tiers' model: --data is given
    elif importlib.util.find_spec("onnx") is None:
        raise _usage_error("without --artifacts or --broker, bench exports the tiers itself, which needs the onnx "
                           "package (not installed here): pass --artifacts DIR (a copy of the aggregator's "
                           "STATE_DIR/artifacts), or --broker URL --fleet NAME --data FILE to fetch them from the "
                           "fleet's aggregator, or pip install 'tierfl[full]'")
    else:
        spec = ModelSpec(arch=args.arch, image_size=args.image_size, batch_norm=args.batch_norm)
        input_shape = list(spec.input_shape)
    data = args.data or DEFAULT_DATA.get(tuple(input_shape))
    if data is None:
        built_in = ", ".join(f"{name}: {list(shape)}" for shape, name in DEFAULT_DATA.items())
        raise _usage_error(f"the model takes samples of shape {input_shape}, which no built-in data set holds "
                           f"({built_in}): give --data FILE.npz")
    tiers = tiers or list(TIER_RATES)
    settings = BenchSettings(
        data=data, tiers=tiers,
        batch_size=args.batch_size, warmup_steps=WARMUP_STEPS, steps=args.steps, epochs=args.epochs,
        threads=args.threads, codecs=list(UPDATE_CODECS), backend=args.backend,
    )
    # PyTorch runs the tier's graph as read by onnx: both must be installed
    torch = not args.no_torch and all(importlib.util.find_spec(m) is not None for m in ("torch", "onnx"))
    started = time.perf_counter()
    report = run_bench(settings, spec, args.artifacts, torch, fetch)
    write_outputs(report, args.out)
    print(markdown(report))
    log.info("bench of %s (%s backend) done in %.1f s; wrote its results to %s", report.model.name,
             ", ".join(sorted({t.backend for t in report.tiers})), time.perf_counter() - started, args.out)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"] and len(sys.argv) == 3:
        raise SystemExit(child_main(sys.argv[2], sys.stdin.read()))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _parser = argparse.ArgumentParser(prog="tierfl bench")
    configure_parser(_parser)
    raise SystemExit(run(_parser.parse_args()))
