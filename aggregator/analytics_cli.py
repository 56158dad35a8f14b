"""`tierfl analytics`: ask a running aggregator's fleet one question, print the aggregate as JSON.

The query travels to the aggregator over its status server (`tierfl aggregator --status-port`):
POST /analytics with the operator's token from STATE_DIR/analytics.token, then GET
/analytics/ID until the aggregator released the answer or refused it. The aggregator sends the
query to its online devices beside the rounds (aggregator.analytics).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aggregator.analytics import MIN_DEVICES_FLOOR, TOKEN_FILE, AnalyticsRequest
from aggregator.analytics_secure import UNMASK_FRACTION
from models.analytics import COMPUTATIONS

EXIT_REFUSED = 3  # the aggregator refused to release an answer (the JSON says why)
POLL_S = 0.25
OPTIONS = {"timeout_s": "timeout"}  # request fields whose option is not the field's name with dashes
DEFAULTS = {name: info.default for name, info in AnalyticsRequest.model_fields.items()}  # the options' defaults

EXAMPLES = """\
menu (every answer is a sum over the devices that answered; nothing per device is released):
  label_histogram   samples per label
  sample_count      samples
  feature_moments   per channel (per feature for flat samples) mean and variance of values clipped to [low, high]
  quantile_sketch   per channel fixed-bin histogram over [low, high] with --bins bins and the quantiles
                    p10/p25/p50/p75/p90 read off it: within one bin width, (high - low) / bins, of the true ones
  model_metrics     the committed global model's loss (per sample, clipped to --loss-clip), accuracy and
                    confusion matrix on the devices' data, overall and per tier

examples:
  # the fleet's label mix, exact, from at least 3 devices
  tierfl analytics label_histogram --url http://127.0.0.1:8080 --state-dir runs/lab
  # with differential privacy: Gaussian noise of std 2 x the sensitivity, epsilon printed with the answer
  tierfl analytics label_histogram --url http://127.0.0.1:8080 --state-dir runs/lab --dp-noise 2
  # the label mix summed by secure aggregation: no single device's answer is ever seen
  tierfl analytics label_histogram --secure --url http://127.0.0.1:8080 --state-dir runs/lab
  # the global model on the devices' test splits, per tier
  tierfl analytics model_metrics --split test --url http://127.0.0.1:8080 --state-dir runs/lab

exit status: 0 answered, 3 refused (too few devices answered, ...: "reason" says why), 1 other errors."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of `tierfl analytics`."""
    parser.description = (
        "Run one federated-analytics query against a live fleet through its aggregator and print the aggregate "
        "as JSON. The aggregator must serve its status page (tierfl aggregator --status-port PORT): the query is "
        "posted there with the operator's token, which the aggregator writes to STATE_DIR/analytics.token "
        "(readable by its owner only), and the answer read back.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("computation", choices=COMPUTATIONS, help="what each device computes (see the menu below)")
    parser.add_argument("--url", required=True, help="the aggregator's status page, e.g. http://127.0.0.1:8080")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--state-dir", type=Path, default=Path("runs/aggregator"),
                       help=f"the aggregator's --state-dir, holding {TOKEN_FILE} (default: %(default)s)")
    where.add_argument("--token-file", type=Path, help="the token file, when it is not in a state dir here")
    parser.add_argument("--split", choices=("train", "test"), default=DEFAULTS["split"],
                        help="which of each device's splits to compute on (default: %(default)s)")
    parser.add_argument("--min-devices", type=int, default=DEFAULTS["min_devices"], metavar="N",
                        help="release nothing unless at least N devices answered (the aggregator never goes below "
                             f"{MIN_DEVICES_FLOOR}; default: %(default)s)")
    parser.add_argument("--max-devices", type=int, metavar="N", help="ask N online devices drawn at random "
                        "(default: every online device)")
    parser.add_argument("--tier", help="model_metrics: score every device with this tier (default: each device's "
                        "requested tier, else the one it last trained, else the widest)")
    parser.add_argument("--timeout", type=float, default=DEFAULTS["timeout_s"], metavar="S",
                        help="how long the devices have to answer (default: %(default)s)")
    parser.add_argument("--low", type=float, default=DEFAULTS["low"], help="feature_moments, quantile_sketch: values are "
                        "clipped to [low, high] (default: %(default)s)")
    parser.add_argument("--high", type=float, default=DEFAULTS["high"], help="(default: %(default)s)")
    parser.add_argument("--bins", type=int, default=DEFAULTS["bins"], help="quantile_sketch: bins over [low, high] "
                        "(default: %(default)s)")
    parser.add_argument("--loss-clip", type=float, default=DEFAULTS["loss_clip"], help="model_metrics: each sample's loss is "
                        "clipped to this (default: %(default)s)")
    parser.add_argument("--dp-noise", type=float, default=DEFAULTS["dp_noise"], metavar="Z",
                        help="differential privacy (one sample is the unit): add Gaussian noise of std Z x the "
                             "computation's sensitivity to every released sum, charged to the aggregator's analytics "
                             "books (dp-accounting); the answer shows this query's epsilon, the total and the error "
                             "bound. 0: the exact sum (default: %(default)s)")
    parser.add_argument("--dp-delta", type=float, default=DEFAULTS["dp_delta"], help="delta of the epsilon shown (default: %(default)s)")
    parser.add_argument("--secure", action="store_true",
                        help="sum the answers by secure aggregation (the masking of secure rounds): the aggregator "
                             "sees only the sum of the devices that answered, never one device's answer; a device "
                             "that drops out after sharing its keys is unmasked out of the sum, and no sum of fewer "
                             "than --min-devices is ever unmasked. Needs the cryptography package on the devices; "
                             "model_metrics then has no per-tier split")


