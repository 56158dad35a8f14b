"""Federated analytics on the aggregator: run an operator's query against the live fleet, release one aggregate.

An operator's `AnalyticsRequest` (from `tierfl analytics`, through the status server: see
aggregator.monitor) waits in a short queue; the service's loop ticks the `AnalyticsDesk`, which
runs one query at a time beside the rounds, never touching the engine's state:

    submit -> [queued] -> Query to each selected online device -> Answer (or masked input) ->
    checked, summed -> at the deadline or when all answered: refused (fewer than min_devices
    answered) or released: the sum, plus Gaussian noise when the request asks for DP -> result JSON

A query's answers are checked like updates, cheapest first: the service checks the frame
(signature, sender) and, before decoding, the tensor table against `expected_tensors` (an
answer to the open query from a device it asked, not answered yet, shapes of the computation);
then `on_answer` checks the claimed sample count against the device's hello and the tensors'
bounds (models.analytics.QuerySpec.problem). A refused answer is counted, answered with a
Reject and never summed. Nothing is released unless at least `min_devices` (never below the
desk's floor) answered with data (an answer of no samples hides no one); a refusal says why.

Differential privacy (record-level: the unit is one sample): Gaussian noise of std
z x sensitivity (models.analytics) on every summed element, charged to the analytics books, a
`DpEventAccountant` (the `dp-accounting` package) kept in STATE_DIR/analytics_privacy.json:
each noisy query composes one Gaussian mechanism (every sample of an asked device counts, q = 1).
The result carries this query's epsilon, the books' total, and the noise's error bound (95 %
for all elements at once). The aggregator sees the exact sum before the noise (central DP).

Fleet diagnostics (plain queries without DP only, where the aggregator sees each answer anyway):
a label histogram's result adds, without device ids, each device's sample count and the total
variation distance of its label mix from the fleet's (label and quantity skew, for
`tierfl report`). Results are kept in memory (the newest RESULTS_KEPT) and appended to
STATE_DIR/analytics.jsonl.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from aggregator.analytics_secure import SecureSum
from aggregator.engines.base import Engine, Outgoing
from aggregator.engines.model import GlobalModel
from aggregator.fleet_record import FleetRecord
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.strategies.privacy import DEFAULT_DELTA, DpEventAccountant
from models.analytics import QuerySpec, finish, gaussian_bound
from models.slicing import slice_params
from protocol.atomic_file import atomic_write
from protocol.frame import FrameError
from protocol.messages import (MAX_DEVICES, Answer, Bins, Computation, Identifier, LossClip, Query, Reject,
                               RejectReason, SecAgg, TierFiles, ValueBound, new_id)

log = logging.getLogger(__name__)
RESULTS_KEPT = 50  # results the status page and GET /analytics/ID serve
MAX_QUEUED = 16  # requests waiting behind the open query; more are refused
MIN_DEVICES_FLOOR = 3  # no answer of fewer devices is ever released, whatever the request says
RESULTS_FILE = "analytics.jsonl"
BOOKS_FILE = "analytics_privacy.json"
TOKEN_FILE = "analytics.token"
ONLINE_CHECK_S = 1.0  # how often an open query looks at who is online (its devices all gone: close it early)
TierWeights = Callable[[str], tuple[int, Mapping[str, np.ndarray]]]  # tier -> (model version, its slice of the weights)


class AnalyticsRequest(BaseModel):
    """An operator's query, as `tierfl analytics` posts it (every field bounded)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    computation: Computation
    split: Literal["train", "test"] = "train"
    min_devices: Annotated[int, Field(ge=1, le=MAX_DEVICES)] = MIN_DEVICES_FLOOR
    max_devices: Annotated[int, Field(ge=1, le=MAX_DEVICES)] | None = None  # None: every online device
    tier: Identifier | None = None  # model_metrics: score every device's data with this tier (default: its own)
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    low: ValueBound = Query.model_fields["low"].default  # the query's parameters: as a Query bounds them
    high: ValueBound = Query.model_fields["high"].default
    bins: Bins = Query.model_fields["bins"].default
    loss_clip: LossClip = Query.model_fields["loss_clip"].default
    dp_noise: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] = 0.0  # z: noise std z x sensitivity; 0 off
    dp_delta: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_DELTA
    secure: bool = False  # sum the answers by secure aggregation (aggregator.analytics_secure)

    @model_validator(mode="after")
    def _range(self) -> AnalyticsRequest:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.max_devices is not None and self.max_devices < max(self.min_devices, MIN_DEVICES_FLOOR):
            raise ValueError(f"max_devices {self.max_devices} asks fewer devices than the "
                             f"{max(self.min_devices, MIN_DEVICES_FLOOR)} an answer needs (min_devices, at least "
                             f"{MIN_DEVICES_FLOOR})")
        return self


