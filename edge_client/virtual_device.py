"""One virtual device of `tierfl fleet`: a real MQTT client with its own id, key, shard, cache and residual.

To the aggregator it is `tierfl client`: the same signed hello (stamped before the connection's
signed last will), the same downlink checks (edge_client.receipt, pinning the aggregator's key on
first use), artifact files fetched into its own cache (edge_client.cache) and checked against the
task's manifest (edge_client.stages), the task's weights checked against the tier (or a delta
against the version it holds), its update trained on its own shard and encoded with the codec,
error feedback and signature of edge_client.stages.

What differs is how it runs. Its network side is driven by the fleet's one network loop
(edge_client.netloop): the link's callbacks (chunk reassembly within its budgets) and every publish
run on that thread. Everything else runs as an actor on the fleet's bounded pool of workers: each
reassembled frame goes into a bounded mailbox (items and bytes), and at most one worker at a time
takes them, in order, running the receipt's checks (signature, payload hash, decoding) and then the
device's work; so the network thread stays free for sockets however many frames arrive.
Training borrows the fleet's shared ONNX Runtime session of the tier (weights loaded per task). The
time a device of its speed would take is simulated around the real training: the update is sent when
the device would have finished and its bytes crossed its uplink, and a device that drops out
during a task vanishes (the broker publishes its will) and comes back later without sending it.
Secure aggregation is not simulated: a secure task is refused on receipt, as by a device without
the cryptography package. Nor is personalization: a task naming personal layers (--personal-layers)
is refused on receipt (its update would carry them), and --personalize's fine-tune is not measured.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_client.cache import ArtifactCache, ArtifactTooLarge
from edge_client.compression import ErrorFeedback
from edge_client.declines import SentUpdates, declined_task
from edge_client.fleet_trace import Behaviour, Dropout
from edge_client.privacy import privatize
from edge_client.receipt import Receipt
from edge_client.scaffold import ControlVariate
from edge_client.stages import (NotHeld, TaskRefused, TaskSkipped, TrainingDiverged, check_manifest, encode_update,
                                store_blob, task_variate, task_weights, trained_delta)
from models.data import Dataset, fit_split
from models.manifest import TierManifest
from protocol.control import split_control
from protocol.frame import Frame, encode_frame, read_header
from protocol.messages import (Blob, BnStatistics, Body, Catalogue, Fetch, Hello, MeasureBnStatistics, Reject,
                               RejectReason, Status, Task, TrainTask, new_id)
from protocol.mqtt.link import Backoff, MqttLink, Will
from protocol.signing import DeviceKey
from protocol.topics import Topics
from protocol.trust import AggregatorTrust

if TYPE_CHECKING:
    from edge_client.fleet import FleetRuntime

log = logging.getLogger(__name__)
MAILBOX_ITEMS = 256  # downlink items waiting for the device's worker; more are dropped and counted (rate_limited)
MAILBOX_BYTES = 8 << 20  # and their bytes (any one frame fits an empty mailbox)
POOL = ".pool"  # the fleet's shared blob folder under the cache root: each artifact on disk once (ArtifactCache)


@dataclass(frozen=True)
class _Connected:
    """The link (re)connected: say hello."""


@dataclass(frozen=True)
class _Received:
    """A reassembled downlink frame, not checked yet."""

    topic: str
    data: bytes


class VirtualDevice:
    """One device of a virtual fleet (see the module docstring)."""

    def __init__(self, runtime: FleetRuntime, behaviour: Behaviour, train: Dataset, test: Dataset,
                 key: DeviceKey | None) -> None:
        self.runtime = runtime
        self.behaviour = behaviour
        self.id = behaviour.id
        self.train_data, self.test_data = train, test
        settings = runtime.settings
        self.topics = Topics(settings.fleet)
        self.cache_dir = settings.cache_root / self.id
        self.cache = ArtifactCache(self.cache_dir, max_bytes=int(settings.cache_max_mb * 1e6), durable=False,
                                   pool=settings.cache_root / POOL)
        self.key = key
        self.trust = AggregatorTrust(self.cache_dir, settings.aggregator_key, verifiable=key is not None, durable=False)
        self.session = new_id()
        self._hello_at: float | None = None
        self._rng = np.random.default_rng([settings.seed, zlib.crc32(self.id.encode())])
        self._dp_rng = np.random.default_rng()  # local DP noise: never seeded by anything public
        self.receipt = Receipt(self.topics.down(self.id), settings.fleet, settings.aggregator_id, self.trust,
                               secure=False, refuse=self._refuse, deliver=self._handle)
        self.link = MqttLink(
            settings.broker, client_id=f"tierfl-{settings.fleet}-{self.id}", subscriptions=[self.topics.down(self.id)],
            on_frame=lambda topic, data: self._deliver(_Received(topic, data)), on_bad_frame=self.receipt.on_bad_frame,
            on_connect=lambda: self._deliver(_Connected()), on_disconnect=self._on_disconnect,
            will=Will(self.topics.status(self.id), self._will), max_message_bytes=settings.max_message_bytes,
            backoff=Backoff(first_s=1.0, max_s=settings.reconnect_max_s), send_wait_s=0.0)
        # the actor's state (one worker at a time)
        self._mailbox: collections.deque[_Received | _Connected] = collections.deque()
        self._mail_bytes = 0
        self._mail_lock = threading.Lock()
        self._scheduled = False
        self._task: Frame | None = None  # the task waiting for its files
        self._asked: set[str] = set()  # artifact hashes fetched for that task
        self._held: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        self._feedback: dict[str, ErrorFeedback] = {}
        self._variates: dict[str, ControlVariate] = {}  # manifest sha256 -> SCAFFOLD's c_i of that tier
        self._sent_updates = SentUpdates()  # updates sent, answered with a decline if refused
        self._fitted: tuple[tuple[object, ...], tuple[Dataset, Dataset] | str] | None = None
        self._busy_until = 0.0  # monotonic time the simulated device finishes the training it is doing
        # the network loop's state
        self.wants_online = False
        self._failures = 0
        self._opened = False
        self._backoff_rng = random.Random(zlib.crc32(self.id.encode()))  # the reconnect delays' jitter
        self._generation = 0  # bumped at each dropout: sends scheduled before it are not made
        self._dropped_round: int | None = None  # the last round this device dropped out of (a resent task is of it)

    # -- the network loop's thread --------------------------------------------------------------

    def go_online(self) -> None:
        """Connect (on the loop's thread); a failure is retried with back-off."""
        if not self._opened:
            self.runtime.loop.attach(self.link.client)
        self.wants_online = True
        try:
            if self._opened:
                self.link.reopen()
            else:
                self._opened = True  # paho knows the broker's address from here on, even if this attempt fails
                self.link.open()
        except OSError as exc:
            self._failures += 1
            delay = self.link.backoff.delay(self._failures, self._backoff_rng)
            log.debug("%s: cannot reach the broker (%s); next attempt in %.1f s", self.id, exc, delay)
            self.runtime.loop.call_later(delay, self._retry)
            return
        self._failures = 0

    def _retry(self) -> None:
        if self.wants_online and not self.link.client.is_connected():
            self.go_online()

    def go_offline(self) -> None:
        """Leave as a device switched off in order: offline status published, then a clean disconnect."""
        self.wants_online = False
        if self.link.client.is_connected():
            self._publish(self.topics.status(self.id), self._frame(Status(online=False, session=self.session)),
                          retain=True)
        self.link.stop()

    def vanish(self, away_s: float, counted: bool = True) -> None:
        """Drop out now (no DISCONNECT: the broker publishes the will), and come back after `away_s`; `counted` False:
        a dropout already counted (the same round's task, sent again after the device came back)."""
        self._generation += 1
        self.wants_online = False
        if counted:
            self.runtime.count("dropouts")
        self.link.vanish()
        self.runtime.loop.call_later(away_s, self._come_back)

    def _come_back(self) -> None:
        if self.runtime.online_now(self.behaviour):
            self.go_online()

    def _on_disconnect(self, delay: float | None) -> None:
        """From the link, on the loop's thread: connect again after the back-off delay if we did not mean to leave."""
        if delay is not None and self.wants_online:
            self.runtime.loop.call_later(delay, self._retry)

    def _will(self) -> bytes:
        """The offline status the broker publishes if we vanish: signed now, newer than this connection's hellos."""
        self._hello_at = time.time()
        return self._frame(Status(online=False, session=self.session))

    def _publish(self, topic: str, frame: bytes, retain: bool = False) -> int:
        """Publish on the loop's thread (now if we are on it)."""
        if self.runtime.loop.on_loop:
            sent = self.link.publish(topic, frame, retain=retain)
            self.runtime.count("messages_out")
            return sent
        self.runtime.loop.call_soon(lambda: self._publish(topic, frame, retain))
        return len(frame)

    # -- the loop's thread hands over, the actor (a worker) checks and acts ----------------------

    def _deliver(self, item: _Received | _Connected) -> None:
        """Queue a reassembled downlink frame (or a connect) for the device's worker, within the mailbox's bounds."""
        self.runtime.count("messages_in")
        size = len(item.data) if isinstance(item, _Received) else 0
        with self._mail_lock:
            if self._mailbox and (len(self._mailbox) >= MAILBOX_ITEMS or self._mail_bytes + size > MAILBOX_BYTES):
                dropped = True
            else:
                dropped = False
                self._mailbox.append(item)
                self._mail_bytes += size
                if self._scheduled:
                    return
                self._scheduled = True
        if dropped:
            self._refuse(RejectReason.RATE_LIMITED, "a downlink frame dropped: the device's mailbox is full", None)
            return
        self.runtime.workers.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._mail_lock:
                if not self._mailbox:
                    self._scheduled = False
                    return
                item = self._mailbox.popleft()
                self._mail_bytes -= len(item.data) if isinstance(item, _Received) else 0
            try:
                if isinstance(item, _Received):
                    self.receipt.on_frame(item.topic, item.data)  # checked here, on the actor; passes go to _handle
                else:
                    self._announce()
            except Exception as exc:  # the last resort: nothing a frame holds stops the device
                log.exception("%s: internal error while handling a downlink message", self.id)
                self._refuse(RejectReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:500],
                             self.runtime.settings.aggregator_id)

    def _refuse(self, reason: RejectReason, detail: str, sender: str | None = None) -> None:
        self.runtime.refuse(self.id, reason, detail, sender)

    # -- the actor -----------------------------------------------------------------------------------

    def _handle(self, item: Frame) -> None:
        """Act on one checked downlink frame (the receipt's delivery)."""
        body = item.body
        if isinstance(body, Task):
            self.runtime.count("tasks_taken")
            if isinstance(body, TrainTask) and body.personal_layers:  # its update would carry them, refused
                self._refuse(RejectReason.UNEXPECTED, f"round {body.round}: a virtual device keeps no personal layers "
                             f"({', '.join(body.personal_layers[:4])}); task not trained", item.header.sender)
                return
            self._task, self._asked = item, set()
            self.cache.use(body.artifacts.values())
            self._advance()
        elif isinstance(body, Blob):
            self._store_blob(body, item)
            self._advance()
        elif isinstance(body, Catalogue):
            self._refuse(RejectReason.REPLAYED, f"a catalogue of tier {body.tier} answering no request of ours",
                         item.header.sender)
        elif isinstance(body, Reject):
            self.runtime.count(f"rejected:{body.reason.value}")
            if body.reason is RejectReason.UNKNOWN_DEVICE:
                self._announce()
            if (decline := self._sent_updates.refused(body)) is not None:
                self._publish(self.topics.up(self.id), self._frame(decline))
                self.runtime.count("declined")

    def _announce(self) -> None:
        hello = Hello(tier=self.behaviour.tier, num_samples=len(self.train_data), num_test_samples=len(self.test_data),
                      backend=self.runtime.settings.backend,
                      holds={tier: version for tier, (version, _) in self._held.items()},
                      seconds_per_sample=self.behaviour.seconds_per_sample, session=self.session)
        frame = encode_frame(self.runtime.settings.fleet, self.id, hello, signer=self._signer, sent_at=self._hello_at)
        self._publish(self.topics.status(self.id), frame, retain=True)
        self.runtime.count("hellos")

    def _store_blob(self, blob: Blob, frame: Frame) -> None:
        try:
            store_blob(self.cache, blob, frame.tensors)
        except ArtifactTooLarge as exc:
            log.error("%s: cannot cache %s: %s; raise --cache-max-mb", self.id, blob.name, exc)
        except TaskRefused as exc:
            self._refuse(exc.reason, exc.detail, frame.header.sender)

    def _advance(self) -> None:
        """Carry the waiting task on as far as its files allow: fetch what is missing, or train once all is here."""
        if self._task is None:
            return
        frame = self._task
        task: Task = frame.body  # type: ignore[assignment]
        if time.time() > task.deadline:
            self._task = None
            return
        try:
            if not self.cache.has(task.manifest_sha256):
                self._fetch([task.manifest_sha256])
                return
            manifest = check_manifest(task, self.cache.read(task.manifest_sha256), self.cache.max_bytes)
            if missing := self.cache.missing(task.artifacts):
                self._fetch(missing)
                return
            self._task = None
            self._run(frame, manifest)
        except TaskSkipped:
            self._task = None
        except TaskRefused as exc:
            self._task = None
            self._refuse(exc.reason, f"round {task.round} (tier {task.tier}) abandoned: {exc.detail}",
                         frame.header.sender)
            if isinstance(exc, TrainingDiverged) and isinstance(task, TrainTask):
                self._publish(self.topics.up(self.id), self._frame(declined_task(task, len(self.train_data))))
                self.runtime.count("declined")

    def _fetch(self, hashes: list[str]) -> None:
        """Ask for the files not asked for yet for this task."""
        new = [sha for sha in hashes if sha not in self._asked]
        if new:
            self._asked.update(new)
            self._publish(self.topics.up(self.id), self._frame(Fetch(sha256=new)))

    def _fit(self, task: Task, manifest: TierManifest) -> tuple[Dataset, Dataset]:
        model = manifest.model
        key = (model.name, tuple(model.input_shape), model.num_classes)
        if self._fitted is None or self._fitted[0] != key:
            try:
                fitted: tuple[Dataset, Dataset] | str = fit_split(self.train_data, self.test_data, model.input_shape,
                                                                  model.num_classes, self.runtime.settings.data)
            except ValueError as exc:
                fitted = str(exc)
                log.error("%s: round %d skipped, the data does not fit model %s: %s", self.id, task.round, model.name, exc)
            self._fitted = (key, fitted)
        if isinstance(self._fitted[1], str):
            raise TaskSkipped(self._fitted[1])
        return self._fitted[1]

    def _run(self, frame: Frame, manifest: TierManifest) -> None:
        """Train the task (really, on the shared session) and schedule its update for when this device would send it."""
        task: Task = frame.body  # type: ignore[assignment]
        folder = self.cache.tier_folder(task.artifacts, key=task.manifest_sha256)
        manifest = self.runtime.trainers.checked(task.manifest_sha256, folder)
        train, test = self._fit(task, manifest)
        try:
            received = task_weights(task, frame.tensors, manifest, self._held.get(task.tier))
        except NotHeld as exc:
            self._refuse(RejectReason.WRONG_VERSION, str(exc), self.runtime.settings.aggregator_id)
            self._held.pop(task.tier, None)
            self._announce()
            return
        received = self.runtime.intern(received)  # devices given the same weights hold one copy
        self._held[task.tier] = (task.model_version, received)
        start, control = split_control(received)  # SCAFFOLD: the server's c, when the task carries it
        began = max(time.monotonic(), self._busy_until)  # the simulated device trains one task at a time
        settings = self.runtime.settings
        if isinstance(task, MeasureBnStatistics):
            statistics = self.runtime.trainers.bn_statistics(folder, start, train)
            body: Body = BnStatistics(round=task.round, base_version=task.model_version, tier=task.tier,
                                      num_samples=len(self.train_data))
            out = self._frame(body, statistics)
            self._schedule(task, out, began, 0.0, None)
            return
        assert isinstance(task, TrainTask)
        seed = task.seed ^ zlib.crc32(self.id.encode())
        variate = task_variate(task, manifest, control, self.cache_dir, self._variates, durable=False)
        with self.runtime.trainers.lease(task.manifest_sha256, folder, manifest) as trainer:
            trainer.set_weights(start)
            before = trainer.evaluate(test) if task.evaluate and len(test) else None
            stats = trainer.train(train, task.epochs, task.batch_size, task.learning_rate, seed, task.mask_classes,
                                  proximal_mu=task.proximal_mu, correction=variate.correction() if variate else None,
                                  logit_adjust=task.logit_adjust)
            trained = trainer.get_weights()
        delta = trained_delta(trained, start, stats.loss)
        if variate:
            variate.change(delta, stats.steps, task.learning_rate)  # kept, not sent: the aggregator derives it
        if task.dp_noise > 0:
            delta = privatize(delta, task.dp_clip, task.dp_noise, self._dp_rng)
        feedback = self._feedback_for(task.tier)
        encoded = encode_update(settings.fleet, self.id, task, delta, start, stats, before,
                                len(self.train_data), settings.codec, feedback, self._signer)
        training_s = self.behaviour.training_s(task.tier, stats.samples_seen) or stats.seconds

        def sent() -> None:
            residual_change = encoded.sent()
            if variate:
                variate.commit()
            self._sent_updates.sent(read_header(encoded.frame).header.msg_id, encoded.update, variate, feedback,
                                    residual_change)

        self._schedule(task, encoded.frame, began, training_s, sent)

    def _schedule(self, task: Task, frame: bytes, began: float, training_s: float,
                  sent: Callable[[], None] | None) -> None:
        """Send `frame` when this device would: after its training time (or at the send margin before the
        deadline) and its upload time; or drop out part way, as its behaviour says."""
        now_wall, now = time.time(), time.monotonic()
        finish = began + training_s
        latest = now + (task.deadline - self.runtime.settings.send_margin_s - now_wall)
        upload_s = self.behaviour.upload_s(len(frame))
        send_at = max(now, min(finish, latest)) + upload_s
        dropout = self.behaviour.dropouts.get(task.round)
        if dropout is None and self.behaviour.dropout_probability and self._rng.random() < self.behaviour.dropout_probability:
            dropout = Dropout(round=task.round, after=float(self._rng.random()), away_s=self.behaviour.away_s)
        generation = self._generation
        if dropout is not None:
            # A round's task sent again after the device came back meets the same dropout: the device still does not
            # finish that round, but it is one dropout, counted and recorded once.
            first, self._dropped_round = task.round != self._dropped_round, task.round
            drop_at = max(now, began + dropout.after * training_s)
            self.runtime.loop.call_at(drop_at, lambda: self.vanish(dropout.away_s, counted=first)
                                      if generation == self._generation else None)
            if first:
                self.runtime.record(device=self.id, round=task.round, tier=task.tier, event="dropout",
                                    training_s=training_s, at=time.time() + (drop_at - now))
            return
        self._busy_until = finish

        def send() -> None:
            if generation != self._generation or not self.link.connected:
                self.runtime.count("updates_lost")  # dropped out or disconnected meanwhile: the results go with it
                return
            if sent is not None:
                sent()
            nbytes = self._publish(self.topics.up(self.id), frame)
            self.runtime.count("updates_sent")
            self.runtime.record(device=self.id, round=task.round, tier=task.tier, event=task.kind, bytes=nbytes,
                                training_s=training_s, upload_s=upload_s, at=time.time())

        self.runtime.loop.call_at(send_at, send)

    def _feedback_for(self, tier: str) -> ErrorFeedback | None:
        settings = self.runtime.settings
        if settings.codec == "float32" and settings.skip_below == 0:
            return None
        if tier not in self._feedback:
            self._feedback[tier] = ErrorFeedback(self.cache_dir, tier, settings.skip_below)
        return self._feedback[tier]

    @property
    def _signer(self) -> Callable[..., str] | None:
        return self.key.sign if self.key else None

    def _frame(self, body: Body, tensors: dict[str, np.ndarray] | None = None) -> bytes:
        return encode_frame(self.runtime.settings.fleet, self.id, body, tensors, signer=self._signer)
