"""Portable backend against onnxruntime-training: step time and peak memory per model and tier.

Per (model, tier), with the same batches, batch size, learning rate, starting weights and threads:

- step time, interleaved: one long-lived worker process per interpreter holds the tier loaded --
  this one (the onnxruntime-training wheel: `ort-training` and `portable@<its onnxruntime>`) and
  the device virtualenv (`tierfl[edge]`, plain onnxruntime: `portable@<version>`) -- and the
  parent has them run blocks of steps in rotating order (A B C, B C A, C A B, ...), so drift on
  a shared machine hits every backend alike. A step is one `trainer.train(one batch, epochs=1)`
  call: `step` is the trainer's own timer around its step loop (what `tierfl bench` reports),
  `call` is time.perf_counter around the whole call (adds the per-call setup).
- where the portable step's time goes: each portable worker also runs `graph@<version>`, the
  tier's step_model.onnx alone through the public onnxruntime API, with every input and output
  bound once (two IO bindings that swap the parameter buffers, batch and labels copied into
  bound OrtValues): the cost of the graph without the trainer's per-step binding and fetching.
- the same work: every series trains from the same weights on the same batches, so the losses
  must agree step by step (up to float rounding, which grows over many steps).
- peak memory: each (model, tier, backend) in a fresh child process that loads the data, opens
  the trainer and runs a few steps; ru_maxrss (KiB) after the imports and data (baseline) and at
  the end (peak). The parent imports only the standard library and stays small, because a
  child's ru_maxrss starts at the peak of the process that spawned it (see edge_client/bench.py).
- PyTorch CPU, when importable, through `python -m edge_client.bench --child torch` (the same
  graph with torch.optim.SGD, same batch size and threads; not interleaved).

Nothing crosses a process boundary but JSON lines and .npy/.npz files. Writes
benchmarks/backends.{json,md}.

    .venv/bin/python scripts/bench_backends.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = "mlp8,mlp8-bn,cnn8,cnn8-bn,mlp28,mlp28-bn,cnn28,cnn28-bn"
ORT, PORTABLE, GRAPH = "ort-training", "portable", "graph"
TARGET = 1.1  # portable step p50 / ORT training step p50 must not exceed this


# -- children (any interpreter with the project installed; onnx only in `prepare`) ----------------


def _peak_rss_kib() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _emit(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


def _parse_model(name: str) -> dict:
    """"cnn28-bn" -> {"arch": "cnn", "image_size": 28, "batch_norm": True}."""
    base, _, suffix = name.partition("-")
    arch, size = base[:3], base[3:]
    if arch not in ("mlp", "cnn") or size not in ("8", "28") or suffix not in ("", "bn"):
        raise ValueError(f"unknown model {name!r}: expected mlp|cnn, 8|28, optional -bn (e.g. cnn28-bn)")
    return {"arch": arch, "image_size": int(size), "batch_norm": suffix == "bn"}


def child_prepare(request: dict) -> dict:
    """Export every model's tiers, save their starting weights (.npz) and the data with its batch order (.npy)."""
    import numpy as np

    from aggregator.store.artifacts import ArtifactStore
    from models.data import load_digits, load_fashion_mnist
    from models.export import export_all
    from models.slicing import slice_params
    from models.spec import ModelSpec

    work = Path(request["work"])
    batch, count, seed = request["batch_size"], request["batches"], request["seed"]
    data_dirs = {}
    for size in sorted({_parse_model(m)["image_size"] for m in request["models"]}):
        if size == 8:
            name, data = "digits", load_digits()
        else:
            name, data = "fashion-mnist", load_fashion_mnist(split="train")
            keep = np.random.default_rng(seed).permutation(len(data))[: request["fashion_samples"]]
            data = data.subset(np.sort(keep))
        folder = work / "data" / name
        folder.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        passes = -(-count * batch // len(data))
        order = np.concatenate([rng.permutation(len(data)) for _ in range(passes)])[: count * batch]
        np.save(folder / "x.npy", data.x, allow_pickle=False)
        np.save(folder / "y.npy", data.y, allow_pickle=False)
        np.save(folder / "batches.npy", order.reshape(count, batch).astype(np.int64), allow_pickle=False)
        data_dirs[size] = {"name": name, "dir": str(folder), "samples": len(data)}
    models = {}
    for model in request["models"]:
        spec = ModelSpec(**_parse_model(model), seed=seed)
        tiers = request["tiers"][model]
        export_all(spec, tiers, work / "artifacts" / model)
        store = ArtifactStore(work / "artifacts" / model)
        global_weights = store.global_weights()
        models[model] = {}
        for tier in tiers:
            tier_dir = store.root / tier
            manifest = store.tiers[tier].manifest
            np.savez(tier_dir / "bench_weights.npz", **slice_params(global_weights, store.tiers[tier].shapes))
            models[model][tier] = {
                "dir": str(tier_dir), "rate": manifest.rate, "params": manifest.param_count,
                "data": data_dirs[spec.image_size]["name"], "data_dir": data_dirs[spec.image_size]["dir"],
            }
    return {"models": models, "data": {v["name"]: v["samples"] for v in data_dirs.values()}}


def _start_weights(tier_dir: Path) -> dict:
    import numpy as np

    with np.load(tier_dir / "bench_weights.npz", allow_pickle=False) as saved:
        return {name: saved[name] for name in saved.files}


class _GraphStep:
    """The tier's step_model.onnx alone, every input and output bound once; a `train`-like call per batch.

    Two IO bindings swap the parameter/state buffers (one reads A and writes B, the other the
    reverse); batch and labels are copied into bound OrtValues. This is the graph's own cost,
    without a trainer's per-step binding, output allocation and fetching.
    """

    def __init__(self, tier_dir: Path, threads: int, lr: float, batch_size: int) -> None:
        import numpy as np
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(tier_dir / "step_model.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
        manifest = json.loads((tier_dir / "manifest.json").read_text())
        self.params = [p["name"] for p in manifest["params"]]
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        carried = [name for name in inputs if name + ".new" in outputs]
        weights = _start_weights(tier_dir)
        state = {n: weights[n] if n in weights else np.zeros(inputs[n].shape, np.float32) for n in carried}
        sample, classes = manifest["model"]["input_shape"], manifest["model"]["num_classes"]
        # OrtValues made from numpy borrow its memory: self._arrays keeps every such array alive.
        self._arrays = {"learning_rate": np.array([lr], np.float32), "momentum": np.zeros(1, np.float32),
                        "scale": np.array([1.0 / manifest["rate"]], np.float32),
                        "class_mask": np.zeros(classes, np.float32)}
        self._arrays = {k: v for k, v in self._arrays.items() if k in inputs}
        new = onnxruntime.OrtValue.ortvalue_from_shape_and_type
        self.x = new([batch_size, *sample], np.float32)
        self.y = new([batch_size], np.int64)
        self.loss = new([], np.float32)
        self.logits = new([batch_size, classes], np.float32)
        self.buffers = [{n: new(list(v.shape), np.float32) for n, v in state.items()} for _ in range(2)]
        for name, value in state.items():
            self.buffers[0][name].update_inplace(np.ascontiguousarray(value, np.float32))
        constants = {k: onnxruntime.OrtValue.ortvalue_from_numpy(v) for k, v in self._arrays.items()}
        self.bindings = []
        for source, target in ((0, 1), (1, 0)):
            binding = self.session.io_binding()
            for name, value in constants.items():
                binding.bind_ortvalue_input(name, value)
            for name in carried:
                binding.bind_ortvalue_input(name, self.buffers[source][name])
                binding.bind_ortvalue_output(name + ".new", self.buffers[target][name])
            binding.bind_ortvalue_input("input", self.x)
            binding.bind_ortvalue_input("labels", self.y)
            binding.bind_ortvalue_output("loss", self.loss)
            binding.bind_ortvalue_output("logits", self.logits)
            self.bindings.append(binding)
        self._constants = constants
        self.current = 0

    def train(self, data, epochs: int, batch_size: int, learning_rate: float, seed: int) -> SimpleNamespace:
        started = time.perf_counter()
        self.x.update_inplace(data.x)
        self.y.update_inplace(data.y)
        self.session.run_with_iobinding(self.bindings[self.current])
        self.current ^= 1
        loss = float(self.loss.numpy())
        self.logits.numpy()
        return SimpleNamespace(seconds=time.perf_counter() - started, loss=loss)

    def get_weights(self) -> dict:
        return {name: self.buffers[self.current][name].numpy() for name in self.params}


def _open(request: dict, kind: str):
    """A trainer of `kind` (ort-training, portable or graph) on the request's tier, at the starting weights."""
    tier_dir = Path(request["tier_dir"])
    if kind == GRAPH:
        return _GraphStep(tier_dir, request["threads"], request["lr"], request["batch_size"])
    from edge_client.backends import open_trainer
    from models.manifest import TierManifest

    trainer = open_trainer(kind, tier_dir, TierManifest.load(tier_dir / "manifest.json"), request["threads"])
    trainer.set_weights(_start_weights(tier_dir))
    return trainer


class _Batches:
    """The data set's mini-batches in the saved order; batch i is cut (a one-batch Dataset) when asked for."""

    def __init__(self, data_dir: str) -> None:
        import numpy as np

        from models.data import Dataset

        folder = Path(data_dir)
        self.data = Dataset(np.load(folder / "x.npy", allow_pickle=False), np.load(folder / "y.npy", allow_pickle=False))
        self.order = np.load(folder / "batches.npy", allow_pickle=False)

    def __getitem__(self, i: int):
        return self.data.subset(self.order[i % len(self.order)])


def _one_step(trainer, batch, lr: float, seed: int) -> tuple[float, float, float]:
    """(call seconds, step seconds, loss) of one train() call over a one-batch Dataset."""
    started = time.perf_counter()
    stats = trainer.train(batch, epochs=1, batch_size=len(batch), learning_rate=lr, seed=seed)
    return time.perf_counter() - started, stats.seconds, stats.loss


def child_worker(request: dict) -> None:
    """Hold the tier open in each series; run blocks of steps as the parent asks (JSON lines on stdin)."""
    import numpy as np

    batches = _Batches(request["data_dir"])
    trainers = {label: _open(request, kind) for label, kind in request["series"].items()}
    done = dict.fromkeys(trainers, 0)
    _emit({"ready": True})
    while line := sys.stdin.readline():
        command = json.loads(line)
        if command.get("quit"):
            _emit({label: float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum())
                                            for v in trainer.get_weights().values())))
                   for label, trainer in trainers.items()})
            return
        label = command["series"]
        trainer, out = trainers[label], {"call": [], "step": [], "loss": []}
        for _ in range(command["count"]):
            i = done[label]
            call, step, loss = _one_step(trainer, batches[i], request["lr"], i)
            out["call"].append(call)
            out["step"].append(step)
            out["loss"].append(loss)
            done[label] += 1
        _emit(out)