@dataclass
class OpenQuery:
    """The query being answered: who was asked (with the tier that scores, for model_metrics) and the sums so far."""

    id: str
    number: int
    request: AnalyticsRequest
    spec: QuerySpec
    started: float
    deadline: float
    asked: dict[str, str | None]  # device -> tier (model_metrics) or None
    announced: dict[str, int]  # device -> samples of the split its hello announced
    sums: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # tier ("all" for data) -> name -> float64 sum
    answered: dict[str, int] = field(default_factory=dict)  # device -> samples its accepted answer covers
    per_device: list[np.ndarray] = field(default_factory=list)  # label histograms of plain queries (diagnostics)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    secure: SecureSum | None = None  # the secure-aggregation state of a secure query


class AnalyticsDesk:
    """Runs operators' queries against the fleet, one at a time, and keeps their results and privacy books."""

    def __init__(self, registry: DeviceRegistry, artifacts: ArtifactStore, tier_weights: TierWeights,
                 count_rejection: Callable[[RejectReason, str, str | None], None], folder: Path | None = None,
                 min_devices_floor: int = MIN_DEVICES_FLOOR, seed: int | None = None) -> None:
        """`tier_weights(tier)`: the committed model's version and its slice for a tier; `count_rejection` counts a
        refused answer where the engine counts refusals; `folder` (the state directory) keeps results and books."""
        self.registry = registry
        self.artifacts = artifacts
        self._tier_weights = tier_weights
        self._count_rejection = count_rejection
        self.folder = folder
        self.min_devices_floor = min_devices_floor
        self._rng = np.random.default_rng(seed)  # DP noise: OS entropy unless a test seeds it
        self._queue: collections.deque[tuple[str, AnalyticsRequest, float]] = collections.deque()
        self.open: OpenQuery | None = None
        self.results: collections.OrderedDict[str, dict[str, object]] = collections.OrderedDict()
        self.number = _lines(folder / RESULTS_FILE) if folder is not None else 0  # queries numbered across restarts
        self.changes = 0  # bumped whenever a result changes: the service copies results to the status page then
        self.books = self._load_books()
        self.fleet = FleetRecord(registry, folder)  # system heterogeneity for tierfl report: STATE_DIR/fleet.json
        self._online_at, self._online_ids = -math.inf, set[str]()  # _online's last look at the registry
        self._gone_at = -math.inf  # _all_gone's last look

    # -- requests ------------------------------------------------------------------------------

    def submit(self, request: AnalyticsRequest, now: float, query_id: str | None = None) -> str:
        """Queue a request under `query_id` (default: a fresh one); the id its result appears under. A request over
        the queue's bound is refused at once (its result says so)."""
        query_id = query_id or new_id()
        if len(self._queue) >= MAX_QUEUED:
            self._refuse_query(query_id, request, now, f"{MAX_QUEUED} queries are waiting already; ask again when "
                               "one is answered")
            return query_id
        self._queue.append((query_id, request, now))
        self._keep(query_id, {"id": query_id, "status": "queued", "computation": request.computation,
                              "request": request.model_dump(), "submitted": now})
        return query_id

    def result(self, query_id: str) -> dict[str, object] | None:
        """The result (or status) of a query, None if unknown."""
        return self.results.get(query_id)

    def _keep(self, query_id: str, result: dict[str, object]) -> None:
        self.changes += 1
        self.results[query_id] = result
        self.results.move_to_end(query_id)
        while len(self.results) > RESULTS_KEPT:
            self.results.popitem(last=False)

    # -- the loop ------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        """Close the open query when it is over; start the next queued one."""
        out: list[Outgoing] = []
        self.fleet.sample(now)
        if (query := self.open) is not None and query.secure is not None:
            out += query.secure.advance(now, self._online(now))
        if query is not None and (query.secure.done if query.secure is not None else (
                now >= query.deadline or len(query.answered) == len(query.asked) or self._all_gone(query, now))):
            self._close(query, now)
            self.open = None
        while self.open is None and self._queue:
            query_id, request, _ = self._queue.popleft()
            out += self._start(query_id, request, now)
        return out

    def _online(self, now: float) -> set[str]:
        """The online devices, as of at most ONLINE_CHECK_S ago: the desk ticks after every message, and a pass over
        the registry per message would make a query's answers O(devices^2)."""
        if now - self._online_at >= ONLINE_CHECK_S or now < self._online_at:
            self._online_at, self._online_ids = now, {d.device_id for d in self.registry.available()}
        return self._online_ids

    def _all_gone(self, query: OpenQuery, now: float) -> bool:
        """Every device still owing an answer went offline (looked at once every ONLINE_CHECK_S)."""
        if 0 <= now - self._gone_at < ONLINE_CHECK_S:
            return False
        self._gone_at, online = now, self._online(now)
        return not any(device in online for device in query.asked if device not in query.answered)

    def _start(self, query_id: str, request: AnalyticsRequest, now: float) -> list[Outgoing]:
        card = self.artifacts.card
        self.number += 1
        try:
            spec = QuerySpec(request.computation, tuple(card.input_shape), card.num_classes, request.low, request.high,
                             request.bins, request.loss_clip)
            if request.tier is not None and request.tier not in self.artifacts.tiers:
                raise ValueError(f"tier {request.tier!r} is not exported (have: {', '.join(sorted(self.artifacts.tiers))})")
        except ValueError as exc:
            self._refuse_query(query_id, request, now, str(exc))
            return []
        minimum = max(request.min_devices, self.min_devices_floor)
        devices = self.registry.available()
        if request.max_devices is not None:
            devices = devices[:request.max_devices] if request.max_devices >= len(devices) else [
                devices[i] for i in sorted(self._rng.choice(len(devices), request.max_devices, replace=False))]
        if len(devices) < minimum:
            self._refuse_query(query_id, request, now, f"only {len(devices)} devices are online, fewer than the "
                               f"{minimum} an answer needs (min_devices)")
            return []
        asked = {d.device_id: self._scoring_tier(d.device_id, request) if spec.computation == "model_metrics" else None
                 for d in devices}
        announced = {d.device_id: d.num_samples if request.split == "train" else d.num_test_samples for d in devices}
        secure = None
        if request.secure:
            try:  # every element of a true answer is within the computation's limit x the device's samples
                clip = spec.element_limit() * max(1, *announced.values())
                secure = SecureSum(self.number, sorted(asked), spec.shapes(), clip, now, request.timeout_s, minimum)
                secure.settings()
            except ValueError as exc:
                self._refuse_query(query_id, request, now, f"cannot sum securely: {exc}")
                return []
        query = self.open = OpenQuery(query_id, self.number, request, spec, now, now + request.timeout_s, asked, announced,
                                      secure=secure)
        self._keep(query_id, self._status(query, "running"))
        log.info("query %d (%s): asking %d devices, %.0f s to answer", query.number, spec.computation, len(asked),
                 request.timeout_s)
        weights = {tier: self._tier_weights(tier) for tier in set(asked.values()) if tier is not None}  # once a tier
        return [self._message(query, device, tier, weights.get(tier) if tier else None) for device, tier in asked.items()]

    def _scoring_tier(self, device: str, request: AnalyticsRequest) -> str:
        """The tier that scores a device's data: the request's, else the one it asked for, else the one it last
        trained, else the widest."""
        info = self.registry.get(device)
        if request.tier is not None:
            return request.tier
        if info is not None and info.requested_tier in self.artifacts.tiers:
            return info.requested_tier
        if info is not None and (held := [t for t in info.holds if t in self.artifacts.tiers]):
            return max(held, key=info.holds.__getitem__)
        return max(self.artifacts.tiers, key=lambda t: self.artifacts.tiers[t].manifest.rate)

    def _message(self, query: OpenQuery, device: str, tier: str | None,
                 weights: tuple[int, Mapping[str, np.ndarray]] | None) -> Outgoing:
        """The Query for one device (with the tier's files and `weights`, its version and tensors, for model_metrics)."""
        spec, request = query.spec, query.request
        files, version, tensors = None, None, None
        if tier is not None and weights is not None:
            exported = self.artifacts.tiers[tier]
            files = TierFiles(tier=tier, manifest_sha256=exported.manifest_sha256, artifacts=exported.files)
            version, tensors = weights[0], dict(weights[1])
        body = Query(query=query.id, round=query.number, computation=request.computation, split=request.split,
                     deadline=query.deadline, input_shape=list(spec.input_shape), classes=spec.classes, low=spec.low,
                     high=spec.high, bins=spec.bins, loss_clip=spec.loss_clip, files=files, model_version=version,
                     secure=query.secure.settings() if query.secure is not None else None)
        return Outgoing(device, body, tensors)

    # -- answers -------------------------------------------------------------------------------

    def _problem(self, device: str, answer: Answer, now: float) -> tuple[RejectReason, str] | None:
        """Why an answer is refused before its tensors are decoded, or None."""
        query = self.open
        if query is None or answer.query != query.id:
            return RejectReason.STALE_ROUND, f"query {answer.query} is not open"
        if device not in query.asked:
            return RejectReason.NOT_SELECTED, f"{device} was not asked query {query.number}"
        if device in query.answered:
            return RejectReason.DUPLICATE, f"{device} answered query {query.number} already"
        if now > query.deadline:
            return RejectReason.LATE, f"query {query.number} closed {now - query.deadline:.1f} s ago"
        if query.secure is not None:
            return RejectReason.UNEXPECTED, f"query {query.number} is summed securely: send the masked answer"
        if answer.tier != query.asked[device]:
            return RejectReason.UNKNOWN_TIER, f"an answer of tier {answer.tier}, asked of tier {query.asked[device]}"
        if answer.num_samples > query.announced[device]:
            return RejectReason.TOO_MANY_SAMPLES, (f"{answer.num_samples} samples, more than the "
                                                   f"{query.announced[device]} the device announced")
        return None

    def expected_tensors(self, device: str, answer: Answer, now: float) -> dict[str, tuple[int, ...]]:
        """The tensors (name -> shape) an answer must carry, known before it is decoded; FrameError if refused."""
        if (problem := self._problem(device, answer, now)) is not None:
            self._count(problem[0])
            raise FrameError(*problem)
        assert self.open is not None
        return self.open.spec.shapes()

    def on_answer(self, device: str, msg_id: str, answer: Answer, tensors: Mapping[str, np.ndarray],
                  now: float) -> list[Outgoing]:
        """Sum one device's answer into the open query, or refuse it with a reason (counted, never summed)."""
        problem = self._problem(device, answer, now)
        if problem is None:
            assert self.open is not None
            detail = self.open.spec.problem(tensors, answer.num_samples)
            if detail is not None:
                problem = (RejectReason.NON_FINITE if "NaN" in detail else RejectReason.BAD_TENSOR, detail)
        if problem is not None:
            self._count(problem[0])
            self._count_rejection(problem[0], f"answer: {problem[1]}", device)
            return [Outgoing(device, Reject(reason=problem[0], detail=f"answer: {problem[1]}", ref_msg_id=msg_id))]
        query = self.open
        assert query is not None
        sums = query.sums.setdefault(answer.tier or "all", {n: np.zeros(s) for n, s in query.spec.shapes().items()})
        for name in sums:
            sums[name] += np.asarray(tensors[name], np.float64)
        query.answered[device] = answer.num_samples
        if query.spec.computation == "label_histogram" and query.request.dp_noise == 0:
            query.per_device.append(np.asarray(tensors["counts"], np.float64))
        self.registry.seen(device, now)
        log.info("query %d: answer %d/%d from %s", query.number, len(query.answered), len(query.asked), device)
        return []

    def owns(self, session: str) -> bool:
        """Whether a SecAgg message of `session` belongs to the open (secure) query."""
        return self.open is not None and self.open.secure is not None and self.open.secure.session == session

    def masked_tensors(self, device: str, body: SecAgg, now: float) -> dict[str, tuple[int, ...]]:
        """The uint8 tensors a secure query's SecAgg message must carry; FrameError (counted) if it is refused."""
        assert self.open is not None and self.open.secure is not None
        try:
            return self.open.secure.masked_tensors(device, body, now)
        except FrameError as exc:
            self._count(exc.reason)
            raise

    def on_secagg(self, device: str, msg_id: str, body: SecAgg, tensors: Mapping[str, np.ndarray],
                  now: float) -> list[Outgoing]:
        """One device's message of the open secure query, or a Reject (counted) with the reason."""
        assert self.open is not None and self.open.secure is not None
        out = self.open.secure.on_message(device, msg_id, body, tensors, now)
        for message in out:
            if isinstance(message.body, Reject):
                self._count(message.body.reason)
                self._count_rejection(message.body.reason, message.body.detail, device)
        if not out:
            self.registry.seen(device, now)
        return out

    def _count(self, reason: RejectReason) -> None:
        if self.open is not None:
            self.open.refused[reason.value] += 1

    # -- release -------------------------------------------------------------------------------

    def _close(self, query: OpenQuery, now: float) -> None:
        minimum = max(query.request.min_devices, self.min_devices_floor)
        if query.secure is not None:
            if query.secure.result is None:
                self._finish(query, self._status(query, "refused", reason=query.secure.failed), now)
                return
            included = query.secure.result.included
            query.answered = {device: query.announced[device] for device in included}
            query.sums = {"all": {n: np.asarray(v, np.float64) for n, v in query.secure.result.weighted_sum.items()}}
        holding = sum(1 for samples in query.answered.values() if samples > 0)  # an empty answer hides no one
        if holding < minimum:
            self._finish(query, self._status(query, "refused", reason=(
                f"only {holding} of {len(query.asked)} devices answered with data, fewer than the {minimum} an "
                "answer needs (min_devices): nothing is released")), now)
            return
        result = self._status(query, "answered")
        noise = self._noise(query)
        result["privacy"] = noise
        totals = {n: np.zeros(s) for n, s in query.spec.shapes().items()}
        if query.spec.computation == "model_metrics":
            by_tier = {}
            for tier, sums in sorted(query.sums.items()):
                noisy = self._noisy(sums, noise["std"])
                by_tier[tier] = finish(query.spec, noisy)
                for name in totals:
                    totals[name] += noisy[name]
            result["answer"] = finish(query.spec, totals) | {"by_tier": by_tier}
        else:
            result["answer"] = finish(query.spec, self._noisy(query.sums.get("all", totals), noise["std"]))
        if query.per_device:
            result["diagnostics"] = _label_skew(query.per_device)
        self._finish(query, result, now)

    def _noise(self, query: OpenQuery) -> dict[str, object]:
        """The noise this query's release gets, charged to the books: std, epsilon, the error bound."""
        z = query.request.dp_noise
        if z == 0:
            return {"dp": False, "std": 0.0, "error_bound": 0.0}
        sensitivity = query.spec.sensitivity()
        tiers = len(query.sums) if query.spec.computation == "model_metrics" else 1  # each tier's sum gets its own noise
        answer = sum(math.prod(s) for s in query.spec.shapes().values())
        elements = answer * (tiers + 1 if tiers > 1 else 1)  # per tier, and their total (std sqrt(tiers) x as much)
        alone = DpEventAccountant()
        alone.step(z)
        self.books.step(z)
        self._save_books()
        epsilon, _ = alone.epsilon(query.request.dp_delta)
        total, _ = self.books.epsilon(query.request.dp_delta)
        std = z * sensitivity
        return {"dp": True, "unit": "one sample", "noise_multiplier": z, "sensitivity": sensitivity, "std": std,
                "epsilon": epsilon, "delta": query.request.dp_delta, "epsilon_total": total,
                "noisy_queries": len(self.books.events), "error_bound": gaussian_bound(std * math.sqrt(tiers), elements),
                "error_bound_confidence": 0.95, "elements": elements}

    def _noisy(self, sums: Mapping[str, np.ndarray], std: object) -> dict[str, np.ndarray]:
        assert isinstance(std, float)
        if std == 0:
            return dict(sums)
        return {name: value + self._rng.normal(0.0, std, value.shape) for name, value in sorted(sums.items())}

    def _status(self, query: OpenQuery, status: str, reason: str | None = None) -> dict[str, object]:
        plain = status == "answered" and query.request.dp_noise == 0  # an exact total only where the answer is exact
        return {"id": query.id, "number": query.number, "status": status, "reason": reason,
                "computation": query.spec.computation, "request": query.request.model_dump(),
                "started": query.started, "asked": len(query.asked), "answered": len(query.answered),
                "samples": sum(query.answered.values()) if plain else None, "refused_answers": dict(query.refused),
                "min_devices": max(query.request.min_devices, self.min_devices_floor),
                "secure": query.secure is not None}

    def _refuse_query(self, query_id: str, request: AnalyticsRequest, now: float, reason: str) -> None:
        log.warning("query %d (%s) refused: %s", self.number, request.computation, reason)
        result: dict[str, object] = {"id": query_id, "number": self.number, "status": "refused", "reason": reason,
                                     "computation": request.computation, "request": request.model_dump(),
                                     "started": now, "asked": 0, "answered": 0}
        self._keep(query_id, result | {"finished": now})
        self._append(result | {"finished": now})

    def _finish(self, query: OpenQuery, result: dict[str, object], now: float) -> None:
        result["finished"] = now
        self.fleet.query(list(query.asked), list(query.answered))
        self.fleet.sample(now, force=True)  # the record is current whenever a result is
        if result["status"] == "refused":
            log.warning("query %d (%s) refused: %s", query.number, query.spec.computation, result["reason"])
        else:
            log.info("query %d (%s): released the answer of %d devices", query.number, query.spec.computation,
                     len(query.answered))
        self._keep(query.id, result)
        self._append(result)

    def _append(self, result: dict[str, object]) -> None:
        if self.folder is not None:
            with open(self.folder / RESULTS_FILE, "a", encoding="utf-8") as out:
                out.write(json.dumps(result, allow_nan=False, default=_nan_free) + "\n")

    def _load_books(self) -> DpEventAccountant:
        """The analytics books of STATE_DIR/analytics_privacy.json (empty when absent); ValueError naming the file
        when it does not read: the epsilon already spent is never silently forgotten."""
        path = self.folder / BOOKS_FILE if self.folder is not None else None
        if path is None or not path.exists():
            return DpEventAccountant()
        try:
            return DpEventAccountant(json.loads(path.read_bytes())["events"])
        except (ValueError, TypeError, KeyError) as exc:  # JSON, UTF-8, an event of the wrong form or values
            raise ValueError(f"{path} does not read as analytics privacy books ({str(exc)[:200]}): restore it from a "
                             "backup, or move it aside to start the books at zero (forgetting the epsilon spent)") from exc

    def _save_books(self) -> None:
        if self.folder is not None:
            data = json.dumps({"unit": "one sample", "events": self.books.events}).encode()
            atomic_write(self.folder / BOOKS_FILE, lambda f: f.write(data))


