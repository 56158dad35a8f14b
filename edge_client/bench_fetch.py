"""`tierfl bench --broker`: the tiers' artifacts, fetched from the fleet's aggregator the way the device agent fetches them.

The device's own agent (edge_client.agent.DeviceAgent: its key, its pinned aggregator key, its
artifact cache) says hello and asks the aggregator for each tier's catalogue (DeviceAgent.ask_tier):
the signed answer names the tier's manifest and files by sha256, exactly as a task of it would; the
files then arrive as signed blobs, checked against their sha256 into the cache and laid out as a
tier folder whose ONNX files pass onnx_guard, exactly as before training. No round is joined or
waited for, and nothing is trained (a task that comes anyway is let go). A tier the aggregator does
not export is refused (unknown_tier).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from edge_client.agent import ClientConfig, DeviceAgent, TaskRefused, TaskSkipped
from edge_client.fleet_options import FleetAccess
from models.data import Dataset
from protocol.messages import RejectReason

log = logging.getLogger(__name__)

# Refusals by the aggregator that waiting longer cannot change.
_FINAL = (RejectReason.NOT_ENROLLED, RejectReason.BAD_SIGNATURE, RejectReason.WRONG_FLEET,
          RejectReason.SENDER_MISMATCH)


def fetch_tiers(access: FleetAccess, tiers: Sequence[str], data: Dataset, *, required: bool, timeout_s: float,
                backend: str, cache_max_mb: float) -> dict[str, Path]:
    """tier -> its checked folder in the device's artifact cache, each fetched as this device (announcing `data`'s
    size and `backend`); a tier the fleet does not export is left out, or a ValueError when `required`."""
    config = ClientConfig(
        broker=access.broker, device_id=access.device_id, fleet=access.fleet, aggregator_id=access.aggregator_id,
        cache_dir=access.cache_dir, max_message_bytes=access.max_message_bytes, backend=backend,
        cache_max_mb=cache_max_mb, aggregator_key=access.aggregator_key, connect_timeout_s=timeout_s, stop_grace_s=1.0,
    )
    agent = DeviceAgent(config, data, data.subset([]), trains=False)
    stop = threading.Event()
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            agent.run(stop)
        except Exception as exc:  # raised again below, in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=serve, name="tierfl-bench-fetch", daemon=True)
    thread.start()
    found: dict[str, Path] = {}
    skipped: list[str] = []
    try:
        for tier in tiers:
            folder = _fetch_tier(agent, tier, failed, timeout_s)
            if folder is None and required:
                raise ValueError(f"the aggregator of fleet {access.fleet!r} does not export tier {tier} (its refusal "
                                 "above names the tiers it has)")
            if folder is None:
                skipped.append(tier)
            else:
                found[tier] = folder
    finally:
        stop.set()
        thread.join()
    if skipped:
        log.info("the fleet's aggregator does not export tier(s) %s: not measured", ", ".join(skipped))
    if not found:
        raise ValueError(f"the aggregator of fleet {access.fleet!r} exports none of tiers {', '.join(tiers)}")
    return found


def _fetch_tier(agent: DeviceAgent, tier: str, failed: list[BaseException], timeout_s: float) -> Path | None:
    """The checked folder of `tier`, asked for by `agent` (running); None when the aggregator does not export it."""
    fleet = agent.config.fleet
    log.info("asking the aggregator of fleet %r at %s for the files of tier %s", fleet, agent.config.broker.url, tier)
    started = time.monotonic()
    asked = agent.ask_tier(tier, timeout_s)
    while True:
        try:
            folder = asked.result(timeout=0.2)
        except FutureTimeout:
            if failed:
                raise failed[0] from None
            if final := [r.value for r in _FINAL if agent.refused[f"by-aggregator:{r.value}"]]:
                raise ValueError(f"the aggregator refused this device ({', '.join(final)}; see the log above)") from None
            if time.monotonic() - started > timeout_s + 1.0:  # the agent gives up at timeout_s
                raise _timeout(agent, tier, timeout_s) from None
            continue
        except TaskRefused as exc:
            if exc.reason is RejectReason.UNKNOWN_TIER:
                return None
            raise ValueError(f"tier {tier}: refused ({exc.reason.value}: {exc.detail})") from None
        except (TaskSkipped, CancelledError):
            raise _timeout(agent, tier, timeout_s) from None
        log.info("tier %s: fetched and checked its artifacts in %.1f s", tier, time.monotonic() - started)
        return folder


def _timeout(agent: DeviceAgent, tier: str, timeout_s: float) -> TimeoutError:
    """Why bench gives up on a tier, with what this device refused of the aggregator's (a wrong key: bad_signature)."""
    here = ", ".join(f"{reason} ({count})" for reason, count in sorted(agent.refused.items())
                     if not reason.startswith("by-aggregator:"))
    return TimeoutError(f"the files of tier {tier} did not come from the aggregator of fleet {agent.config.fleet!r} "
                        f"within {timeout_s:.0f} s{f'; refused here: {here}' if here else ''} (see the log above); "
                        "raise --fetch-timeout to wait longer")
