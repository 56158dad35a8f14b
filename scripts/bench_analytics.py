"""Federated analytics on a live fleet: are the answers the truth, and does DP noise stay within its stated bound?

Fashion-MNIST (Debian's dataset-fashion-mnist), Dirichlet(0.1) label skew over 20 devices, each
keeping 20% of its shard as its test split (`tierfl client --test-fraction 0.2`). Real processes
over a Mosquitto this script starts on a free port: one `tierfl aggregator` (mlp28, status page on,
`--min-clients 21` so that no training round starts and the timings are the queries' own) and 20
`tierfl client`. Every query goes the operator's way: `tierfl analytics`' own `ask` posts it to the
status server with the token from the state directory and polls for the result.

Checked against the truth computed here from the shards themselves:
- exact (no noise): label histogram, sample count, per-channel moments, the quantile sketch's
  histogram (and its p10/p50/p90 of pixel values against numpy's exact quantiles: the stated
  error is one bin width), the label histogram summed by secure aggregation;
- with noise: `--trials` label histograms for each noise multiplier z: the largest error over the
  10 labels against the stated bound (95 % for all elements at once), the mean absolute error,
  each query's epsilon (delta 1e-5, one sample the unit) and the books' total afterwards.

Writes benchmarks/analytics.{json,md}.

    nice -n 19 .venv/bin/python scripts/bench_analytics.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_hostile import _start_mosquitto, _tierfl, stop  # noqa: E402 (a sibling script)

from aggregator.analytics import TOKEN_FILE, AnalyticsRequest  # noqa: E402
from aggregator.analytics_cli import ask  # noqa: E402
from models.analytics import QuerySpec, true_answer  # noqa: E402
from models.data import Dataset, dirichlet_partition, load_fashion_mnist, save_npz, train_test_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "analytics"
SHAPE, CLASSES = (1, 28, 28), 10


def shards(folder: Path, devices: int, alpha: float, seed: int) -> tuple[list[Path], list[Dataset], list[Dataset]]:
    """The devices' .npz shards, and each device's train and test split as `tierfl client` will make them."""
    data = load_fashion_mnist(split="train")
    paths, trains, tests = [], [], []
    for i, part in enumerate(dirichlet_partition(data.y, devices, alpha, seed)):
        shard = data.subset(part)
        paths.append(folder / f"d{i:02d}.npz")
        save_npz(paths[-1], shard)
        train, test = train_test_split(shard, 0.2, seed=0)
        trains.append(train)
        tests.append(test)
    return paths, trains, tests


def timed(url: str, token: str, request: AnalyticsRequest) -> tuple[dict, float]:
    """One query the operator's way, and its wall time."""
    started = time.perf_counter()
    result = ask(url, token, request, wait_s=request.timeout_s + 60)
    if result["status"] != "answered":
        raise SystemExit(f"query refused: {result.get('reason')}")
    return result, time.perf_counter() - started


def exact_checks(url: str, token: str, trains: list[Dataset], tests: list[Dataset], bins: int) -> dict:
    """The exact queries against the truth."""
    spec = lambda computation, **extra: QuerySpec(computation, SHAPE, CLASSES, **extra)  # noqa: E731
    out: dict[str, dict] = {}
    truth = true_answer(spec("label_histogram"), trains)["counts"]
    result, seconds = timed(url, token, AnalyticsRequest(computation="label_histogram"))
    out["label_histogram"] = {"equal": result["answer"]["counts"] == truth.tolist(), "seconds": seconds,
                              "counts": result["answer"]["counts"], "truth": truth.tolist(),
                              "answered": result["answered"], "diagnostics": result.get("diagnostics")}
    result, seconds = timed(url, token, AnalyticsRequest(computation="sample_count"))
    out["sample_count"] = {"equal": result["answer"]["count"] == sum(len(t) for t in trains), "seconds": seconds}
    result, seconds = timed(url, token, AnalyticsRequest(computation="feature_moments"))
    pixels = np.concatenate([np.clip(t.x, 0, 1).ravel() for t in trains]).astype(np.float64)
    out["feature_moments"] = {"seconds": seconds, "mean": result["answer"]["mean"][0], "truth_mean": pixels.mean(),
                              "variance": result["answer"]["variance"][0], "truth_variance": pixels.var()}
    result, seconds = timed(url, token, AnalyticsRequest(computation="quantile_sketch", bins=bins))
    sketch = true_answer(spec("quantile_sketch", bins=bins), trains)["histogram"]
    errors = {q: abs(result["answer"]["quantiles"][f"p{q}"][0] - float(np.quantile(pixels, q / 100)))
              for q in (10, 50, 90)}
    out["quantile_sketch"] = {"equal": result["answer"]["histogram"] == sketch.tolist(), "seconds": seconds,
                              "bins": bins, "stated_error": result["answer"]["quantile_error"],
                              "quantile_errors": errors, "within": all(e <= 1 / bins for e in errors.values())}
    result, seconds = timed(url, token, AnalyticsRequest(computation="model_metrics", split="test"))
    out["model_metrics"] = {"seconds": seconds, "count": result["answer"]["count"],
                            "test_samples": sum(len(t) for t in tests), "accuracy": result["answer"]["accuracy"],
                            "loss": result["answer"]["loss"]}
    result, seconds = timed(url, token, AnalyticsRequest(computation="label_histogram", secure=True, timeout_s=60))
    out["label_histogram_secure"] = {"equal": result["answer"]["counts"] == truth.tolist(), "seconds": seconds,
                                     "answered": result["answered"]}
    return out


