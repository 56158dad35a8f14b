"""Zoo models on both training backends against PyTorch CPU: step time, peak memory, parameters and MACs per tier.

Per zoo model (default: mlp8, cnn28-bn, preresnet32, mobilenet32, conv1d-40x49, transformer-16x16)
and tier (default a, c, e), exported with models.export.export_all:

- step time, interleaved: three long-lived workers hold the tier open -- onnxruntime-training's
  artifacts (edge_client.trainer.OrtTrainer) and the portable step graph
  (edge_client.portable.PortableTrainer) in this interpreter, and the same architecture at the
  same width in PyTorch (scripts/bench_models_torch.py, in its own virtualenv) -- and the parent
  has them run blocks of steps in rotating order (A B C, B C A, C A B, ...), so drift on a shared
  machine hits every backend alike. Every worker is pinned to the same CPU with one intra-op
  thread and trains with plain SGD from the tier's starting weights on the same seeded batches
  (inputs uniform in [0, 1), random labels: a step costs the same on any data). An ONNX step is
  the trainer's own timer around one step of `train(one batch)`; a PyTorch step is zero_grad,
  forward, cross-entropy, backward and the SGD step, in train mode.
- the same model: PyTorch's parameter and buffer names and shapes must equal the manifest's (the
  run fails otherwise), and the losses of the memory runs below (same weights, same batches) are
  compared step by step.
- peak memory: each (model, tier, backend) in a fresh child process that loads the batches, opens
  the tier and runs 20 steps. VmHWM, the high-water mark of the process's resident set, after the
  imports and batches (baseline) and at the end: unlike ru_maxrss it starts afresh at exec, so
  the parent's size does not leak into a child's.
- parameters (trainable and BatchNorm running statistics), MACs per sample and artifact bytes from
  the tier's manifest.

Nothing crosses a process boundary but JSON lines and .npz files (loaded without pickle). The
module's top level imports only the standard library: bench_models_torch.py reuses the child
protocol in the PyTorch virtualenv. Writes the step-time section of benchmarks/models.{json,md};
`scripts/bench_heterofl.py --arch preresnet` writes their HeteroFL section.

    .venv/bin/python scripts/bench_models.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parent imports the model stack only once it runs (the PyTorch venv has none of it)
    from models.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
TORCH_SCRIPT = ROOT / "scripts" / "bench_models_torch.py"
DEFAULT_MODELS = "mlp8,cnn28-bn,preresnet32,mobilenet32,conv1d-40x49,transformer-16x16"
ORT, PORTABLE, TORCH = "ort-training", "portable", "torch"
NAMES = {ORT: "ORT training", PORTABLE: "portable", TORCH: "PyTorch"}
REPORT = "models"
SECTIONS = ("step_time", "heterofl")  # the order of models.md
TITLE = "# Zoo models: step time, memory and HeteroFL"
TORCH_VENV_HINT = ("python3.11 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 onnx==1.17.0 numpy")

log = logging.getLogger("bench_models")
StepFn = Callable[[Any, Any], tuple[float, float]]  # (x, y) -> (seconds, loss)


# -- children (the protocol is standard library only; each side brings its own step) -------------


def vm_hwm_kib() -> int:
    """This process's resident-set high-water mark in KiB (VmHWM of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line")


