"""Helpers of scripts/aarch64_check.sh (the emulated aarch64 device check).

Subcommands, by where they run:

  host (the project's .venv):
    make-model OUT.onnx          a small MLP (64-256-256-10, Gemm+Relu) for the inference smoke test;
                                 written with onnx on the host because onnx is not on the device
    report LOGDIR STATE_DIR OUT  benchmarks/aarch64.md from the run's timings, logs and the
                                 aggregator's state.json

  device (the emulated root's venv, under qemu-aarch64-static; stdlib + the edge wheels only):
    smoke MODEL.onnx             import times, InferenceSession creation, batch-32 inference
    imports                      import each project module the device path needs; say which fail
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

# Modules a device running `tierfl client --backend portable` imports, roughly leaves first.
DEVICE_MODULES = (
    "tierfl.cli",
    "protocol.atomic_file",
    "protocol.mqtt.url",
    "protocol.topics",
    "protocol.messages",
    "protocol.codecs",
    "protocol.frame",
    "protocol.chunking",
    "protocol.mqtt.link",
    "models.spec",
    "models.manifest",
    "models.tiers",
    "models.ort_training",
    "models.data",
    "edge_client.cache",
    "edge_client.compression",
    "edge_client.trainer",
    "edge_client.portable",
    "edge_client.bn_statistics",
    "edge_client.backends",
    "edge_client.agent",
    "edge_client.cli",
    "edge_client.fleet_options",
    "edge_client.bench",
    "edge_client.bench_fetch",
)

# Host-side modules (export, model zoo) that need onnx: not on the device path, probed for the record.
HOST_SIDE_MODULES = ("models.zoo", "models.export")


def make_model(out: str) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sizes = [64, 256, 256, 10]
    inits, nodes, prev = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = np.zeros(fan_out, np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out_name = "logits" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}" if out_name != "logits" else out_name]))
        if out_name != "logits":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out_name]))
        prev = out_name
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # older runtimes refuse IR 11+
    onnx.checker.check_model(model)
    onnx.save(model, out)
    print(f"wrote {out} ({Path(out).stat().st_size} bytes)")


def smoke(model: str) -> None:
    result: dict[str, object] = {"machine": platform.machine(), "python": platform.python_version()}
    t0 = time.perf_counter()
    import numpy as np
    result["import_numpy_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    import onnxruntime as ort
    result["import_onnxruntime_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    import paho.mqtt.client  # noqa: F401
    import pydantic
    result["import_paho_pydantic_s"] = round(time.perf_counter() - t0, 3)
    result["versions"] = {"numpy": np.__version__, "onnxruntime": ort.__version__, "pydantic": pydantic.__version__}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    t0 = time.perf_counter()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    result["session_create_s"] = round(time.perf_counter() - t0, 3)
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"x": x})
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        (logits,) = session.run(None, {"x": x})
        times.append((time.perf_counter() - t0) * 1e3)
    assert logits.shape == (32, 10) and np.isfinite(logits).all()
    result["infer_batch32_ms_median"] = round(statistics.median(times), 3)
    result["infer_batch32_ms_p95"] = round(sorted(times)[int(0.95 * len(times)) - 1], 3)
    print("SMOKE " + json.dumps(result))


def imports() -> int:
    import importlib

    def probe(name: str, tag: str) -> bool:
        t0 = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failure, whatever it is
            chain = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"
                     for f in traceback.extract_tb(exc.__traceback__)
                     if "site-packages" in f.filename and "importlib" not in f.filename]
            print(f"{tag} FAIL {name}: {type(exc).__name__}: {exc}" + (f"  via {' -> '.join(chain)}" if chain else ""))
            return False
        print(f"{tag} ok   {name} ({time.perf_counter() - t0:.2f} s)")
        return True

    ok = sum(probe(name, "IMPORT") for name in DEVICE_MODULES)
    print(f"IMPORTS {ok}/{len(DEVICE_MODULES)} ok")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime", "sklearn", "torch", "amqtt"))
    print("third-party packages loaded by the device path: "
          + ", ".join(sorted({m.split(".")[0] for m in loaded})) if loaded else "none of onnx/sklearn/torch/amqtt")
    for name in HOST_SIDE_MODULES:
        probe(name, "HOST-SIDE")
    return 0  # a report, not a gate: the shell script decides what a failure means


def _timings(path: Path) -> dict[str, str]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key:
                out[key.strip()] = value.strip()
    return out


def report(logdir: str, state_dir: str, out: str) -> None:
    logs = Path(logdir)
    t = _timings(logs / "timings.txt")
    smoke_line = next((line for line in (logs / "smoke.log").read_text().splitlines() if line.startswith("SMOKE ")), None) \
        if (logs / "smoke.log").is_file() else None
    s = json.loads(smoke_line[len("SMOKE "):]) if smoke_line else {}
    host_line = next((line for line in (logs / "smoke.log").read_text().splitlines() if line.startswith("HOST ")), None) \
        if (logs / "smoke.log").is_file() else None
    h = json.loads(host_line[len("HOST "):]) if host_line else {}
    imports_text = (logs / "imports.log").read_text() if (logs / "imports.log").is_file() else ""
    client_log = (logs / "client.log").read_text() if (logs / "client.log").is_file() else ""
    aggregator_log = (logs / "aggregator.log").read_text() if (logs / "aggregator.log").is_file() else ""
    bench = json.loads((logs / "bench.json").read_text()) if (logs / "bench.json").is_file() else None
    bench_md = (logs / "bench.md").read_text() if (logs / "bench.md").is_file() else ""
    announced = re.search(r"announcing the speed measured by \S+ on \S+: (.*)", client_log)
    selected = re.findall(r"round (\d+): \d+ devices selected: pi-emulated \(tier (\w)\)", aggregator_log)
    rounds = re.findall(r"round (\d+): (\d+) steps in ([\d.]+) s, loss ([\d.]+), acc ([\d.]+); sent (\d+) bytes", client_log)
    state_path = Path(state_dir) / "state.json"
    history = json.loads(state_path.read_text()).get("history", []) if state_path.is_file() else []

    lines = [
        "# aarch64 check (emulated)",
        "",
        "`scripts/aarch64_check.sh`: an arm64 Debian bookworm root built from Debian's packages",
        "(`debootstrap --foreign` + `dpkg-deb -x`, no binfmt_misc), run through `qemu-aarch64-static`",
        "explicitly; the device's venv gets aarch64 wheels downloaded on the host; inside it, the README's",
        "device path: `tierfl bench --artifacts` on the aggregator's export, then `tierfl client --bench",
        "bench.json` training against that aggregator on this machine's loopback Mosquitto.",
        "",
        "**Emulated speed says nothing about a real Raspberry Pi** (qemu-user translates every",
        "instruction on an x86_64 host with 2 cores); the numbers show that it works and where time goes.",
        "",
        f"- date: {t.get('date', '?')}; commit: `{t.get('commit', '?')}`; host: {t.get('host', '?')}",
        f"- emulator: {t.get('qemu', '?')}; guest: {s.get('machine', '?')} Python {s.get('python', '?')}",
        f"- device wheels: {t.get('device_wheels', '?')}",
        "",
        "## Setup (seconds, this run; steps already done are skipped and show as 0)",
        "",
        "| step | s |",
        "|---|---|",
    ]
    for key, label in (("root_s", "debootstrap --foreign + dpkg-deb -x (arm64 root)"),
                       ("wheel_s", "build the tierfl wheel of the commit (host)"),
                       ("download_s", "pip download of aarch64 wheels (host)"),
                       ("venv_s", "venv --without-pip (under qemu)"),
                       ("install_s", "pip install tierfl[edge,signing] from those wheels (under qemu)"),
                       ("smoke_s", "inference smoke test (under qemu)"),
                       ("imports_s", "import probe of the device modules (under qemu)"),
                       ("bench_s", "tierfl bench --artifacts, tiers a and c (under qemu)"),
                       ("run_s", "federated run: client start to the last round")):
        if key in t:
            lines.append(f"| {label} | {t[key]} |")
    if s:
        lines += [
            "",
            "## Inference smoke test under qemu (MLP 64-256-256-10, 1 thread)",
            "",
            f"- versions: {s.get('versions')}",
            f"- import numpy {s.get('import_numpy_s')} s, onnxruntime {s.get('import_onnxruntime_s')} s, "
            f"paho-mqtt + pydantic {s.get('import_paho_pydantic_s')} s",
            f"- InferenceSession creation {s.get('session_create_s')} s",
            f"- batch 32: median {s.get('infer_batch32_ms_median')} ms, p95 {s.get('infer_batch32_ms_p95')} ms",
        ]
        if h:
            lines.append(f"- for scale, the same test natively on the x86_64 host (onnxruntime {h['versions']['onnxruntime']}): "
                         f"median {h.get('infer_batch32_ms_median')} ms, session {h.get('session_create_s')} s")
    if imports_text:
        summary = next((line for line in imports_text.splitlines() if line.startswith("IMPORTS ")), "")
        fails = [line for line in imports_text.splitlines() if line.startswith("IMPORT FAIL")]
        lines += ["", "## Project imports on the device", "", f"{summary[len('IMPORTS '):]} device modules import."]
        lines += [f"- {line[len('IMPORT FAIL '):]}" for line in fails]
        host_side = [line for line in imports_text.splitlines() if line.startswith("HOST-SIDE")]
        if host_side:
            lines += ["", "Host-side modules (export, model zoo; not needed on a device):"]
            lines += [f"- {line[len('HOST-SIDE '):]}" for line in host_side]
    lines += ["", "## tierfl bench on the device (emulated)", ""]
    if t.get("bench_cmd"):
        lines += [f"`{t['bench_cmd']}`", "", f"Outcome: {t.get('bench', '?')}"]
    else:
        lines.append(f"Not run: {t.get('run_reason', '?')}")
    if bench:
        rows = [f"| {r['tier']} | {r['backend']} | {r['params']:,} | {r['step_p50_ms']:.1f} | {r['step_p95_ms']:.1f} | "
                f"{r['samples_per_second']:,.0f} | "
                + ("-" if r["epochs_seconds"] is None else f"{r['epochs_seconds']:.2f}") + " | "
                + ("-" if r["peak_rss_kib"] is None else f"{r['peak_rss_kib'] / 1024:.1f}") + " |"
                for r in bench["tiers"]]
        lines += ["", f"{bench['model']['arch']} on the device's copy of digits ({bench['samples']:,} samples), batch "
                      f"{bench['settings']['batch_size']}, {bench['settings']['steps']} timed steps, "
                      f"{bench['settings']['threads']} thread; "
                      + ", ".join(f"{k} {v}" for k, v in bench["host"].items()) + ":", "",
                  f"| tier | backend | params | step p50 ms | step p95 ms | samples/s | {bench['settings']['epochs']} "
                  "epoch(s) s | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|", *rows]
    if bench_md:
        update_table = bench_md.split("Bytes of one update frame", 1)[-1].strip().splitlines()[2:]
        if update_table:
            lines += ["", "Bytes of one update frame per codec:", "", *update_table]
    if announced:
        lines += ["", f"`tierfl client --bench` announced: {announced.group(1)}"]
    if selected:
        lines += ["", "The aggregator (`--tier-policy auto`) gave the device "
                  + ", ".join(f"tier {tier} in round {r}" for r, tier in selected)
                  + " (a device with no announced speed starts on the narrowest tier, c)."]
    lines += ["", "## Federated run", ""]
    if t.get("run") == "skipped":
        lines.append(f"Not run: {t.get('run_reason', '?')}")
    else:
        lines.append(f"Aggregator: `{t.get('aggregator_cmd', '?')}`")
        lines.append("")
        lines.append(f"Device (emulated aarch64): `{t.get('client_cmd', '?')}`")
        lines.append("")
        lines.append(f"Outcome: {t.get('run', '?')}")
        if t.get("run_error"):
            lines += ["", f"Device error: `{t['run_error']}`"]
        if rounds:
            lines += ["", "| round | device steps | device train s | s/step | device loss | device acc | update bytes |",
                      "|---|---|---|---|---|---|---|"]
            for r, steps, secs, loss, acc, sent in rounds:
                per = float(secs) / max(int(steps), 1)
                lines.append(f"| {r} | {steps} | {float(secs):.2f} | {per:.3f} | {loss} | {acc} | {sent} |")
        if history:
            lines += ["", "| round | aggregator round s | global accuracy (held-out digits) |", "|---|---|---|"]
            for h in history:
                acc = h.get("accuracy")
                lines.append(f"| {h['round']} | {h.get('seconds', 0):.1f} | {acc:.4f} |" if acc is not None
                             else f"| {h['round']} | {h.get('seconds', 0):.1f} | n/a |")
    lines += [
        "",
        "## Run it",
        "",
        "As root on a Debian/Ubuntu x86_64 host with the repo's `.venv` (`make venv`) and Mosquitto on",
        "127.0.0.1:1883 (the script starts one if none listens): `scripts/aarch64_check.sh [ROOT]`",
        "(ROOT default /work/aarch64-root, outside the repo; ROUNDS=3; SKIP_RUN=1 stops after the",
        "install and smoke test). It installs `qemu-user-static` and `debootstrap` if missing, skips",
        "whatever is already done, and rewrites this file and `benchmarks/aarch64.log`.",
        "",
        "## Notes",
        "",
        "- The device runs committed HEAD: the script builds the wheel from `git archive HEAD`, and the",
        "  host aggregator runs the same tree (PYTHONPATH), not the working tree.",
        "- Wheels: `pip download --platform manylinux_2_28_aarch64` alone silently resolves pydantic",
        "  1.x, because pydantic-core's aarch64 wheels are tagged manylinux_2_17 (manylinux2014); the",
        "  script passes every tag glibc 2.36 accepts (manylinux2014, manylinux_2_17 ... 2_36).",
        "- pip on the device is Debian's own (python3-pip-whl) run as a zipapp, offline (`--no-index",
        "  --find-links`), in a clean environment (`env -i`): no host pip settings leak in.",
        "- /proc and /sys are not mounted in the root: with both mounted, onnxruntime's cpuinfo reads",
        "  the host's x86 /proc/cpuinfo and the process segfaults under qemu 7.2. Unmounted, it only",
        "  warns (the warnings are filtered from the log).",
        "- The host is shared with other jobs; emulated timings vary by about 1.5x between runs.",
        "- qemu-user without binfmt_misc cannot exec an aarch64 binary, and bench measures each tier in",
        "  a child Python process: the device's Python runs with argv[0] (so sys.executable) set to",
        "  `python-qemu`, a script whose `#!` interpreter is qemu itself, which the kernel runs natively.",
        "",
        "Full output: `benchmarks/aarch64.log`.",
        "",
    ]
    Path(out).write_text("\n".join(lines))
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "make-model":
        make_model(*rest)
    elif command == "smoke":
        smoke(*rest)
    elif command == "imports":
        return imports()
    elif command == "report":
        report(*rest)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