def noise_checks(url: str, token: str, trains: list[Dataset], noises: list[float], trials: int) -> list[dict]:
    """`trials` noisy label histograms per noise multiplier, against the truth and the stated bound."""
    truth = true_answer(QuerySpec("label_histogram", SHAPE, CLASSES), trains)["counts"]
    rows = []
    for z in noises:
        errors, bound, epsilon, total, seconds = [], 0.0, 0.0, 0.0, []
        for _ in range(trials):
            result, took = timed(url, token, AnalyticsRequest(computation="label_histogram", dp_noise=z))
            errors.append(np.abs(np.array(result["answer"]["counts"]) - truth))
            bound, epsilon, total = (result["privacy"]["error_bound"], result["privacy"]["epsilon"],
                                     result["privacy"]["epsilon_total"])
            seconds.append(took)
        largest = np.array([e.max() for e in errors])
        rows.append({"noise_multiplier": z, "std": z, "trials": trials, "error_bound": bound,
                     "within_bound": float((largest <= bound).mean()), "largest_error": float(largest.max()),
                     "mean_abs_error": float(np.mean(errors)), "epsilon_per_query": epsilon,
                     "epsilon_total_after": total, "smallest_count": float(truth.min()),
                     "seconds_per_query": float(np.mean(seconds))})
        print(f"z {z}: {rows[-1]}", flush=True)
    return rows


def run(args: argparse.Namespace, folder: Path) -> dict:
    """The fleet up, every check, the fleet down."""
    paths, trains, tests = shards(folder, args.devices, args.alpha, args.seed)
    broker, url = _start_mosquitto(folder)
    state = folder / "state"
    log = folder / "aggregator.log"
    processes = [_tierfl(["aggregator", "--broker", url, "--fleet", "bench", "--state-dir", str(state), "--arch", "mlp",
                          "--image-size", "28", "--min-clients", str(args.devices + 1), "--rounds", "1",
                          "--status-port", "0"], log)]
    try:
        served = re.compile(r"status page at (http://127\.0\.0\.1:\d+/)")
        until = time.time() + 300
        while not (found := served.search(log.read_text())) and time.time() < until:
            time.sleep(0.5)
        if found is None:
            raise SystemExit("the aggregator served no status page within 300 s; its log ends:\n"
                             + log.read_text()[-2000:])
        status_url = found.group(1)
        processes += [_tierfl(["client", "--broker", url, "--fleet", "bench", "--device-id", f"d{i:02d}", "--data",
                               str(path), "--test-fraction", "0.2", "--cache-dir", str(folder / f"d{i:02d}")],
                              folder / f"d{i:02d}.log") for i, path in enumerate(paths)]
        while (joined := log.read_text().count(" joined: ")) < args.devices and time.time() < until + 300:
            time.sleep(0.5)
        if joined < args.devices:
            raise SystemExit(f"only {joined} of {args.devices} devices joined in time; the aggregator's log ends:\n"
                             f"{log.read_text()[-2000:]}")
        token = (state / TOKEN_FILE).read_text().strip()
        exact = exact_checks(status_url, token, trains, tests, args.bins)
        print(json.dumps({k: {n: v for n, v in d.items() if n not in ("counts", "truth", "diagnostics")}
                          for k, d in exact.items()}), flush=True)
        noisy = noise_checks(status_url, token, trains, args.noise, args.trials)
    finally:
        stop(processes)
        stop([broker])
    return {"devices": args.devices, "alpha": args.alpha, "seed": args.seed, "train_samples": sum(map(len, trains)),
            "exact": exact, "noise": noisy}