def _emit(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


def child_main(mode: str, request_json: str, open_step: Callable[[dict], StepFn], runtime: Callable[[], str]) -> int:
    """Run one child: `memory` takes `steps` steps and reports its VmHWM; `worker` runs blocks of steps on request.

    `runtime` imports the backend's libraries and names their version; the baseline VmHWM is
    read after it and the batches. A worker answers each stdin line {"count": n} with the
    seconds and losses of its next n steps (batch i of the saved batches at step i, cycling), and
    {"quit": true} with its VmHWM.
    """
    request = json.loads(request_json)
    if request.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {request["cpu"]})
    try:
        import numpy as np

        with np.load(request["batches"], allow_pickle=False) as saved:
            x, y = saved["x"], saved["y"]
        size = request["batch_size"]
        count = len(y) // size
        version = runtime()
        baseline = vm_hwm_kib()
        step = open_step(request)
    except (OSError, ValueError, RuntimeError, ImportError, KeyError) as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1

    def run(i: int) -> tuple[float, float]:
        j = i % count
        return step(x[j * size : (j + 1) * size], y[j * size : (j + 1) * size])

    if mode == "memory":
        losses = [run(i)[1] for i in range(request["steps"])]
        _emit({"baseline_kib": baseline, "peak_kib": vm_hwm_kib(), "losses": losses, "version": version})
        return 0
    _emit({"ready": True, "version": version})
    done = 0
    while line := sys.stdin.readline():
        command = json.loads(line)
        if command.get("quit"):
            _emit({"peak_kib": vm_hwm_kib()})
            return 0
        out: dict[str, list[float]] = {"seconds": [], "losses": []}
        for _ in range(command["count"]):
            seconds, loss = run(done)
            out["seconds"].append(seconds)
            out["losses"].append(loss)
            done += 1
        _emit(out)
    return 0


def open_onnx_step(request: dict) -> StepFn:
    """The request's tier on an ONNX backend (ort-training or portable) at its starting weights: one step per call."""
    import numpy as np

    from edge_client.backends import open_trainer
    from models.data import Dataset
    from models.manifest import TierManifest

    tier_dir = Path(request["tier_dir"])
    manifest = TierManifest.load(tier_dir / "manifest.json")
    trainer = open_trainer(request["backend"], tier_dir, manifest, request["threads"])
    with np.load(request["weights"], allow_pickle=False) as saved:
        trainer.set_weights({name: saved[name] for name in saved.files})

    def step(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        stats = trainer.train(Dataset(x, y), epochs=1, batch_size=len(y), learning_rate=request["lr"], seed=0)
        return stats.seconds, stats.loss

    return step


def onnx_runtime() -> str:
    """Import onnxruntime and the trainers (as a device does before it trains); onnxruntime's version."""
    import onnxruntime

    import edge_client.portable  # noqa: F401
    import edge_client.trainer  # noqa: F401

    return onnxruntime.__version__


# -- the parent -------------------------------------------------------------------------------------


class Worker:
    """A long-lived child that runs blocks of steps when asked (JSON lines over its stdin and stdout)."""

    def __init__(self, label: str, command: list[str], stderr_path: Path) -> None:
        self.label, self._stderr = label, open(stderr_path, "wb")  # noqa: SIM115 (closed by close)
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, cwd=ROOT)
        try:
            self.hello = self._reply()
        except RuntimeError:
            self._proc.kill()
            self._stderr.close()
            raise

    def _reply(self) -> dict:
        """The child's next JSON object (other stdout lines skipped); RuntimeError with its stderr if it ended."""
        while line := self._proc.stdout.readline():
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and "error" in value:
                raise RuntimeError(f"{self.label}: {value['error']}")
            if isinstance(value, dict):
                return value
        self._proc.wait()
        raise RuntimeError(f"{self.label} ended (exit {self._proc.returncode}): {_tail(self._stderr)}")

    def ask(self, command: dict) -> dict:
        """Send one command and wait for its answer."""
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def close(self) -> dict:
        """Ask the child to quit (it reports its VmHWM) and wait for it; {} if it had already ended."""
        try:
            return self.ask({"quit": True})
        except (OSError, RuntimeError):
            self._proc.kill()
            return {}
        finally:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
            self._stderr.close()


def _tail(stream: IO[bytes], chars: int = 2000) -> str:
    """The end of a child's stderr file."""
    stream.flush()
    return Path(stream.name).read_text(errors="replace")[-chars:].strip()