def child_memory(request: dict) -> dict:
    """Peak RSS of one backend on one tier, in this fresh process."""
    import onnxruntime  # noqa: F401 (part of the baseline, as on a device)

    import edge_client.backends  # noqa: F401

    batches = _Batches(request["data_dir"])
    baseline = _peak_rss_kib()
    trainer = _open(request, request["kind"])
    for i in range(request["steps"]):
        _one_step(trainer, batches[i], request["lr"], i)
    return {"baseline_rss_kib": baseline, "peak_rss_kib": _peak_rss_kib()}


def child_version(request: dict) -> dict:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def child_main(mode: str, request_json: str) -> int:
    request = json.loads(request_json)
    if request.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {request["cpu"]})  # every timed series on the same core
    if mode in ("worker", "memory"):
        # As edge_client/bench.py does: the training wheel's `import onnxruntime` imports torch whenever it is
        # installed; hide it, to measure ONNX Runtime as on a device without torch.
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        if mode == "worker":
            child_worker(request)
            return 0
        result = {"prepare": child_prepare, "memory": child_memory, "version": child_version}[mode](request)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _emit(result)
    return 0


# -- the parent (standard library only) -----------------------------------------------------------


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def run_child(python: str, mode: str, request: dict, what: str) -> dict:
    """One child in a fresh interpreter; its last JSON line, or RuntimeError saying what failed."""
    command = [python, str(Path(__file__).resolve()), "--child", mode, json.dumps(request)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    payload = _last_json(proc.stdout)
    if "error" in payload:
        raise RuntimeError(f"{what}: {payload['error']}")
    if proc.returncode != 0 or not payload:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return payload


class Worker:
    """A long-lived child (`--child worker`) driven by JSON lines on its stdin."""

    def __init__(self, python: str, request: dict, what: str) -> None:
        self.what = what
        self.log = tempfile.TemporaryFile(mode="w+")  # stderr to a file: a full pipe would block the child
        command = [python, str(Path(__file__).resolve()), "--child", "worker", json.dumps(request)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=ROOT)
        self._reply()

    def _reply(self) -> dict:
        while line := self.proc.stdout.readline():
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "error" in value:
                raise RuntimeError(f"{self.what}: {value['error']}")
            return value
        self.proc.wait()
        self.log.seek(0)
        raise RuntimeError(f"{self.what} exited ({self.proc.returncode}): {self.log.read().strip()[-1500:]}")

    def ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> dict:
        """Ask for the final weight norms and let the child exit."""
        try:
            return self.ask({"quit": True})
        finally:
            self.proc.stdin.close()
            self.proc.wait()
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _summary(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "mean_ms": sum(ms) / len(ms), "n": len(ms)}


def time_tier(tier: dict, series: dict[str, tuple[str, str]], args: argparse.Namespace) -> dict:
    """Interleaved step times of every series (label -> (python, kind)) on one tier."""
    base = {"tier_dir": tier["dir"], "data_dir": tier["data_dir"], "threads": args.threads, "lr": args.lr,
            "batch_size": args.batch_size, "cpu": args.cpu}
    by_python: dict[str, dict[str, str]] = {}
    for label, (python, kind) in series.items():
        by_python.setdefault(python, {})[label] = kind
    workers, owner = [], {}
    try:
        for python, labels in by_python.items():
            workers.append(Worker(python, base | {"series": labels}, f"worker for {', '.join(labels)}"))
            owner |= dict.fromkeys(labels, workers[-1])
        labels = list(series)
        for label in labels:
            owner[label].ask({"series": label, "count": args.warmup})
        runs = {label: {"call": [], "step": [], "loss": []} for label in labels}
        block_p50 = {label: [] for label in labels}
        for round_index in range(args.rounds):
            shift = round_index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                reply = owner[label].ask({"series": label, "count": args.block})
                for key, values in runs[label].items():
                    values += reply[key]
                block_p50[label].append(percentile(reply["step"], 50) * 1000)
        norms = {}
        for worker in workers:
            norms |= worker.close()
    finally:
        for worker in workers:
            worker.kill()
    reference = runs[ORT]["loss"]
    first = args.block

    def block_ratios(label: str) -> dict:
        ratios = [a / b for a, b in zip(block_p50[label], block_p50[ORT], strict=True)]
        return {"p10": percentile(ratios, 10), "p90": percentile(ratios, 90)}

    return {label: {
        "step": _summary(run["step"]), "call": _summary(run["call"]), "block_ratio_vs_ort": block_ratios(label),
        "loss_diff_first_block": max(abs(a - b) for a, b in zip(run["loss"][:first], reference[:first], strict=True)),
        "loss_diff_max": max(abs(a - b) for a, b in zip(run["loss"], reference, strict=True)),
        "last_loss": run["loss"][-1], "final_weight_l2": norms[label],
    } for label, run in runs.items()}


def _torch(tier: dict, args: argparse.Namespace) -> float:
    """Step p50 (ms) of the tier in PyTorch CPU through `tierfl bench`'s torch child (its graph reader and SGD)."""
    request = {"tier_dir": tier["dir"], "data_dir": tier["data_dir"], "batch_size": args.batch_size,
               "warmup": args.warmup, "steps": args.block * args.rounds, "epochs": 0, "threads": args.threads,
               "codecs": [], "backend": "ort-training"}
    proc = subprocess.run([sys.executable, "-m", "edge_client.bench", "--child", "torch"], input=json.dumps(request),
                          capture_output=True, text=True, check=False, cwd=ROOT)  # the bench reads requests on stdin
    payload = _last_json(proc.stdout)
    if proc.returncode != 0 or "step_seconds" not in payload:
        raise RuntimeError(payload.get("error") or proc.stderr.strip()[-500:])
    return percentile(payload["step_seconds"], 50) * 1000


def _retry(measure, arguments: tuple, notes: list[str], what: str):
    """measure(*arguments); after a failure (say, a virtualenv rebuilt under us on a shared machine) once more."""
    try:
        return measure(*arguments)
    except RuntimeError as exc:
        notes.append(f"{what} failed once and was repeated: {str(exc)[:300]}")
        print(f"{what} failed, repeating in 10 s: {exc}", file=sys.stderr, flush=True)
        time.sleep(10)
        return measure(*arguments)


def _default_cpu() -> int | None:
    return max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _tiers_for(model: str, args: argparse.Namespace) -> list[str]:
    return list(args.tiers_28 if _parse_model(model)["image_size"] == 28 else args.tiers_8)


def _host() -> dict:
    host = {"machine": platform.machine(), "cpus": str(os.cpu_count()), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                host["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return host


def _git() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False).stdout

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "edge_client", "models").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_backend_files": dirty}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated: mlp|cnn, 8|28, optional -bn")
    parser.add_argument("--tiers-8", default="abcde", help="tiers of the 8x8 models (default: abcde)")
    parser.add_argument("--tiers-28", default="ace", help="tiers of the 28x28 models (default: ace)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per series before the first block")
    parser.add_argument("--block", type=int, default=10, help="steps per series per block")
    parser.add_argument("--rounds", type=int, default=40, help="blocks per series (rotating order)")
    parser.add_argument("--memory-steps", type=int, default=20, help="steps in each fresh memory child")
    parser.add_argument("--fashion-samples", type=int, default=4096, help="Fashion-MNIST images kept (seeded subset)")
    parser.add_argument("--edge-python", default=str(ROOT / ".venv-edge/bin/python"),
                        help="interpreter of the device virtualenv (plain onnxruntime); '' skips it")
    parser.add_argument("--cpu", type=int, default=_default_cpu(),
                        help="CPU every timed child is pinned to, so all series share one core (default: the last "
                             "usable one; -1: no pinning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    if args.cpu is not None and args.cpu < 0:
        args.cpu = None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in models:
        _parse_model(model)

    started, load_start = time.perf_counter(), os.getloadavg()
    command = "python scripts/bench_backends.py " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
        if k not in ("out", "edge_python", "cpu"))
    notes = []
    runtimes = {sys.executable: run_child(sys.executable, "version", {}, "onnxruntime version")}
    series = {ORT: (sys.executable, ORT)}  # label -> (python, kind); portable labels name their onnxruntime
    pythons = [sys.executable]
    if args.edge_python:
        try:
            runtimes[args.edge_python] = run_child(args.edge_python, "version", {}, "device virtualenv")
            pythons.append(args.edge_python)
        except (OSError, RuntimeError) as exc:
            notes.append(f"the device virtualenv ({args.edge_python}) was skipped: {exc}")
    for python in pythons:
        version = runtimes[python]["onnxruntime"]
        series[f"{PORTABLE}@{version}"] = (python, PORTABLE)
        series[f"{GRAPH}@{version}"] = (python, GRAPH)
    torch = importlib.util.find_spec("torch") is not None
    if not torch:
        notes.append(f"PyTorch CPU skipped: torch is not importable in {sys.executable}.")
    with tempfile.TemporaryDirectory(prefix="tierfl-bench-backends-") as work:
        prepared = run_child(sys.executable, "prepare", {
            "work": work, "models": models, "tiers": {m: _tiers_for(m, args) for m in models},
            "batch_size": args.batch_size, "batches": max(args.warmup + args.block * args.rounds, args.memory_steps),
            "fashion_samples": args.fashion_samples, "seed": args.seed,
        }, "preparing data and artifacts")
        print(f"prepared in {time.perf_counter() - started:.1f} s; load average {load_start}", flush=True)
        rows = []
        for model in models:
            for tier_name, tier in prepared["models"][model].items():
                label = f"{model} {tier_name}"
                timing = _retry(time_tier, (tier, series, args), notes, f"{label}: timing")
                memory = {}
                for name, (python, kind) in series.items():
                    if kind != GRAPH:
                        request = {"tier_dir": tier["dir"], "data_dir": tier["data_dir"], "threads": args.threads,
                                   "lr": args.lr, "batch_size": args.batch_size, "kind": kind,
                                   "steps": args.memory_steps, "cpu": args.cpu}
                        what = f"{label}: memory of {name}"
                        memory[name] = _retry(run_child, (python, "memory", request, what), notes, what)
                torch_p50 = None
                if torch:
                    try:
                        torch_p50 = _torch(tier, args)
                    except RuntimeError as exc:
                        notes.append(f"{label}: PyTorch failed: {exc}")
                rows.append({"model": model, "tier": tier_name, "rate": tier["rate"], "params": tier["params"],
                             "data": tier["data"], "series": timing, "memory": memory, "torch_step_p50_ms": torch_p50})
                base = timing[ORT]["step"]["p50_ms"]
                print(f"{label}: " + ", ".join(f"{name} {t['step']['p50_ms']:.3f} ms ({t['step']['p50_ms'] / base:.2f}x)"
                                               for name, t in timing.items()), flush=True)
    report = {
        "command": command, "seconds": time.perf_counter() - started, "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()), "host": _host(), "git": _git(),
        "runtimes": {("training wheel" if p == sys.executable else "device virtualenv"): v for p, v in runtimes.items()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data_samples": prepared["data"], "series": {k: v[1] for k, v in series.items()}, "target": TARGET,
        "notes": notes, "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backends.json").write_text(json.dumps(_rounded(report), indent=1) + "\n")
    text = markdown(report)
    (args.out / "backends.md").write_text(text)
    print(text)


def _rounded(value):
    """The report with floats at 5 significant digits (the JSON stays readable; the noise is far larger)."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# -- report -----------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _ratio(row: dict, name: str) -> float:
    return row["series"][name]["step"]["p50_ms"] / row["series"][ORT]["step"]["p50_ms"]


def _ratio_cell(row: dict, name: str) -> str:
    blocks = row["series"][name]["block_ratio_vs_ort"]
    return f"{_ratio(row, name):.2f} ({blocks['p10']:.2f}-{blocks['p90']:.2f})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(report: dict) -> str:
    s, rows = report["settings"], report["rows"]
    portables = [n for n, kind in report["series"].items() if kind == PORTABLE]
    graphs = [n for n, kind in report["series"].items() if kind == GRAPH]
    trained = [ORT, *portables]
    ort_version = report["runtimes"]["training wheel"]["onnxruntime"]
    name = {ORT: "ORT training", **{n: n for n in portables + graphs}}
    has_torch = any(r["torch_step_p50_ms"] for r in rows)
    header = ["model", "tier", "params", "ORT training ms"]
    for n in portables:
        header += [f"{n} ms", f"{n} / ORT"]
    header += ["torch ms"] if has_torch else []
    header += ["peak MiB: " + " / ".join(name[n] for n in trained)]
    table = []
    for row in rows:
        series = row["series"]
        cells = [row["model"], f"{row['tier']} ({row['rate']:g})", f"{row['params']:,}"]
        for n in trained:
            cells.append(f"{_ms(series[n]['step']['p50_ms'])} ({_ms(series[n]['step']['p90_ms'])})")
            if n != ORT:
                cells.append(_ratio_cell(row, n))
        if has_torch:
            cells.append("-" if row["torch_step_p50_ms"] is None else _ms(row["torch_step_p50_ms"]))
        cells.append(" / ".join(f"{row['memory'][n]['peak_rss_kib'] / 1024:.0f}" for n in trained))
        table.append(cells)
    load = " ".join(f"{v:.2f}" for v in report["load_average_start"])
    dirty = report["git"]["uncommitted_backend_files"]
    lines = [
        f"# Training backends: the portable step graph vs onnxruntime-training {ort_version}",
        "",
        f"Reproduce: `{report['command']}` ({report['seconds'] / 60:.1f} min; load average at start {load}, "
        f"at end {' '.join(f'{v:.2f}' for v in report['load_average_end'])}, on a shared machine).",
        "",
        f"Host: {', '.join(f'{k} {v}' for k, v in report['host'].items())}; commit {report['git']['commit']}"
        + (f" (uncommitted changes in {', '.join(dirty)})" if dirty else "") + ".",
        "",
        f"Batch {s['batch_size']}, {s['threads']} thread(s), SGD lr {s['lr']}; every backend trains from the same "
        f"starting weights on the same batches (digits for 8x8, a seeded {s['fashion_samples']:,}-image subset of "
        "Fashion-MNIST for 28x28). A step is one `trainer.train(one batch, epochs=1)` call, timed by the trainer "
        f"around its step loop; {s['warmup']} warm-up steps per backend, then {s['rounds']} blocks of {s['block']} "
        "steps per backend, interleaved in rotating order between long-lived processes"
        + ("" if s["cpu"] is None else f" pinned to CPU {s['cpu']}") + ". Times are p50 (p90) in ms; "
        "a ratio is the p50 over ORT training's, with the 10th-90th percentile of the per-block ratios in brackets. "
        f"Peak memory is ru_maxrss of a fresh process per (model, tier, backend) that loads the data, opens the "
        f"tier and runs {s['memory_steps']} steps. `portable@{ort_version}` runs the step graph on the onnxruntime "
        "inside the onnxruntime-training wheel (in the ORT training worker)"
        + "".join(f"; `{n}` on plain onnxruntime in the device virtualenv (`tierfl[edge]`), as devices do"
                  for n in portables if n != f"{PORTABLE}@{ort_version}") + ".",
        "",
        *_table(header, table),
        "",
        f"Target: the portable step p50 at most {TARGET}x ORT training's on every tier.",
        "",
    ]
    for n in portables:
        missed = [f"{r['model']} {r['tier']} ({_ratio(r, n):.2f}x)" for r in rows if _ratio(r, n) > TARGET]
        met = [f"{r['model']} {r['tier']} ({_ratio(r, n):.2f}x)" for r in rows if _ratio(r, n) <= TARGET]
        lines.append(f"- {n}: {'met' if not missed else 'not met'} -- met on {len(met)} of {len(rows)} tiers"
                     + (f" ({', '.join(met)})" if met else "") + (f"; not met on {', '.join(missed)}" if missed else "")
                     + ".")
    lines += [
        "",
        "## Where the portable step's time goes",
        "",
        "`graph@<version>` is the tier's step_model.onnx alone, run through the public onnxruntime API with every "
        "input and output bound once (two IO bindings that swap the parameter buffers; batch and labels copied "
        "into bound OrtValues), interleaved with the rest. `trainer overhead` is the portable step minus the "
        "graph alone: per-step binding, output allocation, fetching and the training loop's bookkeeping "
        "(ORT training's step pays the same bookkeeping).",
        "",
    ]
    header = ["model", "tier", "ORT training ms"]
    for p, g in zip(portables, graphs, strict=True):
        header += [f"{g} ms", f"{g} / ORT", f"{p} trainer overhead ms"]
    table = []
    for row in rows:
        series = row["series"]
        cells = [row["model"], row["tier"], _ms(series[ORT]["step"]["p50_ms"])]
        for p, g in zip(portables, graphs, strict=True):
            cells += [_ms(series[g]["step"]["p50_ms"]), f"{_ratio(row, g):.2f}",
                      f"{series[p]['step']['p50_ms'] - series[g]['step']['p50_ms']:.3f}"]
        table.append(cells)
    lines += _table(header, table)
    lines.append("")
    for p, g in zip(portables, graphs, strict=True):
        alone = sum(_ratio(r, g) <= TARGET for r in rows)
        extra = [r["series"][p]["step"]["p50_ms"] - r["series"][g]["step"]["p50_ms"] for r in rows]
        lines.append(f"- {g}: the step graph alone is within {TARGET}x of ORT training on {alone} of {len(rows)} tiers "
                     f"(median ratio {percentile([_ratio(r, g) for r in rows], 50):.2f}); {p} adds "
                     f"{min(extra):.3f} to {max(extra):.3f} ms per step to it (median {percentile(extra, 50):.3f}).")
    overhead = {n: [r["series"][n]["call"]["p50_ms"] - r["series"][n]["step"]["p50_ms"] for r in rows] for n in trained}
    first = {n: max(r["series"][n]["loss_diff_first_block"] for r in rows) for n in trained + graphs if n != ORT}
    every = {n: max(r["series"][n]["loss_diff_max"] for r in rows) for n in trained + graphs if n != ORT}
    lines += [
        "",
        "Per-call setup (p50 of the whole `train` call minus p50 of its step loop, ms): "
        + "; ".join(f"{name[n]} {min(v):.3f} to {max(v):.3f}" for n, v in overhead.items()) + ".",
        "",
        f"Same work: the largest per-step loss difference from ORT training over the first {s['block']} timed steps "
        "(after the warm-up) of every tier is " + ", ".join(f"{v:.1e} ({n})" for n, v in first.items())
        + "; over all steps " + ", ".join(f"{v:.1e}" for v in every.values())
        + " (float rounding differences grow over hundreds of SGD steps on the 28x28 CNNs).",
        "",
        "Memory (MiB), baseline after the imports and data / peak:",
        "",
        *_table(["model", "tier", *(name[n] for n in trained)],
                [[r["model"], r["tier"], *(f"{r['memory'][n]['baseline_rss_kib'] / 1024:.0f} / "
                                          f"{r['memory'][n]['peak_rss_kib'] / 1024:.0f}" for n in trained)]
                 for r in rows]),
    ]
    if report["notes"]:
        lines += ["", *(f"Note: {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"] and len(sys.argv) == 4:
        sys.exit(child_main(sys.argv[2], sys.argv[3]))
    main()
