"""The device agent: announce, fetch the tier's artifacts, train each task, publish the update.

In the aggregator service's shape: paho's network thread reassembles frames, checks and decodes
them (edge_client.receipt, which also pins the aggregator's key on first use) and queues what
passes in a bounded inbox (edge_client.inbox); besides signing the last will at each connect,
that is all it does. One device loop owns everything else: it writes artifacts into the cache,
answers the secure-aggregation phases (keys, shares, masking, unmasking:
edge_client.secure_client), says hello at each connect, and runs each task through its stages:
check that it is still wanted, get its files, fit the local data to the tier's model (skipped, the
reason logged once per model, when it does not fit: models.data.fit_split), get its weights, load
the tier, evaluate, train, then encode and send the update (or hand the delta to the secure
session). While a stage waits (for files, or for ONNX Runtime, which runs on a helper thread the
loop lends the tier's trainer to) the loop keeps serving the inbox, so keys go out and shares are
answered during training.
The broker session is persistent (clean_session off): a task published while the device was
away is delivered when it comes back, and dropped here if its deadline has passed.

Stopping takes no new task; the one in training gets a grace period to finish (it ends by its
own deadline, or sooner) and send its update, or is abandoned: a task's results (its update, the
error-feedback residual on disk) are committed all together or not at all.

`ask_tier` (tierfl bench --broker) gets a tier's files without a task: the loop asks the aggregator
for the tier's catalogue (CatalogueRequest, once this device said hello), takes the signed answer
bound to that request, and fetches and checks the files through the same stages as a task's.

Nothing a downlink frame holds stops the agent. Frames are checked on receipt (edge_client.receipt:
topic, sender, the trusted aggregator key, the payload and its schema, which refuses a task listing
more files than one Fetch asks for; a task taken before or past its deadline); then, on the loop, a
task whose files are not its manifest's or exceed the cache bound, ONNX files with external data or
unknown operator domains (edge_client.onnx_guard), weights of other names, shapes or dtypes than the
tier's manifest, or training into NaN/Inf is refused and abandoned with nothing of it kept, and so
is a task that fails in any other way (logged with its traceback). Refusals are counted in
`refused` by reason and logged once per sender and reason per 10 s (protocol.refusals), the next
line saying how many were left out.

The offline status the broker publishes if we vanish (the MQTT last will) is signed afresh for
each (re)connect, so its `sent_at` is newer than any will of an earlier connection: the
aggregator can tell a replayed copy from the device's real last word. Every hello of a connection
is stamped with the time taken just before that connection's will is signed: no later than its
will, and later than any earlier connection's, so the aggregator refuses a status older than the
hello it holds (even one it received after a restart of its own) as a replay.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_client.analytics import checked_weights, data_answer, model_answer
from edge_client.backends import open_trainer
from edge_client.bn_statistics import measure_bn_statistics
from edge_client.cache import ArtifactCache, ArtifactTooLarge
from edge_client.compression import ErrorFeedback
from edge_client.declines import SentUpdates, declined_task
from edge_client.inbox import Inbox
from edge_client.onnx_guard import OnnxRefused, check_onnx_folder
from edge_client.personal import PersonalLayers, finetune
from edge_client.privacy import privatize
from edge_client.receipt import Receipt
from edge_client.scaffold import ControlVariate, Variate
from edge_client.stages import (NotHeld, TaskRefused, TaskSkipped, TrainingDiverged, check_manifest, encode_update,
                                store_blob, task_variate, task_weights, trained_delta)
from edge_client.trainer import EvalStats, Trainer, TrainStats
from models.data import Dataset, fit_split
from models.manifest import STATISTICS_FILE, TierManifest
from protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from protocol.control import split_control
from protocol.frame import Frame, encode_frame, read_header
from protocol.messages import (Answer, Blob, BnStatistics, Body, Catalogue, CatalogueRequest, Fetch, Hello,
                               MeasureBnStatistics, Query, Reject, RejectReason, SecAgg, Status, Task, TierFiles,
                               TrainTask, Update, new_id)
from protocol.mqtt.link import Backoff, MqttLink, Will
from protocol.mqtt.url import BrokerAddress
from protocol.quantized import Tensor
from protocol.refusals import RefusalLog
from protocol.signing import DeviceKey
from protocol.topics import Topics, check_id
from protocol.trust import AggregatorTrust

try:
    from edge_client.secure_client import SecureClient
except ImportError:  # no `cryptography`: this device cannot take part in secure aggregation
    SecureClient = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)
SERVE_S = 0.2  # longest the device loop waits on its inbox before looking at its tasks again
T = TypeVar("T")


@dataclass(frozen=True)
class Connected:
    """The inbox's note that the link (re)connected: the loop says hello."""


Downlink = Frame | Connected  # what the network thread queues for the device loop
MAX_ASK_TRIES = 3  # a catalogue request is sent again (after a new hello) when the aggregator did not know us yet


@dataclass
class _Ask:
    """A tier asked for by `ask_tier`: its checked folder, or the refusal, goes into `result`."""

    tier: str
    until: float  # wall-clock time after which the loop gives up on it
    result: Future[Path] = field(default_factory=Future)
    tries: int = 0


