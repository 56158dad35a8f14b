"""`tierfl bench --broker`: the tiers' artifacts, fetched from the fleet's aggregator the way the device agent fetches them.

The protocol names a tier's files only in a task, so for each tier the device's own agent
(edge_client.agent.DeviceAgent: its key, its pinned aggregator key, its artifact cache) says hello
asking for that tier and takes the first task of it: the manifest and then the files arrive as
signed blobs, checked against their sha256 into the cache and laid out as a tier folder whose ONNX
files pass onnx_guard, exactly as before training. It trains nothing and leaves at once (its
offline status tells the aggregator to stop waiting for it in that round), then asks for the next
tier. A tier the aggregator does not export is refused on the hello (unknown_tier).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from edge_client.agent import ClientConfig, DeviceAgent
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
    found: dict[str, Path] = {}
    skipped: list[str] = []
    for tier in tiers:
        config = ClientConfig(
            broker=access.broker, device_id=access.device_id, fleet=access.fleet, aggregator_id=access.aggregator_id,
            tier=tier, cache_dir=access.cache_dir, max_message_bytes=access.max_message_bytes, backend=backend,
            cache_max_mb=cache_max_mb, aggregator_key=access.aggregator_key, connect_timeout_s=timeout_s,
            stop_grace_s=1.0,
        )
        folder = _fetch_tier(config, data, timeout_s)
        if folder is None and required:
            raise ValueError(f"the aggregator of fleet {access.fleet!r} does not export tier {tier} (its refusal "
                             "above names the tiers it has)")
        if folder is None:
            skipped.append(tier)
        else:
            found[tier] = folder
    if skipped:
        log.info("the fleet's aggregator does not export tier(s) %s: not measured", ", ".join(skipped))
    if not found:
        raise ValueError(f"the aggregator of fleet {access.fleet!r} exports none of tiers {', '.join(tiers)}")
    return found


def _fetch_tier(config: ClientConfig, data: Dataset, timeout_s: float) -> Path | None:
    """The folder of tier `config.tier`, fetched as this device asking for it; None when the aggregator does not
    export it."""
    tier, fleet = config.tier, config.fleet
    fetched: queue.Queue[tuple[str, Path]] = queue.Queue()
    agent = DeviceAgent(config, data, data.subset([]), files_only=lambda task, folder: fetched.put((task.tier, folder)))
    stop = threading.Event()
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            agent.run(stop)
        except Exception as exc:  # raised again below, in the caller's thread
            failed.append(exc)

    log.info("asking the aggregator of fleet %r at %s for a task of tier %s (it comes when a round starts)",
             fleet, config.broker.url, tier)
    started = time.monotonic()
    thread = threading.Thread(target=serve, name=f"tierfl-bench-fetch-{tier}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                got, folder = fetched.get(timeout=0.2)
            except queue.Empty:
                if failed:
                    raise failed[0]
                if agent.refused[f"by-aggregator:{RejectReason.UNKNOWN_TIER.value}"]:
                    return None
                if final := [r.value for r in _FINAL if agent.refused[f"by-aggregator:{r.value}"]]:
                    raise ValueError(f"the aggregator refused this device ({', '.join(final)}; see the log above)")
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"no task of tier {tier} from the aggregator of fleet {fleet!r} within "
                                       f"{timeout_s:.0f} s: it sends one when a round starts (once "
                                       "--min-clients devices are online); raise --fetch-timeout to wait longer")
                continue
            if got == tier:  # a task of another tier may linger from an earlier session
                log.info("tier %s: fetched and checked its artifacts in %.1f s", tier, time.monotonic() - started)
                return folder
    finally:
        stop.set()
        thread.join()