def run(args: argparse.Namespace) -> int:
    """Post the query, wait for its answer, print it as JSON; 0 answered, 3 refused."""
    try:
        request = AnalyticsRequest(computation=args.computation, split=args.split, min_devices=args.min_devices,
                                   max_devices=args.max_devices, tier=args.tier, timeout_s=args.timeout, low=args.low,
                                   high=args.high, bins=args.bins, loss_clip=args.loss_clip, dp_noise=args.dp_noise,
                                   dp_delta=args.dp_delta, secure=args.secure)
    except ValidationError as exc:  # exit 2 naming the option, as argparse would
        raise argparse.ArgumentError(None, "; ".join(_option_error(error) for error in exc.errors())) from None
    token_file = args.token_file or args.state_dir / TOKEN_FILE
    try:
        token = token_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:  # missing, unreadable, or not the ASCII the aggregator writes
        why = getattr(exc, "strerror", None) or exc
        raise OSError(f"cannot read the operator's token {token_file} ({why}): the aggregator writes "
                      "it to its --state-dir when it serves --status-port; give that --state-dir or --token-file") from None
    result = ask(args.url, token, request, wait_s=args.timeout * (1 + UNMASK_FRACTION) + 30)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if result.get("status") == "answered" else EXIT_REFUSED


def _option_error(error: Mapping[str, Any]) -> str:
    """One pydantic error of the request as the option it came from would say it."""
    field = str(error["loc"][0]) if error["loc"] else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"--{OPTIONS.get(field, field.replace('_', '-'))}: {message}" if field else message


def ask(url: str, token: str, request: AnalyticsRequest, wait_s: float) -> dict[str, object]:
    """Post `request` to the aggregator at `url` and poll until it is answered or refused (RuntimeError after
    `wait_s` from when the aggregator starts it: a query waiting behind others is waited for); the result document."""
    base = url.rstrip("/")
    post = urllib.request.Request(f"{base}/analytics", data=request.model_dump_json().encode(), method="POST",
                                  headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    posted = _open(post)
    query_id = posted["id"]
    until = time.monotonic() + wait_s
    while time.monotonic() < until:
        result = _open(urllib.request.Request(f"{base}/analytics/{query_id}"))
        if result.get("status") in ("answered", "refused"):
            return result
        if result.get("status") in ("posted", "queued"):  # behind another query: its clock has not started
            until = time.monotonic() + wait_s
        time.sleep(POLL_S)
    raise RuntimeError(f"query {query_id} had no answer after {wait_s:.0f} s (is the aggregator still running?)")


def _open(request: urllib.request.Request) -> dict[str, object]:
    """One HTTP exchange with the aggregator: its JSON document, or RuntimeError with its error."""
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except ValueError:
            detail = ""
        raise RuntimeError(f"the aggregator answered {exc.code}: {detail or exc.reason}") from None
    except urllib.error.URLError as exc:
        raise RuntimeError(f"cannot reach the aggregator at {request.full_url}: {exc.reason} (is it running with "
                           "--status-port?)") from None