class ClientConfig(BaseModel):
    """Everything a device agent needs to join a fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: BrokerAddress
    device_id: str
    fleet: str = "default"
    aggregator_id: str = "aggregator"
    tier: str | None = None
    cache_dir: Path
    threads: int = Field(1, ge=1, le=64)
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=4096)
    codec: str = "float32"  # how updates are encoded (see protocol.codecs)
    skip_below: float = Field(0.0, ge=0.0)  # selective upload: relative update norm under which nothing is sent
    seconds_per_sample: dict[str, float] = {}  # tier -> training speed from a benchmark, announced in the hello
    backend: Literal["ort-training", "portable"] = "ort-training"
    send_margin_s: float = Field(2.0, ge=0)  # stop training this long before the deadline (partial work) to send in time
    cache_max_mb: float = Field(512.0, gt=0)  # bound of the artifact cache (MB: 10^6 bytes)
    reconnect_max_s: float = Field(60.0, ge=1.0)  # longest wait between attempts to reach the broker
    connect_timeout_s: float | None = Field(None, gt=0)  # give up when the broker is unreachable this long at start
    stop_grace_s: float = Field(10.0, ge=0)  # on stop, how long the task in training may take to finish and send
    fleet_keys: dict[str, str] | None = None  # device -> Ed25519 public hex: secure rosters must be signed by these
    aggregator_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None  # else pinned on first use


def device_key(folder: Path) -> DeviceKey | None:
    """This device's signing key (created on first use), or None when `cryptography` is not installed."""
    try:
        return DeviceKey(folder)
    except ImportError:
        log.warning("the cryptography package is missing: frames go unsigned, and a fleet that enrols keys "
                    "will refuse them (pip install cryptography)")
        return None


