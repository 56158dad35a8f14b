"""What a running aggregator shows its operator: Prometheus metrics and a live status page over HTTP.

The service thread owns all state. It reports events (bytes, accepted updates, rejections) and,
after every step of its loop, calls `observe`, which copies what the page needs into an immutable
`StatusSnapshot` and swaps it in under a lock. The HTTP server runs in daemon threads and only reads
that snapshot and the monitor's own metrics registry (prometheus-client metrics are thread-safe).

Everything shown is bounded at any fleet size: the device table lists at most DEVICES_LISTED devices
(the open round's first, then the most recently seen) beside the counts of all of them, a round's
waiting list at most WAITING_LISTED names, and no metric has a per-device label. Counting the
devices is the one pass over the registry; it runs at most every devices / DEVICE_PASS_RATE seconds
(a thousand devices: every refresh; a million: every 100 s), so it costs a bounded share of the loop.

Routes: `/metrics` (Prometheus text format), `/status.json` (the latest snapshot), `/` (the page).
With an analytics token (aggregator.analytics): `POST /analytics` queues an operator's query (a JSON
AnalyticsRequest of at most 4 KiB, with `Authorization: Bearer TOKEN`, the token of
STATE_DIR/analytics.token; anything else is refused 401/400/413 and never queued), answered 202 with
the query's id; `GET /analytics/ID` serves its result (or status), `GET /analytics` the newest results.
The handler only validates and queues: the service thread takes the queue (`take_queries`) and
hands back results (`show_analytics`), which the page and /status.json also show.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import hmac
import json
import logging
import math
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from aggregator.engines.personal import PERSONAL_METRICS
from protocol.messages import RejectReason, RoundSummary, new_id

if TYPE_CHECKING:
    from aggregator.analytics import AnalyticsRequest
    from aggregator.engines.base import Engine
    from aggregator.registry import DeviceInfo
    from aggregator.store.artifacts import ArtifactStore

log = logging.getLogger(__name__)

REJECTIONS_KEPT = 50  # the status page lists this many recent rejections
HISTORY_SHOWN = 1000  # rounds in /status.json (the newest)
MAX_QUERY_BYTES = 4096  # a POST /analytics body
MAX_QUERIES_WAITING = 16  # posted queries the service has not taken yet; more are refused 429
ANALYTICS_SHOWN = 10  # results in /status.json (the newest)
DEVICES_LISTED = 50  # rows of the device table in /status.json: the open round's devices, then the latest seen
WAITING_LISTED = 20  # names in a round's waiting list (its count is `selected - answered`)
DEVICE_PASS_RATE = 10_000.0  # devices counted per second of interval: N devices are counted every N / this seconds
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


@dataclass(frozen=True)
class DeviceStatus:
    """One device as the page shows it."""

    device_id: str
    tier: str | None  # its task's tier in the open round, else the tier it last trained, else the one it asked for
    online: bool
    last_seen: float
    backend: str
    num_samples: int


@dataclass(frozen=True)
class DeviceCounts:
    """Every registered device, counted (the table lists only some)."""

    known: int
    online: int
    online_by_tier: tuple[tuple[str, int], ...]  # tier (or "none") -> devices online


@dataclass(frozen=True)
class RoundProgress:
    """The open round: how many of the selected devices have answered the current phase."""

    number: int
    phase: str  # "training" or "statistics" (batch-norm models measure statistics before the commit)
    selected: int
    answered: int
    started: float
    deadline: float | None  # None: no deadline (FedBuff's buffer)
    waiting_for: tuple[str, ...]  # devices that owe this phase an answer (the first WAITING_LISTED, by id)


@dataclass(frozen=True)
class Rejection:
    """One refused message."""

    time: float
    device: str | None
    reason: str
    detail: str


@dataclass(frozen=True)
class StatusSnapshot:
    """Everything /status.json serves, copied out of the service thread's state at one instant."""

    taken: float
    fleet: str
    model: str
    model_card: Mapping[str, object]  # what was exported: name, one sample's shape, classes, batch norm, tiers
    rounds_planned: int
    round: int  # last finished round
    version: int
    finished: bool
    current: RoundProgress | None
    devices: tuple[DeviceStatus, ...]  # at most DEVICES_LISTED
    device_counts: DeviceCounts
    history: tuple[RoundSummary, ...]
    rejections: tuple[Rejection, ...]  # newest first
    rejected_by_reason: tuple[tuple[str, int], ...]
    bytes_received: int
    bytes_sent: int
    updates_accepted: int
    analytics: tuple[Mapping[str, object], ...] = ()  # the newest analytics results, oldest first

    @cached_property
    def json_bytes(self) -> bytes:
        """The snapshot as /status.json serves it (encoded once, on first request)."""
        shown = self.history[-HISTORY_SHOWN:]
        before = self.history[-len(shown) - 1].version if len(self.history) > len(shown) else 0
        rounds = []
        for s in shown:
            rounds.append({
                "round": s.round, "version": s.version, "committed": s.version > before, "selected": s.selected,
                "answered": s.answered, "accuracy": _finite(s.accuracy), "loss": _finite(s.loss),
                "accuracy_source": s.accuracy_source, "seconds": s.seconds, "bytes_up": s.bytes_up,
                "bytes_down": s.bytes_down, "accuracy_by_tier": {t: _finite(a) for t, a in s.accuracy_by_tier.items()},
                "personal": {k: _finite(v) for k, v in s.metrics.items() if k.startswith(PERSONAL_METRICS)},
            })
            before = s.version
        document = {
            "now": self.taken, "fleet": self.fleet, "model": self.model, "model_card": dict(self.model_card),
            "rounds_planned": self.rounds_planned,
            "round": self.round, "version": self.version, "finished": self.finished,
            "current": dataclasses.asdict(self.current) if self.current else None,
            "devices": [dataclasses.asdict(d) for d in self.devices],
            "device_counts": {"known": self.device_counts.known, "online": self.device_counts.online,
                              "online_by_tier": dict(self.device_counts.online_by_tier), "listed": len(self.devices)},
            "history": rounds,
            "rejections": [dataclasses.asdict(r) for r in self.rejections],
            "rejected_by_reason": dict(self.rejected_by_reason),
            "totals": {"bytes_received": self.bytes_received, "bytes_sent": self.bytes_sent,
                       "updates_accepted": self.updates_accepted},
            "analytics": list(self.analytics[-ANALYTICS_SHOWN:]),
        }
        return json.dumps(document, allow_nan=False).encode()