def _label_skew(histograms: list[np.ndarray]) -> dict[str, object]:
    """Label and quantity skew across devices, without device ids: per device (sorted by size) its samples and the
    total variation distance of its label mix from the fleet's."""
    total = np.sum(histograms, axis=0)
    fleet = total / max(total.sum(), 1.0)
    rows = sorted(((float(h.sum()), float(0.5 * np.abs(h / max(h.sum(), 1.0) - fleet).sum())) for h in histograms),
                  reverse=True)
    return {"samples_per_device": [r[0] for r in rows], "label_distance": [r[1] for r in rows]}


def _lines(path: Path) -> int:
    """Lines of a file, 0 when it is missing."""
    try:
        with open(path, "rb") as lines:
            return sum(1 for _ in lines)
    except FileNotFoundError:
        return 0


def _nan_free(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON")


def analytics_token(folder: Path) -> str:
    """The operator's token for posting queries: FOLDER/analytics.token, created (owner-only) on first use."""
    path = folder / TOKEN_FILE
    if not path.exists():
        token = secrets.token_hex(16).encode()
        atomic_write(path, lambda f: f.write(token), mode=0o600)
    try:
        text = path.read_text(encoding="ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not text or not text.isprintable():
        raise ValueError(f"{path} holds no token (empty, or not printable ASCII): delete it and restart the aggregator "
                         "to make a new one")
    return text


def tier_weights_of(engine: Engine) -> TierWeights:
    """`tier_weights` for a desk from a running engine: the committed version and the tier's slice of its weights as a
    task of that tier gets them (engines.model.GlobalModel.tier_weights: with the tier's own batch-norm statistics);
    an engine without a GlobalModel gives the leading block of its weights."""

    def tier_weights(tier: str) -> tuple[int, Mapping[str, np.ndarray]]:
        for holder in (engine, getattr(engine, "rounds", None)):  # a secure engine runs its rounds through .rounds
            model = getattr(holder, "model", None)
            if isinstance(model, GlobalModel):
                return engine.record.version, model.tier_weights(tier)
        weights: Mapping[str, np.ndarray] = getattr(engine, "weights")
        return engine.record.version, slice_params(weights, engine.artifacts.tiers[tier].shapes)

    return tier_weights
