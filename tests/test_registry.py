"""The device registry's bound (--max-devices): who is evicted when it is full; the thread-safe view of its ids."""

from __future__ import annotations

import threading

import pytest

from aggregator.registry import DeviceRegistry, RegistryFull


def _full_registry() -> DeviceRegistry:
    """Four devices: one that trained, one with a task out, two that never trained (seen at 2.0 and 3.0)."""
    registry = DeviceRegistry(max_devices=4)
    for i, device in enumerate(["trained", "busy", "idle-old", "idle-new"]):
        registry.hello(device, 10, 0, None, "portable", now=float(i))
    registry.asked("trained", 1)
    registry.answered("trained", 0.5)
    registry.asked("busy", 2)
    return registry


def test_a_new_device_evicts_the_longest_unseen_one_that_never_trained_and_awaits_no_task() -> None:
    registry = _full_registry()
    registry.hello("new-1", 10, 0, None, "portable", now=10.0)
    assert "idle-old" not in registry and not registry.knows("idle-old") and registry.knows("new-1")
    registry.hello("new-2", 10, 0, None, "portable", now=11.0)
    assert {d.device_id for d in registry.devices()} == {"trained", "busy", "new-1", "new-2"}
    registry.hello("new-3", 10, 0, None, "portable", now=12.0)  # "busy" was seen longest ago, but waits on its task
    assert "busy" in registry and "new-1" not in registry


def test_a_device_whose_task_ended_unanswered_may_be_evicted_again() -> None:
    registry = _full_registry()
    registry.hello("idle-old", 10, 0, None, "portable", now=20.0)  # a reconnect: seen again, nothing evicted
    registry.hello("idle-new", 10, 0, None, "portable", now=20.0)
    registry.missed("busy")
    registry.hello("new", 10, 0, None, "portable", now=21.0)
    assert "busy" not in registry and len(registry) == 4


def test_a_reconnect_keeps_the_task_out_and_the_last_status() -> None:
    registry = _full_registry()
    registry.set_online("busy", False, now=5.0, sent_at=4.5)
    registry.hello("busy", 10, 0, None, "portable", now=6.0)
    info = registry.get("busy")
    assert info.awaiting_task and info.status_sent_at == 4.5 and info.online


def test_a_registry_of_devices_that_trained_or_await_a_task_refuses_a_new_one() -> None:
    registry = _full_registry()
    for device in ("idle-old", "idle-new"):
        registry.asked(device, 3)
    with pytest.raises(RegistryFull, match="--max-devices"):
        registry.hello("eve", 10, 0, None, "portable", now=30.0)
    assert "eve" not in registry and not registry.knows("eve") and len(registry) == 4


def test_other_threads_see_registrations_and_evictions() -> None:
    registry = DeviceRegistry(max_devices=50)
    seen: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(registry.knows("d-0"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(2000):
            registry.hello(f"d-{i}", 1, 0, None, "portable", now=float(i))
    finally:
        stop.set()
        watcher.join()
    assert not registry.knows("d-0") and registry.knows("d-1999") and len(registry) == 50
    assert sum(registry.knows(f"d-{i}") for i in range(2000)) == 50


def test_a_connected_device_stays_available_however_long_it_is_silent_until_its_will() -> None:
    """Never drawn for a day (a big fleet at a small fraction, or long rounds): still available; its will ends that."""
    registry = DeviceRegistry()
    registry.hello("quiet", 10, 0, None, "portable", now=0.0)
    registry.hello("chatty", 10, 0, None, "portable", now=0.0)
    registry.seen("chatty", 86_000.0)
    assert [d.device_id for d in registry.available()] == ["chatty", "quiet"]
    registry.set_online("quiet", False, now=86_401.0, sent_at=86_400.5)
    assert [d.device_id for d in registry.available()] == ["chatty"] and registry.online_count == 1