def _model_card(artifacts: ArtifactStore) -> dict[str, object]:
    """The export's model as the status page shows it: its card and, per tier, parameters and MACs per sample."""
    card = artifacts.card
    return {"name": card.name, "input_shape": list(card.input_shape), "num_classes": card.num_classes,
            "batch_norm": card.batch_norm, "origin": card.recipe.arch if card.recipe else "onnx file",
            "tiers": {t: {"rate": a.manifest.rate, "params": a.manifest.param_count, "macs": a.manifest.macs}
                      for t, a in artifacts.tiers.items()}}


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: a diverged model's loss shows as missing."""
    return value if value is not None and math.isfinite(value) else None


class Monitor:
    """Metrics and status of one aggregator, served over HTTP on `host:port` (port 0: any free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, refresh_s: float = 0.25,
                 analytics_token: str | None = None) -> None:
        """`analytics_token`: accept operators' queries (POST /analytics) bearing it; None: analytics is off."""
        if not 0 <= port <= 65535:
            raise ValueError(f"status port {port} is not a TCP port (0-65535; 0 picks a free one)")
        self.host, self.port = host, port
        self.refresh_s = refresh_s  # the slowest a snapshot may lag behind (a finished round never lags)
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._snapshot: StatusSnapshot | None = None
        self._card: tuple[ArtifactStore, dict[str, object]] | None = None  # the export never changes: made once
        self._server: _StatusServer | None = None
        # Owned by the service thread:
        self._rejections: collections.deque[Rejection] = collections.deque(maxlen=REJECTIONS_KEPT)
        self._rejected_by_reason: collections.Counter[str] = collections.Counter()
        self._bytes_received = self._bytes_sent = self._updates_accepted = 0
        self._history_seen: int | None = None
        self._version = 0
        self._tiers_seen: set[str] = set()
        self._last_refresh = 0.0
        self._devices: tuple[tuple[DeviceStatus, ...], DeviceCounts] | None = None  # the last pass over the registry
        self._last_device_pass = -math.inf
        self._metrics = _Metrics(self.registry)
        self.analytics_token = analytics_token
        self._queries: collections.deque[tuple[str, AnalyticsRequest]] = collections.deque()  # posted, not taken
        self._analytics: tuple[Mapping[str, object], ...] = ()  # the service's copy of the desk's results

    # -- the HTTP server ----------------------------------------------------------------------

    def start(self) -> Monitor:
        """Bind `host:port` and serve in daemon threads; OSError with the address if it is taken."""
        try:
            self._server = _StatusServer((self.host, self.port), self)
        except OSError as exc:
            raise OSError(f"cannot serve the status page on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="tierfl-status", daemon=True).start()
        log.info("status page at %s (metrics at %smetrics)", self.url, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Where the status page is served."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def snapshot(self) -> StatusSnapshot | None:
        """The latest snapshot (any thread), None before the service's first step."""
        with self._lock:
            return self._snapshot

    # -- analytics: queries in (HTTP threads), results out (service thread) ------------------------

    def post_query(self, request: AnalyticsRequest) -> str | None:
        """Queue an operator's checked query for the service (any thread); its id, None when the queue is full."""
        with self._lock:
            if len(self._queries) >= MAX_QUERIES_WAITING:
                return None
            query_id = new_id()
            self._queries.append((query_id, request))
            self._analytics = (*self._analytics, {"id": query_id, "status": "posted",
                                                  "computation": request.computation})
            return query_id

    def take_queries(self) -> list[tuple[str, AnalyticsRequest]]:
        """The queries posted since the last call (service thread)."""
        with self._lock:
            taken = list(self._queries)
            self._queries.clear()
            return taken

    def show_analytics(self, results: list[Mapping[str, object]]) -> None:
        """The desk's results, oldest first, for /analytics and the page (service thread)."""
        shown = {x["id"] for x in results}
        with self._lock:
            posted = tuple(r for r in self._analytics if r.get("status") == "posted" and r["id"] not in shown)
            self._analytics = (*results, *posted)
            if self._snapshot is not None:
                self._snapshot = dataclasses.replace(self._snapshot, analytics=self._analytics)

    def analytics_result(self, query_id: str) -> Mapping[str, object] | None:
        """One query's result or status (any thread)."""
        with self._lock:
            return next((r for r in self._analytics if r.get("id") == query_id), None)

    def analytics_results(self) -> tuple[Mapping[str, object], ...]:
        """The newest results, oldest first (any thread)."""
        with self._lock:
            return self._analytics

    # -- events, from the service thread ------------------------------------------------------

    def received(self, nbytes: int) -> None:
        """A frame of `nbytes` arrived."""
        self._bytes_received += nbytes
        self._metrics.bytes_received.inc(nbytes)

    def sent(self, nbytes: int) -> None:
        """`nbytes` were published."""
        self._bytes_sent += nbytes
        self._metrics.bytes_sent.inc(nbytes)

    def update_accepted(self) -> None:
        """A device's update was counted toward the open round."""
        self._updates_accepted += 1
        self._metrics.updates_accepted.inc()

    def rejected(self, device: str | None, reason: RejectReason, detail: str, now: float) -> None:
        """A message was refused."""
        self._rejections.appendleft(Rejection(now, device, reason.value, detail))
        self._rejected_by_reason[reason.value] += 1
        self._metrics.rejections.labels(reason.value).inc()

    def observe(self, engine: Engine, now: float, step_seconds: float = 0.0) -> None:
        """Take in the engine's state after one service step that took `step_seconds` (cheap when nothing changed)."""
        history = engine.record.history
        if self._history_seen is None:  # rounds finished before a restart set the gauges but are not counted
            self._history_seen = len(history)
            if history:
                self._show_round(history[-1])
        new = history[self._history_seen:]
        for summary in new:
            self._metrics.rounds_finished.labels("committed" if summary.version > self._version else "failed").inc()
            self._metrics.round_seconds.observe(summary.seconds)
            self._metrics.aggregation_seconds.observe(step_seconds)
            self._show_round(summary)
        self._history_seen = len(history)
        if not new and self._snapshot is not None and now - self._last_refresh < self.refresh_s:
            return
        self._last_refresh = now
        snapshot = self._take_snapshot(engine, now)
        with self._lock:
            self._snapshot = dataclasses.replace(snapshot, analytics=self._analytics)

    def _show_round(self, summary: RoundSummary) -> None:
        """Set the gauges from the last finished round."""
        self._version = summary.version
        self._metrics.round.set(summary.round)
        self._metrics.model_version.set(summary.version)
        if summary.accuracy is not None:
            self._metrics.accuracy.set(summary.accuracy)
        if summary.loss is not None:
            self._metrics.loss.set(summary.loss)
        for tier, accuracy in summary.accuracy_by_tier.items():
            self._metrics.tier_accuracy.labels(tier).set(accuracy)
        for name, value in summary.metrics.items():  # the strategy's: DP epsilon, FedBuff staleness, FedMut radius
            self._metrics.strategy.labels(name).set(value)

    def _device_pass(self, engine: Engine, now: float) -> tuple[tuple[DeviceStatus, ...], DeviceCounts]:
        """The listed devices and the counts of all: one pass over the registry, at most every
        devices / DEVICE_PASS_RATE seconds (the last pass is reused in between)."""
        registry = engine.registry
        if self._devices is not None and now - self._last_device_pass < len(registry) / DEVICE_PASS_RATE:
            return self._devices
        self._last_device_pass = now
        current = engine.view()
        assigned = current.tiers if current else {}
        online: collections.Counter[str] = collections.Counter()

        def status(info: DeviceInfo) -> DeviceStatus:
            return DeviceStatus(
                device_id=info.device_id,
                tier=assigned.get(info.device_id) or _last_trained_tier(info.holds) or info.requested_tier,
                online=info.online,
                last_seen=info.last_seen, backend=info.backend, num_samples=info.num_samples)

        for info in registry.iter_devices():
            if info.online:
                online[assigned.get(info.device_id) or _last_trained_tier(info.holds) or info.requested_tier or "none"] += 1
        in_round = sorted(assigned)[:DEVICES_LISTED]
        listed = [info for d in in_round if (info := registry.get(d)) is not None]
        if len(listed) < DEVICES_LISTED:
            chosen = set(in_round)
            listed += heapq.nlargest(DEVICES_LISTED - len(listed),
                                     (i for i in registry.iter_devices() if i.device_id not in chosen),
                                     key=lambda i: (i.last_seen, i.device_id))
        counts = DeviceCounts(known=len(registry), online=sum(online.values()), online_by_tier=tuple(sorted(online.items())))
        self._tiers_seen |= set(online)
        for tier in self._tiers_seen:
            self._metrics.devices_online.labels(tier).set(online[tier])
        self._metrics.devices_known.set(len(registry))
        self._devices = (tuple(sorted((status(i) for i in listed), key=lambda d: d.device_id)), counts)
        return self._devices

    def _model_card(self, artifacts: ArtifactStore) -> dict[str, object]:
        """The export's description for the status page, made on the first snapshot."""
        if self._card is None or self._card[0] is not artifacts:
            self._card = (artifacts, _model_card(artifacts))
        return self._card[1]

    def _take_snapshot(self, engine: Engine, now: float) -> StatusSnapshot:
        current = engine.view()
        devices, counts = self._device_pass(engine, now)
        progress = None
        if current is not None:
            progress = RoundProgress(number=current.number, phase=current.phase, selected=current.selected,
                                     answered=current.answered, started=current.started,
                                     deadline=_finite(current.deadline), waiting_for=current.waiting_for[:WAITING_LISTED])
        return StatusSnapshot(
            taken=now, fleet=engine.config.fleet, model=engine.record.model, model_card=self._model_card(engine.artifacts),
            rounds_planned=engine.config.rounds,
            round=engine.record.round, version=engine.record.version, finished=engine.finished, current=progress,
            devices=devices, device_counts=counts, history=tuple(engine.record.history), rejections=tuple(self._rejections),
            rejected_by_reason=tuple(sorted(self._rejected_by_reason.items())),
            bytes_received=self._bytes_received, bytes_sent=self._bytes_sent, updates_accepted=self._updates_accepted,
        )


class _Metrics:
    """The Prometheus metrics of one aggregator, in their own registry."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.rounds_finished = Counter("tierfl_rounds_finished", "Rounds closed since start, by outcome", ["outcome"],
                                       registry=r)
        self.round = Gauge("tierfl_round", "Number of the last finished round (rounds before a restart count)", registry=r)
        self.model_version = Gauge("tierfl_model_version", "Version of the committed global model", registry=r)
        self.devices_online = Gauge("tierfl_devices_online", "Devices online, by tier", ["tier"], registry=r)
        self.devices_known = Gauge("tierfl_devices_known", "Devices that have announced themselves", registry=r)
        self.updates_accepted = Counter("tierfl_updates_accepted", "Device updates counted toward a round", registry=r)
        self.rejections = Counter("tierfl_rejections", "Messages refused, by reason", ["reason"], registry=r)
        self.bytes_received = Counter("tierfl_received_bytes", "Bytes of frames received from devices", registry=r)
        self.bytes_sent = Counter("tierfl_sent_bytes", "Bytes published to devices and the rounds topic", registry=r)
        self.round_seconds = Histogram("tierfl_round_duration_seconds", "Wall time of a round, first task to commit",
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.aggregation_seconds = Histogram(
            "tierfl_aggregation_seconds", "Wall time of the service step that closed a round (aggregate, evaluate, "
            "commit to disk, publish)", buckets=SECONDS_BUCKETS, registry=r)
        self.accuracy = Gauge("tierfl_accuracy", "Global accuracy after the last round that measured it", registry=r)
        self.loss = Gauge("tierfl_loss", "Global loss after the last round that measured it", registry=r)
        self.strategy = Gauge("tierfl_strategy_metric", "The strategy's own numbers of the last round (dp_epsilon, "
                              "dp_delta, staleness_mean, fedmut_step_norm, ...)", ["metric"], registry=r)
        self.tier_accuracy = Gauge("tierfl_tier_accuracy", "Accuracy of each tier's slice after the last round",
                                   ["tier"], registry=r)
        for outcome in ("committed", "failed"):
            self.rounds_finished.labels(outcome)
        for reason in RejectReason:
            self.rejections.labels(reason.value)
        self.accuracy.set(float("nan"))
        self.loss.set(float("nan"))


def _last_trained_tier(holds: dict[str, int]) -> str | None:
    """The tier whose weights the device received most recently."""
    return max(holds, key=holds.__getitem__) if holds else None


class _StatusServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], monitor: Monitor) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.monitor = monitor
        self.page = resources.files("aggregator").joinpath("static/status.html").read_bytes()
        super().__init__(address, _StatusHandler)


class _StatusHandler(BaseHTTPRequestHandler):
    server: _StatusServer
    timeout = 10  # seconds a client may stall mid-request (a POST short of its Content-Length) before it is dropped

    def do_GET(self) -> None:
        """Serve /metrics, /status.json or the page."""
        path = urlsplit(self.path).path
        monitor = self.server.monitor
        if path == "/metrics":
            self._reply(200, CONTENT_TYPE_LATEST, generate_latest(monitor.registry))
        elif path == "/status.json":
            snapshot = monitor.snapshot()
            if snapshot is None:
                self._reply(503, "application/json", b'{"error": "the aggregator has not started yet"}')
            else:
                self._reply(200, "application/json", snapshot.json_bytes)
        elif path in ("/", "/index.html"):
            self._reply(200, "text/html; charset=utf-8", self.server.page)
        elif path == "/analytics":
            self._json(200, {"results": list(monitor.analytics_results())})
        elif path.startswith("/analytics/"):
            found = monitor.analytics_result(path.removeprefix("/analytics/"))
            self._json(200, dict(found)) if found is not None else self._json(404, {"error": "no such query"})
        else:
            self._reply(404, "text/plain; charset=utf-8", f"no such page: {path}\n".encode())

    def do_POST(self) -> None:
        """POST /analytics: check the token, the size and the query, then queue it (202 with its id)."""
        from aggregator.analytics import AnalyticsRequest  # pydantic: the request's schema, every field bounded

        monitor = self.server.monitor
        if urlsplit(self.path).path != "/analytics":
            self._json(404, {"error": f"nothing to post to at {urlsplit(self.path).path}"})
            return
        if monitor.analytics_token is None:
            self._json(404, {"error": "this aggregator takes no analytics queries"})
            return
        offered = self.headers.get("Authorization", "")
        if not hmac.compare_digest(offered.encode(), f"Bearer {monitor.analytics_token}".encode()):
            self._json(401, {"error": "a query needs the operator's token: Authorization: Bearer <the contents of "
                                      "STATE_DIR/analytics.token>"})
            return
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_QUERY_BYTES:
            self._json(413, {"error": f"a query is a JSON object of at most {MAX_QUERY_BYTES} bytes"})
            return
        try:
            request = AnalyticsRequest.model_validate_json(self.rfile.read(length))
        except ValueError as exc:
            self._json(400, {"error": f"not a query: {str(exc)[:1000]}"})
            return
        query_id = monitor.post_query(request)
        if query_id is None:
            self._json(429, {"error": f"{MAX_QUERIES_WAITING} queries are waiting already"})
        else:
            self._json(202, {"id": query_id, "result": f"/analytics/{query_id}"})

    def _json(self, status: int, document: Mapping[str, object]) -> None:
        self._reply(status, "application/json", json.dumps(document, allow_nan=False).encode())

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)