def run_child(label: str, command: list[str]) -> dict:
    """One child to its end; its last JSON object, or RuntimeError saying what failed."""
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    for line in reversed(done.stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            if "error" in value:
                raise RuntimeError(f"{label}: {value['error']}")
            if done.returncode == 0:
                return value
            break
    raise RuntimeError(f"{label} failed (exit {done.returncode}): {done.stderr[-2000:].strip()}")


def model_specs(names: list[str]) -> list[ModelSpec]:
    """The zoo specs named (ModelSpec.name: each arch's default, and mlp/cnn at 8 or 28 px with or without BN)."""
    from models.spec import ARCH_DEFAULTS, ModelSpec

    catalogue = [ModelSpec(arch=arch) for arch in ARCH_DEFAULTS]
    catalogue += [ModelSpec(arch=arch, image_size=size, batch_norm=bn)
                  for arch in ("mlp", "cnn") for size in (8, 28) for bn in (False, True)]
    known = {spec.name: spec for spec in catalogue}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(known)}")
    return [known[name] for name in names]


def torch_interpreter(path: Path) -> str:
    """The PyTorch virtualenv's interpreter; SystemExit saying how to make it when it cannot import torch."""
    if path.exists():
        probe = subprocess.run([str(path), "-c", "import numpy, torch"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return str(path)
    sys.exit(f"error: {path} cannot import torch; make it with `{TORCH_VENV_HINT}` or pass --no-torch")


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def interleave(workers: dict[str, Worker], args: argparse.Namespace) -> dict[str, dict]:
    """Warm-up, then `rounds` blocks of `block` steps per backend in rotating order; per backend p50/p90 ms."""
    labels = list(workers)
    for label in labels:
        if args.warmup:
            workers[label].ask({"count": args.warmup})
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    blocks: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(args.rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            reply = workers[label].ask({"count": args.block})
            seconds[label] += reply["seconds"]
            blocks[label].append(statistics.median(reply["seconds"]))
    out = {}
    for label in labels:
        ms = [s * 1000 for s in seconds[label]]
        out[label] = {"p50_ms": statistics.median(ms), "p90_ms": _percentile(ms, 90), "steps": len(ms),
                      "block_p50_ms": [b * 1000 for b in blocks[label]]}
    for label in labels:
        if label != ORT:
            ratios = [b / o for b, o in zip(out[label]["block_p50_ms"], out[ORT]["block_p50_ms"])]
            out[label]["ratio"] = out[label]["p50_ms"] / out[ORT]["p50_ms"]
            out[label]["block_ratio_p10_p90"] = [_percentile(ratios, 10), _percentile(ratios, 90)]
    return out


def save_batches(path: Path, input_shape: list[int], classes: int, args: argparse.Namespace) -> None:
    """`args.batches` seeded batches: inputs uniform in [0, 1), labels uniform over the classes."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    n = args.batches * args.batch_size
    np.savez(path, x=rng.random((n, *input_shape), dtype=np.float32), y=rng.integers(0, classes, n, dtype=np.int64))


def export_model(spec: ModelSpec, tiers: list[str], folder: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Export the tiers; per tier its folder, the starting-weights .npz and the manifest's numbers."""
    import numpy as np

    from aggregator.store.artifacts import ArtifactStore
    from models.export import export_all
    from models.slicing import slice_params

    export_all(spec, tiers, folder)
    store = ArtifactStore(folder)
    global_weights = store.global_weights()
    tiers_out = {}
    for tier in tiers:
        manifest = store.tiers[tier].manifest
        weights = folder / tier / "bench_weights.npz"
        np.savez(weights, **slice_params(global_weights, store.tiers[tier].shapes))
        tiers_out[tier] = {"dir": str(folder / tier), "weights": str(weights), "rate": manifest.rate,
                           "params": manifest.param_count, "macs": manifest.macs,
                           "artifact_bytes": manifest.artifact_bytes,
                           "shapes": {p.name: list(p.shape) for p in manifest.params}}
    return tiers_out


def measure_tier(spec: ModelSpec, tier: str, info: dict, batches: Path, backends: list[str], args: argparse.Namespace,
                 logs: Path) -> dict:
    """Step times (interleaved workers), then peak memory and losses (a fresh child per backend) of one tier."""
    request = {"tier_dir": info["dir"], "weights": info["weights"], "batches": str(batches), "rate": info["rate"],
               "shapes": info["shapes"], "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
               "cpu": args.cpu, "spec": {**spec.model_dump(), "widths": list(spec.widths)}}

    def command(backend: str, mode: str, extra: dict) -> list[str]:
        body = json.dumps({**request, "backend": backend, **extra})
        if backend == TORCH:
            return [args.torch_python, str(TORCH_SCRIPT), mode, body]
        return [sys.executable, str(Path(__file__).resolve()), "--child", mode, body]

    workers: dict[str, Worker] = {}
    try:
        for backend in backends:
            workers[backend] = Worker(f"{spec.name} {tier} {backend}", command(backend, "worker", {}),
                                      logs / f"{spec.name}-{tier}-{backend}.log")
        series = interleave(workers, args)
    finally:
        for worker in workers.values():
            worker.close()
    versions = {b: w.hello["version"] for b, w in workers.items()}
    memory = {b: run_child(f"{spec.name} {tier} {b} memory", command(b, "memory", {"steps": args.memory_steps}))
              for b in backends}
    row = {"model": spec.name, "arch": spec.arch, "tier": tier,
           **{k: info[k] for k in ("rate", "params", "macs", "artifact_bytes")},
           "series": series, "versions": versions, "losses": {b: m["losses"] for b, m in memory.items()},
           "memory": {b: {"baseline_kib": m["baseline_kib"], "peak_kib": m["peak_kib"]} for b, m in memory.items()}}
    log.info("%s %s: %s", spec.name, tier, ", ".join(f"{NAMES[b]} {s['p50_ms']:.3g} ms" for b, s in series.items()))
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="zoo model names (ModelSpec.name), comma-separated")
    parser.add_argument("--tiers", default="ace", help="tier letters, e.g. ace")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every backend")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per backend before the blocks")
    parser.add_argument("--block", type=int, default=5, help="steps per block")
    parser.add_argument("--rounds", type=int, default=20, help="blocks per backend, in rotating order")
    parser.add_argument("--memory-steps", type=int, default=20, help="steps of each peak-memory child")
    parser.add_argument("--batches", type=int, default=20, help="distinct seeded batches, cycled")
    parser.add_argument("--cpu", type=int, default=1 if (os.cpu_count() or 1) > 1 else 0,
                        help="the CPU every timed child is pinned to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-python", type=Path, default=ROOT / ".venv-torch" / "bin" / "python",
                        help="interpreter of the PyTorch virtualenv")
    parser.add_argument("--no-torch", action="store_true", help="time the two ONNX backends only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.block < 1 or args.memory_steps < 1 or args.batches < 1:
        parser.error("--rounds, --block, --memory-steps and --batches must be >= 1")
    return args


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    options = []
    for key, value in vars(args).items():
        if key in ("out", "torch_python") or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        options.append(flag if value is True else f"{flag} {value}")
    return "python scripts/bench_models.py " + " ".join(options)


def host() -> dict[str, str]:
    """Machine, CPU, Python and the commit measured."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                            check=False).stdout.strip()
    return {"machine": platform.machine(), "cpus": str(os.cpu_count()), "cpu": cpu,
            "python": platform.python_version(), "commit": commit}


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    """Export, time and measure every model and tier; write the step-time section of models.{json,md}."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    # The onnxruntime-training wheel's `import onnxruntime` imports torch whenever it is installed: hide it here and
    # in the ONNX children, to measure ONNX Runtime as on a device.
    sys.modules["torch"] = None  # type: ignore[assignment]
    specs = model_specs(args.models.split(","))
    backends = [ORT, PORTABLE] + ([] if args.no_torch else [TORCH])
    if not args.no_torch:
        args.torch_python = torch_interpreter(args.torch_python)
    started, load_start, rows = time.perf_counter(), load_average(), []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as folder:
        work = Path(folder)
        for spec in specs:
            tiers = export_model(spec, list(args.tiers), work / spec.name, args)
            batches = work / spec.name / "batches.npz"
            save_batches(batches, list(spec.input_shape), spec.num_classes, args)
            rows += [measure_tier(spec, tier, info, batches, backends, args, work) for tier, info in tiers.items()]
    section = {"command": command_line(args), "config": {k: str(v) for k, v in vars(args).items()},
               "seconds": time.perf_counter() - started, "load_average": {"start": load_start, "end": load_average()},
               "host": host(), "rows": rows}
    section["markdown"] = step_time_markdown(section, backends, args)
    write_section(args.out, "step_time", section)
    print("\n".join(section["markdown"]))


def _ms(value: float) -> str:
    return f"{value:.3g}" if value >= 1 else f"{value:.3f}"


def step_time_markdown(section: dict, backends: list[str], args: argparse.Namespace) -> list[str]:
    """The step-time section: how it was measured, the table, and what it says."""
    rows, versions = section["rows"], section["rows"][0]["versions"]
    others = [b for b in backends if b != ORT]
    load = section["load_average"]
    lines = [
        "## Step time, memory, parameters and MACs per tier", "",
        f"Reproduce: `{section['command']}` ({section['seconds'] / 60:.1f} min; load average (1, 5, 15 min) at start "
        f"{load['start']}, at end {load['end']}, on a shared 2-core machine).", "",
        "Host: " + ", ".join(f"{k} {v}" for k, v in section["host"].items()) + "; "
        + ", ".join(f"{NAMES[b]} {versions[b]}" for b in backends)
        + " (the portable step graph runs on the onnxruntime inside the onnxruntime-training wheel).", "",
        f"Batch {args.batch_size}, {args.threads} intra-op thread(s), plain SGD at lr {args.lr}, train mode; every "
        "backend starts from the tier's starting weights on the same seeded batches (inputs uniform in [0, 1), random "
        "labels). One long-lived process per backend holds the tier open; after "
        f"{args.warmup} warm-up steps each, {args.rounds} blocks of {args.block} steps per backend run in rotating "
        f"order (ORT, portable, PyTorch; portable, PyTorch, ORT; ...), every process pinned to CPU {args.cpu}. "
        "Times are the p50 of every timed step in ms; a ratio is the p50 over ORT training's, with the 10th-90th "
        "percentile of the per-block ratios in brackets. An ONNX step is the trainer's own timer around one step of "
        "`train(one batch)` (feeding the batch, the step, the optimizer, fetching loss and logits); a PyTorch step "
        "is zero_grad, forward, cross-entropy, backward, SGD step and reading the loss. Parameters count the "
        "trainable ones and BatchNorm's running statistics (the manifest's `param_count`, the same count as PyTorch's "
        "parameters and buffers, checked); MACs are one sample's forward multiply-accumulates (the manifest's "
        "`macs`); artifact bytes all of the tier's files. Peak memory: VmHWM of a fresh process per (model, tier, "
        f"backend) that loads the batches, opens the tier and runs {args.memory_steps} steps.", "",
    ]
    header = ["model", "tier", "params", "MACs/sample", "artifact bytes", *(f"{NAMES[b]} ms" for b in backends),
              *(f"{NAMES[b]} / ORT" for b in others), "peak MiB: " + " / ".join(NAMES[b] for b in backends)]
    lines += [f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
    for r in rows:
        s = r["series"]
        cells = [r["model"], f"{r['tier']} ({r['rate']:g})", f"{r['params']:,}", f"{r['macs']:,}",
                 f"{r['artifact_bytes']:,}", *(_ms(s[b]["p50_ms"]) for b in backends),
                 *(f"{s[b]['ratio']:.2f} ({s[b]['block_ratio_p10_p90'][0]:.2f}-{s[b]['block_ratio_p10_p90'][1]:.2f})"
                   for b in others),
                 " / ".join(f"{r['memory'][b]['peak_kib'] / 1024:.0f}" for b in backends)]
        lines.append(f"| {' | '.join(cells)} |")
    lines.append("")
    for b in others:
        ratios = [r["series"][b]["ratio"] for r in rows]
        faster = [f"{r['model']} {r['tier']}" for r in rows if r["series"][b]["ratio"] < 1]
        lines.append(f"- {NAMES[b]} / ORT training: median {statistics.median(ratios):.2f}, from {min(ratios):.2f} to "
                     f"{max(ratios):.2f}; {NAMES[b]} is faster on {len(faster)} of {len(rows)} tiers"
                     + (f" ({', '.join(faster)})." if 0 < len(faster) < len(rows) else "."))
    pairs = [(a, b) for i, a in enumerate(backends) for b in backends[i + 1 :]]
    first = {(a, b): max(abs(r["losses"][a][0] - r["losses"][b][0]) for r in rows) for a, b in pairs}
    drift = {f"{r['model']} {r['tier']}": {(a, b): loss_drift(r, a, b) for a, b in pairs} for r in rows}
    worst = max(drift, key=lambda tier: max(drift[tier].values()))
    rest = max((max(d.values()) for tier, d in drift.items() if tier != worst), default=0.0)
    baseline = {b: [r["memory"][b]["baseline_kib"] / 1024 for r in rows] for b in backends}
    lines += [
        "- Same model: the first step's loss (same weights, same batch) differs between two backends by at most "
        + ", ".join(f"{v:.1e} ({NAMES[a]} - {NAMES[b]})" for (a, b), v in first.items())
        + f". Over the {args.memory_steps} steps of the memory runs the losses of two backends differ most on "
        f"{worst} (" + ", ".join(f"{NAMES[a]} - {NAMES[b]} {v:.1e}" for (a, b), v in drift[worst].items())
        + f"), by at most {rest:.1e} on every other tier (float rounding, which SGD steps amplify).",
        "- Memory baseline (after the imports and batches, before the tier is opened), MiB: "
        + "; ".join(f"{NAMES[b]} {min(v):.0f} to {max(v):.0f}" for b, v in baseline.items()) + ".",
    ]
    return lines


def loss_drift(row: dict, a: str, b: str) -> float:
    """The largest difference between backends a and b's losses over the memory run's steps."""
    return max(abs(x - y) for x, y in zip(row["losses"][a], row["losses"][b]))


def write_section(out: Path, key: str, section: dict) -> None:
    """Put one section (with its `markdown` lines) into models.json and rewrite models.md from every section there."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{REPORT}.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report[key] = section
    ordered = {k: report[k] for k in (*SECTIONS, *sorted(set(report) - set(SECTIONS))) if k in report}
    path.write_text(json.dumps(ordered, indent=1) + "\n")
    lines = [TITLE, "", "Issue 15's benchmark of the edge zoo (models/zoo.py). `scripts/bench_models.py` writes the "
             "step-time section, `scripts/bench_heterofl.py --arch preresnet` the HeteroFL section; models.json holds "
             "both runs' numbers."]
    for value in ordered.values():
        lines += ["", *value["markdown"]]
    (out / f"{REPORT}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"] and len(sys.argv) == 4:
        sys.modules["torch"] = None  # type: ignore[assignment]  (see main)
        sys.exit(child_main(sys.argv[2], sys.argv[3], open_onnx_step, onnx_runtime))
    main()