def markdown(results: dict, command: str) -> str:
    """The benchmark's page."""
    exact = results["exact"]
    label = exact["label_histogram"]
    skew = label["diagnostics"] or {}
    lines = [
        "# Federated analytics: answers against the truth",
        "",
        f"Fashion-MNIST train split, {results['devices']} devices, Dirichlet({results['alpha']}) label skew "
        f"(seed {results['seed']}), each device's train split ({results['train_samples']} samples in all) as "
        "`tierfl client --test-fraction 0.2` makes it. Real processes over Mosquitto: one aggregator "
        "(mlp28, `--status-port`), 20 `tierfl client`; every query posted the operator's way (`tierfl analytics`' "
        "`ask`: POST /analytics with the token, poll for the result). No training round runs (`--min-clients 21`).",
        "",
        "Command (under `nice -n 19` on the shared 2-core machine):",
        "",
        f"    {command}",
        "",
        "## Exact answers (no noise)",
        "",
        "| query | answer = truth from the shards | wall time |",
        "|---|---|---|",
        f"| label histogram ({label['answered']} devices) | {'yes' if label['equal'] else 'NO'} | {label['seconds']:.2f} s |",
        f"| sample count | {'yes' if exact['sample_count']['equal'] else 'NO'} | {exact['sample_count']['seconds']:.2f} s |",
        f"| quantile sketch histogram ({exact['quantile_sketch']['bins']} bins) | "
        f"{'yes' if exact['quantile_sketch']['equal'] else 'NO'} | {exact['quantile_sketch']['seconds']:.2f} s |",
        f"| label histogram, secure aggregation | {'yes' if exact['label_histogram_secure']['equal'] else 'NO'} | "
        f"{exact['label_histogram_secure']['seconds']:.2f} s |",
        "",
        f"Label counts: {label['counts']} (truth {label['truth']}).",
        "",
        f"Pixel mean {exact['feature_moments']['mean']:.6f} (numpy {exact['feature_moments']['truth_mean']:.6f}), "
        f"variance {exact['feature_moments']['variance']:.6f} (numpy {exact['feature_moments']['truth_variance']:.6f}).",
        "",
        "Quantiles read off the sketch against numpy's exact quantiles of all pixel values (stated error: one bin, "
        f"{exact['quantile_sketch']['stated_error']:.4f}): "
        + ", ".join(f"p{q} off by {e:.4f}" for q, e in exact["quantile_sketch"]["quantile_errors"].items())
        + f" ({'within' if exact['quantile_sketch']['within'] else 'NOT within'} the bound).",
        "",
        f"The global model (version 0, untrained) on the devices' test splits: {exact['model_metrics']['count']:.0f} "
        f"samples of {exact['model_metrics']['test_samples']}, accuracy {exact['model_metrics']['accuracy']:.4f}, "
        f"loss {exact['model_metrics']['loss']:.4f}.",
        "",
        "## Label histogram with differential privacy",
        "",
        "Gaussian noise of std z (the sensitivity of a label histogram is 1: one sample) on each of the 10 "
        "counts; the stated bound holds for all 10 at once with 95 % probability. Epsilon at delta 1e-5 per "
        "query, and the analytics books' total after the run (dp-accounting's RDP accountant, every query of "
        "the run composed).",
        "",
        "| z | trials | stated bound | trials within it | largest error | mean abs error | smallest true count "
        "| epsilon per query | books' total after | s per query |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["noise"]:
        lines.append(f"| {row['noise_multiplier']:g} | {row['trials']} | {row['error_bound']:.2f} | "
                     f"{row['within_bound']:.1%} | {row['largest_error']:.2f} | {row['mean_abs_error']:.2f} | "
                     f"{row['smallest_count']:.0f} | {row['epsilon_per_query']:.3f} | {row['epsilon_total_after']:.2f} | "
                     f"{row['seconds_per_query']:.2f} |")
    trials = sum(row["trials"] for row in results["noise"])
    within = sum(round(row["within_bound"] * row["trials"]) for row in results["noise"])
    lines += ["", f"Over all {trials} noisy answers, {within} ({within / trials:.1%}) stayed within the bound stated at "
              f"95 % (all 10 labels at once); the {trials - within} misses ({(trials - within) / trials:.1%}) are within the "
              "5 % the bound allows, the largest of them "
              f"{max(row['largest_error'] / row['error_bound'] for row in results['noise']):.2f} times the bound."]
    if skew:
        lines += ["", "## Fleet diagnostics from the exact label histogram", "",
                  "Per device (sorted by size, no ids): samples, and the total variation distance of its label mix "
                  "from the fleet's (0: the fleet's mix, 1: disjoint labels).", "",
                  "samples: " + ", ".join(f"{s:.0f}" for s in skew["samples_per_device"]), "",
                  "label distance: " + ", ".join(f"{d:.2f}" for d in skew["label_distance"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write benchmarks/analytics.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bins", type=int, default=64)
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-analytics-") as tmp:
        results = run(args, Path(tmp))
    command = "nice -n 19 .venv/bin/python scripts/bench_analytics.py" + (f" {' '.join(argv)}" if argv else "")
    results["command"] = command
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, command))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main(sys.argv[1:])