class DeviceAgent:
    """One device of the fleet, training on its own local data."""

    def __init__(self, config: ClientConfig, train: Dataset, test: Dataset, trains: bool = True,
                 data_name: str = "the local data") -> None:
        """`trains=False` (tierfl bench --broker): tasks are let go unanswered; only `ask_tier` fetches files.
        `data_name` (the --data value) names the data in the error when it does not fit a task's model."""
        check_id(config.device_id, "device id")
        self.config = config
        self.trains = trains
        self.train_data = train
        self.test_data = test
        self.data_name = data_name
        self.topics = Topics(config.fleet)
        self.cache = ArtifactCache(config.cache_dir, max_bytes=int(config.cache_max_mb * 1e6))
        self.key = device_key(config.cache_dir)
        self.trust = AggregatorTrust(config.cache_dir, config.aggregator_key, verifiable=self.key is not None)
        self.session = new_id()  # fresh per start: binds our hello and statuses, so an old one replayed differs
        self._hello_at: float | None = None  # this connection's hello stamp, taken just before its will was signed
        self.refused: collections.Counter[str] = collections.Counter()
        self._refusal_log = RefusalLog()  # one line per sender and reason per interval, whatever a flood does
        self._refusal_lock = threading.Lock()  # refusals come from the network thread and the device loop
        self.tasks_done = 0
        self.inbox: Inbox[Downlink] = Inbox(lambda item: item.nbytes if isinstance(item, Frame) else 0)
        # the device loop's own state
        self._tasks: collections.deque[Frame] = collections.deque()  # tasks taken, oldest first
        self._queries: collections.deque[Frame] = collections.deque()  # analytics queries taken, answered between tasks
        self._trainers: dict[str, Trainer] = {}
        self._manifests: dict[str, TierManifest] = {}  # manifest sha256 -> manifest, once its tier folder is checked
        self._feedback: dict[str, ErrorFeedback] = {}
        self._variates: dict[str, ControlVariate] = {}  # manifest sha256 -> SCAFFOLD's c_i of that tier
        self._sent_updates = SentUpdates()  # the loop's: updates sent, answered with a decline if refused
        self._fitted: tuple[tuple[object, ...], tuple[Dataset, Dataset] | str] | None = None  # last model: data/why not
        self._dp_rng = np.random.default_rng()  # local DP noise: seeded by the OS, never by the (public) task
        self._held: dict[str, tuple[int, dict[str, np.ndarray]]] = {}  # tier -> (version, weights received)
        # FedPer's own layers, each file within the cache bound; a file that does not load stops us here
        self.personal = PersonalLayers(config.cache_dir, self.cache.max_bytes)
        self._unstorable: set[str] = set()  # artifacts of the current task that do not fit the cache bound
        self._new_asks: queue.SimpleQueue[_Ask] = queue.SimpleQueue()  # from ask_tier's callers, for the loop
        self._asked: dict[str, _Ask] = {}  # the loop's: catalogue request msg_id -> its ask, until answered
        self._answered: collections.deque[tuple[_Ask, Catalogue]] = collections.deque()
        self._said_hello = False
        # shared with the thread that stops the agent
        self._closing = threading.Event()  # stopping: take no new task
        self._commit_lock = threading.Lock()  # a task's results go out whole, or not once abandoned
        self._abandoned = False
        self._current: Task | None = None  # the task the loop is on, until its results are committed
        if config.fleet_keys is not None and (SecureClient is None or self.key is None):
            raise ValueError("--fleet-keys needs the cryptography package (pip install 'tierfl[signing]')")

        def secure_client() -> SecureClient | None:
            return SecureClient(config.device_id, self._send_secagg, self.key.private_key if self.key else None,
                                config.fleet_keys, refuse=lambda reason, detail: self._refuse(
                                    reason, detail, config.aggregator_id)) if SecureClient else None

        self.secure = secure_client()  # secure rounds
        self.secure_queries = secure_client()  # secure analytics queries: their own sessions, beside a secure round's
        self.receipt = Receipt(self.topics.down(config.device_id), config.fleet, config.aggregator_id, self.trust,
                               secure=self.secure is not None, refuse=self._refuse,
                               deliver=self.inbox.put)
        self.link = MqttLink(
            config.broker,
            client_id=f"tierfl-{config.fleet}-{config.device_id}",
            subscriptions=[self.topics.down(config.device_id)],
            on_frame=self._on_frame,
            on_bad_frame=self.receipt.on_bad_frame,
            on_connect=lambda: self.inbox.put(Connected()),
            will=Will(self.topics.status(config.device_id), self._will),  # signed afresh at each (re)connect
            max_message_bytes=config.max_message_bytes,
            backoff=Backoff(first_s=1.0, max_s=config.reconnect_max_s),
        )

    def run(self, stop: threading.Event) -> None:
        """Connect (retrying until the broker answers), train tasks as they come until `stop` is set, then leave.

        Leaving gives the task in training `stop_grace_s` to finish and send its update, abandons it
        otherwise, publishes this device's offline status and disconnects.
        """
        timeout = self.config.connect_timeout_s
        if not self.link.start(timeout_s=min(10.0, timeout) if timeout else 10.0, retry_for_s=timeout, stop=stop):
            log.info("stopped before the broker answered")
            return
        loop = threading.Thread(target=self._loop, name="tierfl-device-loop", daemon=True)
        loop.start()
        try:
            stop.wait()
        finally:
            self._leave(loop)

    def _leave(self, loop: threading.Thread) -> None:
        """Stop taking tasks, let the current one finish within the grace period or abandon it, go offline."""
        self._closing.set()
        self.inbox.wake()  # a task waiting for artifacts gives up
        if (busy := self._current) is not None:
            ends_in = busy.deadline - self.config.send_margin_s - time.time()
            log.info("stopping: round %d is in progress and ends in %.0f s at the latest; %s", busy.round, ends_in,
                     "finishing it" if ends_in <= self.config.stop_grace_s else
                     f"waiting up to {self.config.stop_grace_s:.0f} s for it to finish, then abandoning it")
        loop.join(self.config.stop_grace_s)
        with self._commit_lock:
            self._abandoned = True
            left = self._current
        if left is not None:
            log.warning("stopping: abandoned round %d (not finished within %.0f s); nothing of it was sent or saved",
                        left.round, self.config.stop_grace_s)
        self.inbox.close()
        for ask in [*self._asked.values(), *(ask for ask, _ in self._answered)]:
            ask.result.cancel()
        while not self._new_asks.empty():
            self._new_asks.get().result.cancel()
        self._publish(self.topics.status(self.config.device_id), Status(online=False, session=self.session), retain=True)
        self.link.stop(flush_timeout_s=5.0)

    def _commit(self, send: Callable[[], None]) -> None:
        """Run `send` (a task's results: saved state and messages) unless the agent abandoned the task."""
        with self._commit_lock:
            if not self._abandoned:
                send()
                self._current = None

    def _will(self) -> bytes:
        """Our offline status as the broker will publish it if we vanish: signed now, so newer than any earlier will
        (and than this connection's hellos, stamped just before)."""
        self._hello_at = time.time()
        return self._frame(Status(online=False, session=self.session))

    # -- network thread ---------------------------------------------------------------------

    def _on_frame(self, topic: str, data: bytes) -> None:
        """A reassembled downlink frame: checked, and queued for the device loop if it passes (edge_client.receipt)."""
        self.receipt.on_frame(topic, data)

    def _refuse(self, reason: RejectReason, detail: str, sender: str | None = None) -> None:
        """Count a refusal; log it unless one of the same sender and reason was logged within the interval."""
        with self._refusal_lock:
            self.refused[reason.value] += 1
            logged = self._refusal_log.should_log(sender, reason, time.monotonic())
            more = self._refusal_log.suppressed(sender, reason) if logged else 0
        if logged:
            log.warning("refused a message: %s: %s%s", reason.value, detail,
                        f" (and {more} more like it unlogged since the last such line)" if more else "")

    # -- device loop ------------------------------------------------------------------------

    def ask_tier(self, tier: str, timeout_s: float) -> Future[Path]:
        """From any thread while `run` serves: the folder of tier `tier` in the cache, fetched and checked as a task's
        files are (its files named by the aggregator's signed Catalogue); fails with TaskRefused when refused (by the
        aggregator, e.g. unknown_tier, or here), TaskSkipped when the files did not arrive within `timeout_s`."""
        ask = _Ask(tier, time.time() + timeout_s)
        self._new_asks.put(ask)
        self.inbox.wake()
        return ask.result

    def _loop(self) -> None:
        """Serve the inbox and carry out the tasks taken, one at a time, until closing."""
        while not self._closing.is_set():
            self._send_asks()
            if self._queries:
                self._answer_next_query()
            elif self._tasks:
                self._carry_out_next()
            elif self._answered:
                self._fetch_answered()
            else:
                self._serve(SERVE_S)

    def _send_asks(self) -> None:
        """Send the catalogue requests asked for (once we said hello); give up those past their time."""
        now = time.time()
        for msg_id, ask in list(self._asked.items()):
            if now > ask.until:
                del self._asked[msg_id]
                _settle(ask.result, TaskSkipped(f"no catalogue of tier {ask.tier} arrived in time"))
        while self._said_hello and not self._new_asks.empty():
            self._ask(self._new_asks.get())

    def _ask(self, ask: _Ask) -> None:
        """Publish one catalogue request; its answer (or refusal) names the request's msg_id."""
        ask.tries += 1
        frame = self._frame(CatalogueRequest(tier=ask.tier))
        self._asked[read_header(frame).header.msg_id] = ask
        self.link.publish(self.topics.up(self.config.device_id), frame)
        log.info("asked the aggregator for the files of tier %s", ask.tier)

    def _on_catalogue(self, catalogue: Catalogue, sender: str) -> None:
        """A checked catalogue: queued for fetching if it answers a request of ours (for that tier), else refused."""
        ask = self._asked.get(catalogue.request)
        if ask is None or ask.tier != catalogue.tier:
            self._refuse(RejectReason.REPLAYED, f"a catalogue of tier {catalogue.tier} answering no request of ours "
                         f"({catalogue.request})", sender)
            return
        del self._asked[catalogue.request]
        self._answered.append((ask, catalogue))

    def _on_refused_ask(self, reject: Reject) -> None:
        """The aggregator refused a catalogue request of ours: asked again after a hello when it did not know us
        yet, else the ask fails with the refusal."""
        ask = self._asked.pop(reject.ref_msg_id or "", None)
        if ask is None:
            return
        if reject.reason is RejectReason.UNKNOWN_DEVICE and ask.tries < MAX_ASK_TRIES:
            self._ask(ask)  # after the hello _handle sends
        else:
            _settle(ask.result, TaskRefused(reject.reason, reject.detail))

    def _fetch_answered(self) -> None:
        """Fetch and check the files of the oldest catalogue answered, through the task's stages."""
        ask, catalogue = self._answered.popleft()
        what = f"tier {catalogue.tier}"
        try:
            self._get_files(catalogue, ask.until, what)
            folder = self.cache.tier_folder(catalogue.artifacts, key=catalogue.manifest_sha256)
        except TaskRefused as exc:
            self._refuse(exc.reason, f"the catalogue of {what}: {exc.detail}", self.config.aggregator_id)
            _settle(ask.result, exc)
        except Exception as exc:  # TaskSkipped (said why), or a bug: the ask fails, never the agent
            _settle(ask.result, exc)
        else:
            _settle(ask.result, folder)

    def _serve(self, timeout: float) -> None:
        """Act on the next inbox item (waiting up to `timeout` for one), then report what the inbox dropped."""
        item = self.inbox.get(timeout)
        if item is not None:
            try:
                self._handle(item)
            except Exception as exc:  # the last resort: no message may stop the loop
                log.exception("internal error while handling a downlink message")
                self._refuse(RejectReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:500], self.config.aggregator_id)
        if dropped := self.inbox.take_dropped():
            self._refuse(RejectReason.RATE_LIMITED, f"{dropped} downlink frames dropped: the device loop's inbox was full",
                         self.config.aggregator_id)

    def _serve_until(self, done: Callable[[], bool], until: float = math.inf) -> None:
        """Serve the inbox until `done()` or the wall-clock time `until`."""
        while not done() and (left := until - time.time()) > 0:
            self._serve(min(SERVE_S, left))

    def _handle(self, item: Downlink) -> None:
        """Act on one checked downlink frame (or a connect)."""
        if isinstance(item, Connected):
            self._announce()
            return
        body = item.body
        if isinstance(body, Task) and not self.trains:
            log.info("round %d (tier %s): not training (this agent only fetches files)", body.round, body.tier)
        elif isinstance(body, Task):
            if isinstance(body, TrainTask) and body.secure is not None and self.secure is not None:
                if not self.secure.on_task(body):  # settings checked, keys out at once; refused: never queued, not trained
                    return
            self._tasks.append(item)
        elif isinstance(body, Query):
            if body.secure is not None and (self.secure_queries is None or not self.secure_queries.on_task(body)):
                return  # its settings were refused (said why): not answered
            self._queries.append(item)
        elif isinstance(body, SecAgg) and self.secure_queries is not None and self.secure_queries.owns(body.session):
            self.secure_queries.on_message(body)
        elif isinstance(body, SecAgg) and self.secure is not None:
            self.secure.on_message(body)
        elif isinstance(body, Blob):
            self._store_blob(body, item)
        elif isinstance(body, Catalogue):
            self._on_catalogue(body, item.header.sender)
        elif isinstance(body, Reject):
            with self._refusal_lock:  # the network thread counts its refusals beside these
                self.refused[f"by-aggregator:{body.reason.value}"] += 1
            log.warning("aggregator refused our message%s: %s: %s", f" of round {body.round}" if body.round is not None else "",
                        body.reason.value, body.detail)
            if body.reason is RejectReason.UNKNOWN_DEVICE:
                self._announce()
            if (decline := self._sent_updates.refused(body)) is not None:
                self._send_decline(decline, "its update was refused")
            self._on_refused_ask(body)

    def _announce(self) -> None:
        """Publish our hello as the retained status of this device (online, tier, data sizes, versions held)."""
        me = self.config.device_id
        hello = Hello(
            tier=self.config.tier,
            num_samples=len(self.train_data),
            num_test_samples=len(self.test_data),
            backend=self.config.backend,
            holds={tier: version for tier, (version, _) in self._held.items()},
            seconds_per_sample=self.config.seconds_per_sample,
            session=self.session,
        )
        frame = encode_frame(self.config.fleet, me, hello, signer=self.key.sign if self.key else None,
                             sent_at=self._hello_at)  # no later than this connection's will
        self.link.publish(self.topics.status(me), frame, retain=True)  # retained: a restarted aggregator sees it
        self._said_hello = True
        log.info("announced %s: %d train / %d test samples", me, len(self.train_data), len(self.test_data))

    def _store_blob(self, blob: Blob, frame: Frame) -> None:
        """Cache an artifact file the aggregator sent; BAD_HASH when its bytes are not the named file's."""
        try:
            store_blob(self.cache, blob, frame.tensors)
        except ArtifactTooLarge as exc:
            log.error("cannot cache %s: %s; raise --cache-max-mb", blob.name, exc)
            self._unstorable.add(blob.sha256)
        except TaskRefused as exc:
            self._refuse(exc.reason, exc.detail, frame.header.sender)

    def _off_loop(self, work: Callable[[], T]) -> T:
        """`work()` run on a helper thread while the loop serves the inbox: its result, or its exception raised here."""
        results: list[T] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                results.append(work())
            except BaseException as exc:  # handed back to the loop, which raises it as its own
                errors.append(exc)
            self.inbox.wake()

        threading.Thread(target=run, name="tierfl-compute", daemon=True).start()
        self._serve_until(lambda: bool(results or errors))
        if errors:
            raise errors[0]
        return results[0]

    # -- analytics queries ------------------------------------------------------------------

    def _answer_next_query(self) -> None:
        """Answer the oldest analytics query taken (edge_client.analytics); one that cannot be answered is refused
        (or, past its deadline or while stopping, let go) and the agent goes on."""
        frame = self._queries.popleft()
        query: Query = frame.body  # type: ignore[assignment]
        what = f"query {query.round} ({query.computation})"
        try:
            if time.time() > query.deadline:
                raise TaskSkipped(f"{what}: deadline passed before it was answered")
            data = self.train_data if query.split == "train" else self.test_data
            tier = None
            if query.files is None:
                tensors = data_answer(query, data, self.data_name)
            else:
                manifest = self._get_files(query.files, query.deadline, what)
                weights = checked_weights(frame.tensors, manifest)
                folder = self.cache.tier_folder(query.files.artifacts, key=query.files.manifest_sha256)
                tensors = self._off_loop(lambda: model_answer(query, folder, weights, data, self.data_name,
                                                              self.config.threads))
                tier = query.files.tier
        except TaskSkipped as exc:
            log.info("%s let go: %s", what, exc or "see above")
            return
        except TaskRefused as exc:
            self._refuse(exc.reason, f"{what}: {exc.detail}", frame.header.sender)
            return
        except ValueError as exc:  # data that does not fit the model, weights that are not the tier's
            self._refuse(RejectReason.BAD_TENSOR, f"{what}: {exc}", frame.header.sender)
            return
        except Exception as exc:  # a bug: this query only, never the agent
            log.exception("%s failed", what)
            self._refuse(RejectReason.INTERNAL_ERROR, f"{what}: {type(exc).__name__}: {exc}", frame.header.sender)
            return
        if query.secure is not None and self.secure_queries is not None:
            self.secure_queries.trained(query, tensors, None)  # masked and sent once the share delivery is in
            return
        self._send_answer(query, Answer(query=query.query, tier=tier, num_samples=len(data)), tensors)

    def _send_answer(self, query: Query, body: Answer, tensors: dict[str, np.ndarray]) -> None:
        """Publish one query's answer."""
        sent = self._publish(self.topics.up(self.config.device_id), body, tensors)
        log.info("query %d (%s): answered on %d samples (%d bytes)", query.round, query.computation,
                 body.num_samples, sent)

    # -- the task pipeline ------------------------------------------------------------------

    def _carry_out_next(self) -> None:
        """Carry out the oldest task taken; one that fails is refused (or logged) and abandoned, the agent goes on."""
        frame = self._tasks.popleft()
        task: Task = frame.body  # type: ignore[assignment]
        self._current = task
        try:
            self._run_task(frame)
        except TaskSkipped:
            pass  # the stage that let it go said why
        except TaskRefused as exc:
            self._refuse(exc.reason, f"round {task.round} (tier {task.tier}) abandoned: {exc.detail}", frame.header.sender)
            if isinstance(exc, TrainingDiverged) and isinstance(task, TrainTask) and task.secure is None:
                self._send_decline(declined_task(task, len(self.train_data)), "its training diverged")
        except Exception as exc:  # a bug or an input nothing else caught: this task only, never the agent
            log.exception("round %d (tier %s): the task failed and is abandoned", task.round, task.tier)
            self._refuse(RejectReason.INTERNAL_ERROR, f"round {task.round}: {type(exc).__name__}: {exc}",
                         frame.header.sender)
        finally:
            with self._commit_lock:
                self._current = None

    def _run_task(self, frame: Frame) -> None:
        """One task, stage by stage; TaskRefused (nothing of it kept) when it cannot be done as sent."""
        task: Task = frame.body  # type: ignore[assignment]
        self._check_wanted(task)
        manifest = self._get_files(task, task.deadline, f"round {task.round}")
        train, test = self._fit_data(task, manifest)
        held = self._get_weights(task, frame.tensors, manifest)
        received, control = split_control(held)  # SCAFFOLD: the server's c, when the task carries it
        if isinstance(task, MeasureBnStatistics):
            self._load_tier(task, manifest, received, held)
            self._send_bn_statistics(task, received, train)
            return
        start = self._personal_start(task, manifest, received)
        trainer = self._load_tier(task, manifest, start, held)
        before = self._evaluate(task, trainer, test)
        variate = self._variate(task, manifest, control)
        delta, stats = self._train(task, trainer, start, train, variate)
        kept = self._personal_trained(task, manifest, trainer)
        after = self._finetune(task, trainer, start, train, test)
        if task.secure is not None and self.secure is not None:
            self._hand_to_secure(task, delta, before)
            return
        self._encode_and_send(task, start, delta, stats, before, after, (manifest.model.name, kept), variate)

    def _check_wanted(self, task: Task) -> None:
        """Stage 1: TaskSkipped when a newer task is waiting or the deadline has passed."""
        if self._tasks:
            log.info("round %d superseded by a newer task; skipping it", task.round)
            raise TaskSkipped
        if time.time() > task.deadline:
            log.info("round %d: deadline already passed, skipping", task.round)
            raise TaskSkipped

    def _get_files(self, task: TierFiles, until: float, what: str) -> TierManifest:
        """Stage 2: the tier's manifest, once the artifact files a task (or a catalogue) names are all cached, by
        `until`, and checked (onnx_guard); `what` names the task in the log."""
        self.cache.use(task.artifacts.values())  # this tier's files stay cached while it is ours
        self._unstorable.clear()  # what did not fit beside another task's files may fit beside this one's
        if not self._fetch_artifacts(task, until, what):
            raise TaskSkipped
        return self._checked_tier(task)

    def _fetch_artifacts(self, task: TierFiles, until: float, what: str) -> bool:
        """True once the task's artifact files are all cached; False (and why, in the log) if they will not be.

        The manifest comes first: TaskRefused when the task's files are not the manifest's, or
        together exceed the cache bound; then the rest is fetched.
        """
        if not self._fetch(task, {"manifest.json": task.manifest_sha256}, until, what):
            return False
        check_manifest(task, self.cache.read(task.manifest_sha256), self.cache.max_bytes)
        return self._fetch(task, task.artifacts, until, what)

    def _fetch(self, task: TierFiles, wanted: Mapping[str, str], until: float, what: str) -> bool:
        """True once `wanted` (name -> sha256) is cached, serving the inbox while the blobs arrive; False when it will
        not be (`until` passed, newer task, stopping, too large for the cache)."""
        missing = self.cache.missing(wanted)
        if not missing:
            return True
        log.info("%s: fetching %d artifact files of tier %s", what, len(missing), task.tier)
        self._publish(self.topics.up(self.config.device_id), Fetch(sha256=missing))
        hashes = set(wanted.values())
        self._serve_until(lambda: self._closing.is_set() or bool(hashes & self._unstorable) or bool(self._tasks)
                          or not self.cache.missing(wanted), until=until)
        if not self.cache.missing(wanted):
            return True
        if hashes & self._unstorable:
            log.error("%s: tier %s has artifacts that do not fit the cache bound; skipping", what, task.tier)
        elif self._tasks:
            log.info("%s superseded by a newer task while fetching; skipping it", what)
        elif not self._closing.is_set():
            log.warning("%s: artifacts did not arrive in time", what)
        return False

    def _checked_tier(self, task: TierFiles) -> TierManifest:
        """The tier's manifest, once its folder is laid out and every ONNX file in it passed onnx_guard."""
        manifest = self._manifests.get(task.manifest_sha256)
        if manifest is None:
            folder = self.cache.tier_folder(task.artifacts, key=task.manifest_sha256)
            try:
                check_onnx_folder(folder)
            except OnnxRefused as exc:
                raise TaskRefused(RejectReason.UNKNOWN_ARTIFACT, f"refusing to load {exc}") from None
            manifest = TierManifest.load(folder / "manifest.json")
            self._manifests[task.manifest_sha256] = manifest
        return manifest

    def _fit_data(self, task: Task, manifest: TierManifest) -> tuple[Dataset, Dataset]:
        """Stage 2b: our train and test data shaped for the tier's model (models.data.fit_split); TaskSkipped when
        they do not fit its input or classes, the reason logged once per model (each later task in one line)."""
        model = manifest.model
        key = (model.name, tuple(model.input_shape), model.num_classes)
        if self._fitted is None or self._fitted[0] != key:
            try:
                fitted: tuple[Dataset, Dataset] | str = fit_split(self.train_data, self.test_data, model.input_shape,
                                                                  model.num_classes, self.data_name)
            except ValueError as exc:
                fitted = str(exc)
                log.error("round %d (tier %s): skipped, this device's data does not fit model %s: %s",
                          task.round, task.tier, model.name, exc)
            self._fitted = (key, fitted)
        elif isinstance(self._fitted[1], str):
            log.info("round %d (tier %s): skipped, this device's data does not fit model %s (said above)",
                     task.round, task.tier, model.name)
        fitted = self._fitted[1]
        if isinstance(fitted, str):
            raise TaskSkipped(fitted)
        return fitted

    def _get_weights(self, task: Task, tensors: Mapping[str, Tensor], manifest: TierManifest) -> dict[str, np.ndarray]:
        """Stage 3: the task's weights, as sent or as the held version plus the sent delta.

        TaskRefused unless every tensor is float32 of a name and shape of the tier's manifest
        (all of them when not a delta) and the weights are finite; TaskSkipped when the delta is
        against a version we do not hold (the hello we send again says what we hold).
        """
        try:
            return task_weights(task, tensors, manifest, self._held.get(task.tier))
        except NotHeld as exc:
            self._refuse(RejectReason.WRONG_VERSION, str(exc), self.config.aggregator_id)
            self._held.pop(task.tier, None)
            self._announce()
            raise TaskSkipped from None

    def _personal_start(self, task: TrainTask, manifest: TierManifest, received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stage 3b: the weights to train, `received` with our own copy of the task's personal layers (FedPer; fitted
        to this tier, from the global values the first time: edge_client.personal); TaskRefused when the task names a
        layer the tier does not have."""
        if not task.personal_layers:
            return received
        if unknown := sorted(set(task.personal_layers) - set(received)):
            raise TaskRefused(RejectReason.BAD_TENSOR, f"personal layers {unknown[:8]} are not parameters of tier {task.tier}")
        return self.personal.start(manifest.model.name, task.personal_layers, received)

    def _load_tier(self, task: Task, manifest: TierManifest, start: dict[str, np.ndarray],
                   received: dict[str, np.ndarray]) -> Trainer:
        """Stage 4: the tier's trainer holding `start`; we now hold `received` as the task's version (a later task's
        delta applies to it); TaskSkipped if the tier does not load."""
        trainer = self._trainers.get(task.manifest_sha256)
        try:
            if trainer is None:
                folder = self.cache.tier_folder(task.artifacts, key=task.manifest_sha256)
                trainer = self._off_loop(lambda: open_trainer(self.config.backend, folder, manifest,
                                                              threads=self.config.threads))
                self._trainers[task.manifest_sha256] = trainer
            opened = trainer
            self._off_loop(lambda: opened.set_weights(start))
        except (ValueError, OSError) as exc:
            log.error("round %d: cannot load tier %s: %s", task.round, task.tier, exc)
            raise TaskSkipped from None
        self._held[task.tier] = (task.model_version, received)
        return trainer

    def _evaluate(self, task: TrainTask, trainer: Trainer, test: Dataset) -> EvalStats | None:
        """Stage 5: the received model on our test data (`test`, fitted to it), when the task asks and we have some."""
        if not (task.evaluate and len(test)):
            return None
        return self._off_loop(lambda: trainer.evaluate(test))

    def _variate(self, task: TrainTask, manifest: TierManifest, control: dict[str, np.ndarray]) -> Variate | None:
        """Stage 5b (SCAFFOLD, a task that carries the server's c): this tier's c_i with that c; None otherwise.
        TaskRefused when the tier trains with another optimizer than plain SGD."""
        return task_variate(task, manifest, control, self.config.cache_dir, self._variates)

    def _train(self, task: TrainTask, trainer: Trainer, start: Mapping[str, np.ndarray],
               train: Dataset, variate: Variate | None) -> tuple[dict[str, np.ndarray], TrainStats]:
        """Stage 6: train on `train` (fitted to the model) until the epochs are done or the send margin is reached;
        the update (new - start of every parameter but the personal layers, privatized when the task asks for local
        DP; with SCAFFOLD's `variate`, each step corrected by c - c_i and delta c_i kept in it, never sent)
        and the training's statistics. TaskRefused when training diverged."""
        seed = task.seed ^ zlib.crc32(self.config.device_id.encode())
        log.info("round %d: training tier %s (%d epochs, %.0f s to the deadline)",
                 task.round, task.tier, task.epochs, task.deadline - time.time())
        stats = self._off_loop(lambda: trainer.train(
            train, task.epochs, task.batch_size, task.learning_rate, seed, task.mask_classes,
            proximal_mu=task.proximal_mu, stop_at=task.deadline - self.config.send_margin_s,
            correction=variate.correction() if variate else None, logit_adjust=task.logit_adjust))
        try:
            delta = trained_delta(trainer.get_weights(), start, stats.loss)
            if variate:
                variate.change(delta, stats.steps, task.learning_rate)  # committed when the update is sent
            delta = {name: value for name, value in delta.items() if name not in task.personal_layers}  # never sent
        except TaskRefused:
            self._trainers.pop(task.manifest_sha256, None)  # its weights and optimizer state are spoilt
            raise
        if task.dp_noise > 0:  # local differential privacy: clip and noise before anything leaves the device
            delta = privatize(delta, task.dp_clip, task.dp_noise, self._dp_rng)
        return delta, stats

    def _personal_trained(self, task: TrainTask, manifest: TierManifest, trainer: Trainer) -> dict[str, np.ndarray]:
        """Stage 6b: our new copy of the personal layers as training left them (saved when the update is sent)."""
        if not task.personal_layers:
            return {}
        trained = {name: value for name, value in trainer.get_weights().items() if name in task.personal_layers}
        return self.personal.trained(manifest.model.name, trained)  # finite: trained_delta checked every parameter

    def _finetune(self, task: TrainTask, trainer: Trainer, start: Mapping[str, np.ndarray], train: Dataset,
                  test: Dataset) -> EvalStats | None:
        """Stage 6c (--personalize finetune:K): our test split after K local steps from the round's starting weights
        (the model `before` measured), once the update is taken from the trainer; never sent. None when not asked or
        without test data."""
        if not (task.finetune_steps and len(test)):
            return None
        seed = task.seed ^ zlib.crc32(self.config.device_id.encode())
        after = self._off_loop(lambda: finetune(trainer, start, train, test, task.finetune_steps, task.batch_size,
                                                task.learning_rate, seed, task.mask_classes,
                                                stop_at=task.deadline - self.config.send_margin_s))
        log.info("round %d: after %d fine-tuning steps, accuracy %.3f on %d local test samples", task.round,
                 task.finetune_steps, after.accuracy, after.samples)
        return after

    def _hand_to_secure(self, task: TrainTask, delta: dict[str, np.ndarray], before: EvalStats | None) -> None:
        """Stage 7 of a secure task: the delta goes to its session, masked and sent once the shares are in."""
        secure = self.secure
        assert secure is not None

        def hand_over() -> None:
            secure.trained(task, delta, before)
            self.tasks_done += 1

        self._commit(hand_over)

    def _encode_and_send(self, task: TrainTask, start: Mapping[str, np.ndarray], delta: dict[str, np.ndarray],
                         stats: TrainStats, before: EvalStats | None, after: EvalStats | None,
                         personal: tuple[str, dict[str, np.ndarray]], variate: Variate | None) -> None:
        """Stage 7: encode the update with the configured codec (error feedback and selective upload around it) and
        send it; the residual, our personal layers (`personal`: model name, layers) and SCAFFOLD's c_i + delta c_i
        (`variate`) are saved with it."""
        shared = {name: value for name, value in start.items() if name in delta}
        feedback = self._feedback_for(task.tier)
        encoded = encode_update(self.config.fleet, self.config.device_id, task, delta, shared, stats, before,
                                len(self.train_data), self.config.codec, feedback, self.key.sign if self.key else None,
                                after=after)
        unchanged = encoded.unchanged
        model, layers = personal

        def send() -> None:
            residual_change = encoded.sent()
            if layers:
                self.personal.save(model, layers)
            if variate:
                variate.commit()
            self._sent_updates.sent(read_header(encoded.frame).header.msg_id, encoded.update, variate, feedback,
                                    residual_change)
            published = self.link.publish(self.topics.up(self.config.device_id), encoded.frame)
            self.tasks_done += 1
            log.info(
                "round %d: %d steps in %.2f s, loss %.4f, acc %.3f; sent %d bytes%s",
                task.round, stats.steps, stats.seconds, stats.loss, stats.accuracy, published,
                " (unchanged: below the upload threshold)" if unchanged else "",
            )

        self._commit(send)

    def _send_decline(self, decline: Update, why: str) -> None:
        """Tell the aggregator we have no result for a task (`why`), so its round waits no more for us."""
        self._publish(self.topics.up(self.config.device_id), decline)
        log.info("round %d: declined (%s)", decline.round, why)

    def _send_bn_statistics(self, task: MeasureBnStatistics, weights: dict[str, np.ndarray], train: Dataset) -> None:
        """Stage 5 of a statistics task: measure the batch-norm statistics of `weights` on our training data (`train`,
        fitted to the model), send them."""
        folder = self.cache.tier_folder(task.artifacts, key=task.manifest_sha256)
        statistics = self._off_loop(lambda: measure_bn_statistics(folder / STATISTICS_FILE, weights, train,
                                                                  threads=self.config.threads))
        body = BnStatistics(round=task.round, base_version=task.model_version, tier=task.tier, num_samples=len(self.train_data))

        def send() -> None:
            sent = self._publish(self.topics.up(self.config.device_id), body, statistics)
            log.info("round %d: sent batch-norm statistics of %d layers (%d bytes)", task.round, len(statistics) // 2, sent)

        self._commit(send)

    def _feedback_for(self, tier: str) -> ErrorFeedback | None:
        """The tier's error-feedback state; None when updates travel lossless and always."""
        if self.config.codec == "float32" and self.config.skip_below == 0:
            return None
        if tier not in self._feedback:
            self._feedback[tier] = ErrorFeedback(self.config.cache_dir, tier, self.config.skip_below)
        return self._feedback[tier]

    # -- sending ----------------------------------------------------------------------------

    def _send_secagg(self, body: SecAgg, tensors: Mapping[str, np.ndarray] | None) -> int:
        """Publish one secure-aggregation message (a masked input's ring integers as raw uint8 tensors)."""
        frame = encode_frame(self.config.fleet, self.config.device_id, body, tensors, "uint8",
                             signer=self.key.sign if self.key else None)
        return self.link.publish(self.topics.up(self.config.device_id), frame)

    def _frame(self, body: Body, tensors: dict[str, np.ndarray] | None = None) -> bytes:
        return encode_frame(self.config.fleet, self.config.device_id, body, tensors, signer=self.key.sign if self.key else None)

    def _publish(self, topic: str, body: Body, tensors: dict[str, np.ndarray] | None = None, retain: bool = False) -> int:
        return self.link.publish(topic, self._frame(body, tensors), retain=retain)


def _settle(result: Future[Path], outcome: Path | BaseException) -> None:
    """Settle an ask's future, unless its caller gave up on it (cancelled) already."""
    if result.set_running_or_notify_cancel():
        if isinstance(outcome, BaseException):
            result.set_exception(outcome)
        else:
            result.set_result(outcome)
