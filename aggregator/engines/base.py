"""What every engine is to the service and the monitor: one small interface, and the open round it runs.

An engine is pure logic with the clock passed in. The service (aggregator.service) feeds it the
messages that passed the receipt checks and publishes the `Outgoing` messages it returns; the
monitor (aggregator.monitor) reads `view()`, a frozen copy of the open round, and `record`.
Neither looks at an engine's private state or asks which engine it is: an engine that takes no
secure-aggregation messages refuses them through the same `on_secagg`.

Four engines implement it: aggregator.engines.rounds (synchronous rounds), .buffered (FedBuff),
.secure (rounds summed by secure aggregation) and .relay (a relay's local rounds), each
composing the shared parts (.parts, .model, .intake, .tasks, .sync) and keeping its open round in a
`RoundSlot`.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.round_spool import Assignment
from aggregator.store.state import StateRecord
from aggregator.strategies.bn_statistics import BnStatisticsPool
from aggregator.strategies.fedavg import Accumulator
from aggregator.strategies.robust import DEFAULT_OUTLIER_MULTIPLE
from aggregator.strategies.scaffold import Scaffold, VariateMean
from aggregator.strategies.server_optimizer import ServerOptimizer
from protocol.messages import MAX_FINETUNE_STEPS, BnStatistics, Body, Reject, RejectReason, SecAgg, Update


class EngineConfig(BaseModel):
    """Round settings of the aggregator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fleet: str = "default"
    rounds: int = Field(20, ge=1)
    min_updates: int = Field(1, ge=1)
    round_timeout_s: float = Field(60.0, gt=0)
    evaluate_on_devices: bool = True
    bn_statistics: Literal["devices", "averaged"] = "devices"  # batch-norm models: measured on devices, or averaged
    local_dp_clip: float = Field(0.0, ge=0)  # local differential privacy: devices clip their deltas to this norm ...
    local_dp_noise: float = Field(0.0, ge=0)  # ... and add Gaussian noise of this multiple of the clip (0: off)
    outlier_multiple: float = Field(DEFAULT_OUTLIER_MULTIPLE, ge=0)  # refuse norms over this x the tier's median (0: off)
    max_share: float = Field(1.0, gt=0, le=1)  # cap on one device's share of a round's weight (1: no cap)
    server_optimizer: ServerOptimizer | None = None  # None: the round's aggregate is the new model (FedAvg)
    personal_layers: tuple[str, ...] = ()  # FedPer: parameters that stay on the devices, never sent or aggregated
    finetune_steps: int = Field(0, ge=0, le=MAX_FINETUNE_STEPS)  # --personalize finetune:K (0: off)
    scaffold: Scaffold | None = None  # SCAFFOLD's control variates travel with tasks and updates (None: off)
    seed: int = 0


@dataclass(frozen=True)
class Outgoing:
    """A message for the service to publish: to one device, or to the rounds topic if device_id is None."""

    device_id: str | None
    body: Body
    tensors: Mapping[str, np.ndarray] | None = None


def reject(device_id: str, reason: RejectReason, detail: str, ref: str | None = None, round_number: int | None = None) -> Outgoing:
    """A rejection addressed back to the device."""
    return Outgoing(device_id, Reject(reason=reason, detail=detail, ref_msg_id=ref, round=round_number))


@dataclass
class OpenRound:
    """The round (or FedBuff buffer) in progress: who was asked, who answered, and the running aggregate."""

    number: int
    started: float
    deadline: float
    assignments: dict[str, Assignment]
    accumulator: Accumulator
    available: int = 0  # devices the round was drawn from (differential privacy's sampling rate)
    answered: set[str] = field(default_factory=set)
    evals: list[tuple[str, float, float, int]] = field(default_factory=list)  # tier, loss, acc, samples
    device_accuracies: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # global, fine-tuned
    bytes_up: int = 0
    bytes_down: int = 0
    trained: dict[str, np.ndarray] | None = None  # aggregated weights awaiting their statistics
    optimizer_state: dict[str, np.ndarray] | None = None  # the server optimizer's state after `trained`
    variates: VariateMean | None = None  # SCAFFOLD: the round's delta c_i, folded as they are accepted
    control: dict[str, np.ndarray] | None = None  # SCAFFOLD: the server's c after `trained`, until the commit
    statistics: dict[str, BnStatisticsPool] = field(default_factory=dict)  # tier -> pool, in the statistics phase
    measured: set[str] = field(default_factory=set)
    caps: dict[str, int] = field(default_factory=dict)  # device -> most samples its update may weigh (max_share)
    weighted_norms: float = 0.0  # sum of weight x L2 norm of the updates folded so far (bounds the float32 sums)
    resent: set[str] = field(default_factory=set)  # devices whose task was sent again this round
    declined: set[str] = field(default_factory=set)  # selected devices that said they have no result (Update.declined)

    @property
    def owing(self) -> set[str]:
        """Devices the current phase still waits for."""
        if self.trained is None:
            return set(self.assignments) - self.answered - self.declined
        return self.answered - self.measured

    def view(self) -> RoundView:
        """A frozen copy for readers outside the engine."""
        statistics = self.trained is not None
        return RoundView(
            number=self.number, phase="statistics" if statistics else "training",
            tiers={device: a.tier for device, a in self.assignments.items()},
            selected=len(self.answered) if statistics else len(self.assignments),
            answered=len(self.measured) if statistics else len(self.answered),
            updates=self.accumulator.count, started=self.started, deadline=self.deadline,
            waiting_for=tuple(sorted(self.owing)),
        )


