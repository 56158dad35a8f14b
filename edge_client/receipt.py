"""The device's receipt of downlink frames, on paho's network thread: check, cheapest first, then queue.

A frame on any topic but this device's downlink, or from another fleet or sender, is refused on its
header alone (protocol.frame.read_header); one not signed by the trusted aggregator key
(protocol.trust; before a key is pinned, everything but its announcement) is refused before its
payload is hashed or decoded. The key announcement pins the key on first use (or confirms it) and
goes no further. A task frame is refused on receipt when it was taken before (a QoS 1 redelivery,
or a replay before its deadline), its deadline has passed, it lists files that are not plain names
or a manifest that is not its own, or it is secure and this device cannot be; a catalogue (a tier's
files, answering our request: the device loop refuses one that answers no request of ours) when its
files are not plain names or its manifest is not its own; a message of a kind
the device does not take is refused too. What passes goes to `deliver` (the device loop's inbox);
every refusal goes to `refuse`. The state this needs (the pinned key, the task frames taken) is
this thread's alone; acting on a frame is the device loop's work.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from protocol.frame import Frame, FrameError, decode_payload, read_header
from protocol.messages import Blob, Catalogue, Query, Reject, RejectReason, SecAgg, Task, TierFiles, TrainTask
from protocol.signing import KEY_ANNOUNCEMENT, SignatureError
from protocol.trust import AggregatorTrust

log = logging.getLogger(__name__)
MAX_TAKEN_TASKS = 1024  # task frames remembered (until their deadline) so that a second copy is refused
Refuse = Callable[[RejectReason, str, str | None], None]  # reason, detail, sender


class Receipt:
    """Checks each downlink frame of one device and delivers those that pass."""

    def __init__(self, topic: str, fleet: str, aggregator_id: str, trust: AggregatorTrust,
                 secure: bool, refuse: Refuse, deliver: Callable[[Frame], object]) -> None:
        """`topic`: this device's downlink; `secure`: it can take part in secure aggregation."""
        self.topic = topic
        self.fleet = fleet
        self.aggregator_id = aggregator_id
        self.trust = trust
        self.secure = secure
        self._refuse = refuse
        self._deliver = deliver
        self._taken: collections.OrderedDict[str, float] = collections.OrderedDict()  # task frame msg_id -> deadline

    def on_frame(self, topic: str, data: bytes) -> None:
        """Check one reassembled frame; deliver it, or refuse it with a reason."""
        if topic != self.topic:
            self._refuse(RejectReason.UNEXPECTED, f"a frame on {topic}, not on this device's downlink", None)
            return
        try:
            raw = read_header(data)
        except FrameError as exc:
            self.on_bad_frame(topic, exc)
            return
        header = raw.header
        if header.fleet != self.fleet or header.sender != self.aggregator_id:
            self._refuse(RejectReason.SENDER_MISMATCH, f"frame from {header.sender!r} of fleet {header.fleet!r}", None)
            return
        body = header.body
        announcement = isinstance(body, Blob) and body.name == KEY_ANNOUNCEMENT
        if announcement and not self.trust.verifiable:
            self._refuse(RejectReason.UNEXPECTED, "the aggregator's key announcement cannot be verified without the "
                         "cryptography package (pip install 'tierfl[signing]')", header.sender)
            return
        try:
            if not announcement:
                self.trust.verify(header)  # before the payload is hashed or decoded
            frame = decode_payload(raw)
            if announcement:
                data_tensor = frame.tensors.get("data")
                self.trust.announced(header, data_tensor if isinstance(data_tensor, np.ndarray) else None)
                return
        except SignatureError as exc:
            self._refuse(exc.reason, f"{body.kind}: {exc.detail}", header.sender)
            return
        except FrameError as exc:
            self._refuse(exc.reason, exc.detail, header.sender)
            return
        if (problem := self._problem(frame)) is not None:
            self._refuse(*problem, header.sender)
            return
        if isinstance(body, (Task, Query)):
            self._take(header.msg_id, body.deadline)
        self._deliver(frame)

    def on_bad_frame(self, topic: str, error: FrameError) -> None:
        """A frame that failed reassembly or its header."""
        self._refuse(error.reason, error.detail, None)

    def _problem(self, frame: Frame) -> tuple[RejectReason, str] | None:
        """Why a verified, decoded frame is not for the device loop; None if it is."""
        body = frame.body
        if isinstance(body, Task):
            return self._task_problem(body, frame.header.msg_id)
        if isinstance(body, Catalogue):
            return _files_problem(body, f"the catalogue of tier {body.tier}")
        if isinstance(body, Query):
            return self._query_problem(body, frame.header.msg_id)
        if isinstance(body, (Blob, Reject)) or (isinstance(body, SecAgg) and self.secure):
            return None
        return RejectReason.UNEXPECTED, f"unexpected {body.kind!r} message"

    def _task_problem(self, task: Task, msg_id: str) -> tuple[RejectReason, str] | None:
        """Why a task cannot be taken at all, checked on receipt (no artifact is fetched for it); None if it can."""
        where = f"round {task.round} (tier {task.tier})"
        secure = isinstance(task, TrainTask) and task.secure is not None
        return self._taking_problem(where, "task", secure, task.deadline, msg_id) or _files_problem(task, where)

    def _query_problem(self, query: Query, msg_id: str) -> tuple[RejectReason, str] | None:
        """Why an analytics query cannot be taken (as a task, and files not its manifest's); None if it can."""
        where = f"query {query.round} ({query.computation})"
        return (self._taking_problem(where, "query", query.secure is not None, query.deadline, msg_id)
                or (_files_problem(query.files, where) if query.files is not None else None))

    def _taking_problem(self, where: str, kind: str, secure: bool, deadline: float,
                        msg_id: str) -> tuple[RejectReason, str] | None:
        """Why a task or query cannot be taken: secure without the means, past its deadline, or taken already."""
        if secure and not self.secure:
            return RejectReason.UNEXPECTED, (f"{where} uses secure aggregation, which needs the cryptography package "
                                             "(pip install 'tierfl[signing]')")
        if (late := time.time() - deadline) > 0:  # a signed task is good until its deadline, not after
            return RejectReason.REPLAYED, (f"{where}: its deadline passed {late:.0f} s ago (an old {kind} sent again, "
                                           "or this device's clock is wrong)")
        if msg_id in self._taken:  # a QoS 1 redelivery, or the same signed task sent again before its deadline
            return RejectReason.REPLAYED, f"{where}: {kind} message {msg_id} was taken already"
        return None

    def _take(self, msg_id: str, deadline: float) -> None:
        """Remember a task frame taken (until its deadline, and at most MAX_TAKEN_TASKS of them)."""
        now = time.time()
        for old in [m for m, until in self._taken.items() if until < now]:
            del self._taken[old]
        self._taken[msg_id] = deadline
        while len(self._taken) > MAX_TAKEN_TASKS:
            self._taken.popitem(last=False)


def _files_problem(files: TierFiles, where: str) -> tuple[RejectReason, str] | None:
    """Why the files a task or a catalogue names cannot be fetched (a manifest not its own, names that are not plain
    file names); None if they can."""
    if files.artifacts.get("manifest.json") != files.manifest_sha256:
        return RejectReason.UNKNOWN_ARTIFACT, f"{where}: its manifest.json is not its manifest_sha256"
    odd = [name for name in files.artifacts if Path(name).name != name or name.startswith(".")]
    if odd:
        return RejectReason.MALFORMED, f"{where}: artifact names {odd[:4]} are not plain file names"
    return None
