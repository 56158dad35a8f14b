"""Aggregator speed and memory: decode-and-accumulate of 1M-parameter updates per codec.

Compared in the same run with the physical limit: numpy streaming the same bytes (a read of
the encoded payload, 8 bytes at a time, plus a read-modify-write of the float32 accumulator).
An earlier version read the payload as uint8 into a uint64 sum, which is compute-bound and made
the limit look 3-4x lower than it is. Peak memory while
aggregating 10, 100 and 1000 updates must stay flat (streaming, O(model)). Writes
benchmarks/aggregate.{json,md,png}.

    .venv/bin/python scripts/bench_aggregate.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from aggregator.strategy import ClientUpdate, ElementwiseMean
from protocol.frame import decode_frame, encode_frame
from protocol.messages import Update, new_id

CODECS = ["float32", "float16", "int8", "int8-row", "int4", "topk:0.1", "topk:0.1+int8"]
SHAPES = {"fc1.weight": (1000, 784), "fc1.bias": (1000,), "fc2.weight": (216, 1000), "fc2.bias": (216,)}  # ~1.0M


def _frame(codec: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {n: (0.01 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
    body = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=100, steps=1,
                  train_loss=0.0, train_accuracy=0.0, train_seconds=0.0)
    return encode_frame("bench", "d", body, tensors, codec)


def _best_of(repeats: int, work) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def bandwidth_seconds(payload_bytes: int, params: int, repeats: int) -> float:
    """Time numpy needs to read `payload_bytes` and read-modify-write a float32 accumulator of `params`."""
    payload = np.ones(-(-payload_bytes // 8), np.uint64)  # the frame's bytes, read 8 at a time
    accumulator = np.zeros(params, np.float32)
    source = np.ones(params, np.float32)

    def stream() -> None:
        payload.sum()  # reads every byte once, at memory speed
        np.add(accumulator, source, out=accumulator)

    return _best_of(repeats, stream)


def throughput(codec: str, repeats: int) -> dict:
    """Updates per second, decode plus accumulate, and the same run's memory-bandwidth bound."""
    frame = _frame(codec, 0)
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    global_weights = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    accumulator = ElementwiseMean(global_weights)

    def one_update() -> None:
        accumulator.add(ClientUpdate("d", "a", 100, decode_frame(frame).tensors))

    seconds = _best_of(repeats, one_update)
    hashing = _best_of(repeats, lambda: hashlib.sha256(frame).digest())  # the frame's integrity check, inside decode_frame
    limit = bandwidth_seconds(len(frame), params, repeats)
    return {"codec": codec, "frame_bytes": len(frame), "updates_per_s": 1 / seconds, "sha256_share": hashing / seconds,
            "bandwidth_bound_updates_per_s": 1 / limit, "fraction_of_bandwidth": limit / seconds,
            "fraction_of_bandwidth_without_sha256": limit / (seconds - hashing)}


def peak_memory(count: int, codec: str = "int8") -> int:
    """Peak traced bytes while aggregating `count` updates that arrive one at a time."""
    frames = [_frame(codec, seed) for seed in range(4)]  # reuse a few payloads: arrival is what matters
    tracemalloc.start()
    accumulator = ElementwiseMean({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    for i in range(count):
        accumulator.add(ClientUpdate("d", "a", 100, decode_frame(frames[i % 4]).tensors))
    accumulator.result()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args()
    rows = [throughput(codec, args.repeats) for codec in args.codecs.split(",")]
    memory = {count: peak_memory(count) for count in (10, 100, 1000)}
    write_report(args, rows, memory)


def write_report(args: argparse.Namespace, rows: list[dict], memory: dict[int, int]) -> None:
    """benchmarks/aggregate.json, .md and .png."""
    args.out.mkdir(parents=True, exist_ok=True)
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    (args.out / "aggregate.json").write_text(json.dumps(
        {"params": params, "command": "python scripts/bench_aggregate.py", "throughput": rows,
         "peak_bytes_by_updates": memory}, indent=1))
    lines = [
        f"# Aggregation: decode + accumulate of {params:,}-parameter updates (one core)", "",
        "Reproduce: `python scripts/bench_aggregate.py`", "",
        "Each update is a full `decode_frame` (header validation, payload sha256, tensor decode) plus the",
        "accumulator's weighted add. The last column leaves out the sha256, timed on its own in the same run.",
        "",
        "| codec | frame bytes | updates/s | memory-bandwidth bound (same run) | fraction of bound "
        "| time in sha256 | fraction of bound without sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['frame_bytes']:,} | {r['updates_per_s']:.1f} | "
                     f"{r['bandwidth_bound_updates_per_s']:.1f} | {100 * r['fraction_of_bandwidth']:.0f}% "
                     f"| {100 * r['sha256_share']:.0f}% | {100 * r['fraction_of_bandwidth_without_sha256']:.0f}% |")
    lines += ["", "| updates aggregated (int8) | peak traced memory |", "|---|---|"]
    lines += [f"| {count} | {peak / 1e6:.1f} MB |" for count, peak in memory.items()]
    (args.out / "aggregate.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["codec"] for r in rows]
    ax.bar(names, [r["updates_per_s"] for r in rows], label="decode + accumulate")
    ax.plot(names, [r["bandwidth_bound_updates_per_s"] for r in rows], "k_", markersize=25, label="bandwidth bound")
    ax.set_ylabel("updates per second")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(args.out / "aggregate.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