@dataclass
class RoundSlot:
    """Where an engine keeps its open round (or FedBuff buffer), and what the interface asks of it."""

    current: OpenRound | None = None

    @property
    def number(self) -> int | None:
        """The open round's number, or None between rounds."""
        return self.current.number if self.current else None

    def view(self) -> RoundView | None:
        """A frozen copy of the open round, or None between rounds."""
        return self.current.view() if self.current else None

    def asked(self, device_id: str) -> bool:
        """Whether the open round (or buffer) asked `device_id` (O(1), for every received message)."""
        return self.current is not None and device_id in self.current.assignments

    def round_key(self) -> tuple[int, int] | None:
        """(number, devices asked) of the open round, None between rounds: changes whenever its devices do."""
        return (self.current.number, len(self.current.assignments)) if self.current else None

    def note_bytes(self, up: int = 0, down: int = 0) -> None:
        """Count wire bytes toward the open round."""
        if self.current:
            self.current.bytes_up += up
            self.current.bytes_down += down


@dataclass(frozen=True)
class RoundView:
    """The open round as the service and the monitor see it (a copy: changing it changes nothing)."""

    number: int
    phase: str  # "training", or "statistics" while batch-norm statistics are measured before the commit
    tiers: Mapping[str, str]  # device -> tier, of every device asked in this round (or buffer)
    selected: int  # devices the current phase asked
    answered: int  # of those, how many answered it
    updates: int  # updates folded into the aggregate (a FedBuff device may answer twice in one buffer)
    started: float
    deadline: float  # inf: none (FedBuff's buffer)
    waiting_for: tuple[str, ...]  # devices that owe the current phase an answer


class Engine(Protocol):
    """The interface the service, the monitor and the CLI use; every engine implements it."""

    UNIT: str  # what the logs call one applied version: "round" or "buffer"
    config: EngineConfig
    registry: DeviceRegistry
    artifacts: ArtifactStore
    ledger: Ledger | None
    record: StateRecord
    rejected: collections.Counter[str]

    @property
    def finished(self) -> bool:
        """True once the configured rounds are done."""
        ...

    def view(self) -> RoundView | None:
        """A frozen copy of the open round, or None between rounds."""
        ...

    def asked(self, device_id: str) -> bool:
        """Whether the open round (or buffer) asked `device_id`."""
        ...

    def round_key(self) -> tuple[int, int] | None:
        """(number, devices asked) of the open round, None between rounds."""
        ...

    def tick(self, now: float) -> list[Outgoing]:
        """Start, advance or close rounds as time passes."""
        ...

    def on_update(self, device_id: str, msg_id: str, update: Update, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Take one device's update, or refuse it with a reason."""
        ...

    def on_bn_statistics(self, device_id: str, msg_id: str, body: BnStatistics, tensors: Mapping[str, np.ndarray],
                         now: float) -> list[Outgoing]:
        """Take one device's batch-norm statistics, or refuse them with a reason."""
        ...

    def on_secagg(self, device_id: str, msg_id: str, body: SecAgg, tensors: Mapping[str, np.ndarray], nbytes: int,
                  now: float) -> list[Outgoing]:
        """Take one device's secure-aggregation message, or refuse it with a reason."""
        ...

    def masked_tensors(self, device_id: str, body: SecAgg, now: float) -> dict[str, tuple[int, ...]]:
        """The uint8 tensors a secure-aggregation message must carry, known before it is decoded."""
        ...

    def count_rejection(self, reason: RejectReason, detail: str = "", device_id: str | None = None,
                        body: Update | BnStatistics | SecAgg | None = None) -> None:
        """Count (and record) a refusal decided outside the engine."""
        ...

    def note_bytes(self, up: int = 0, down: int = 0) -> None:
        """Count wire bytes toward the open round."""
        ...
