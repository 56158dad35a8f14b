"""What every engine is built from: one bundle of the settings, strategy, storage and devices it serves.

The CLIs (aggregator.cli, aggregator.relay_cli) and the tests build an `EngineParts` once and hand it
to whichever engine runs; the engines hand it on to their components (aggregator.engines.model,
.tasks, .intake, .sync).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from operator import attrgetter
from typing import Any

from aggregator.engines.base import EngineConfig
from aggregator.evaluate import HeldOutEvaluator
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import Strategy
from aggregator.strategies.privacy import PrivacyBudget


@dataclass(frozen=True)
class EngineParts:
    """The shared parts of an engine: round settings, strategy, exported tiers, state folder, devices, and extras."""

    config: EngineConfig
    strategy: Strategy
    artifacts: ArtifactStore
    store: StateStore
    registry: DeviceRegistry
    evaluator: HeldOutEvaluator | None = None  # held-out evaluation of each new version (None: devices' own)
    ledger: Ledger | None = None  # every decision on a received message (None: counted only)
    privacy: PrivacyBudget | None = None  # central differential privacy's books, one step per released model

    def with_config(self, **update: object) -> EngineParts:
        """These parts with some round settings changed (an engine that fixes them, such as FedBuff's)."""
        return replace(self, config=self.config.model_copy(update=update))


def forwarded(part: str, *names: str) -> tuple[Any, ...]:
    """Read-only engine attributes served by one of its parts, one per name, for unpacking in a class body:
    `record, weights = forwarded("model", "record", "weights")` makes `engine.record` read `engine.model.record`
    (a method forwards alike: `engine.view()` calls the part's)."""
    return tuple(property(attrgetter(f"{part}.{name}"), doc=f"The engine's {part}.{name}.") for name in names)


def listing(names: list[str], limit: int = 20) -> str:
    """Names for a log line: all of a few, the first `limit` of many and how many more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
