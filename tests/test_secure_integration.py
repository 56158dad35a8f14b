"""A secure-aggregation federation of real processes over Mosquitto: the aggregator only ever gets masked updates."""

from __future__ import annotations

import collections
import json
import signal
import sqlite3
import time

import pytest

from protocol.chunking import Reassembler
from protocol.frame import decode_frame
from protocol.messages import SecAgg, Update
from protocol.secagg.device import verify_advertisement
from protocol.secagg.messages import AdvertiseKeys
from protocol.secagg.wire import unwrap
from protocol.signing import DeviceKey
from protocol.topics import Topics
from tests.test_algorithms_integration import _devices, _summaries
from tests.test_integration import Watcher, _aggregator, _stop, _wait_for

pytestmark = pytest.mark.integration


def _uplink(watcher: Watcher, topics: Topics) -> list[tuple[str, object, int]]:
    """(device, body, tensor count) of every frame the devices published, reassembled when chunked."""
    reassembler, out = Reassembler(), []
    for topic, payload in list(watcher.frames):
        device = topics.device_of(topic)
        if device is None or topic != topics.up(device) or not payload:
            continue
        if (data := reassembler.feed(topic, payload)) is not None:
            frame = decode_frame(data)
            out.append((device, frame.body, len(frame.tensors)))
    return out


def test_secure_federation_of_mixed_tiers_trains_on_masked_updates_only(tmp_path, mosquitto_url, fleet):
    topics = Topics(fleet)
    watcher = Watcher(mosquitto_url, [topics.rounds, topics.all_up()])
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--secure-aggregation", "--min-clients", "4",
                             "--rounds", "3", "--lr", "0.1", "--tiers", "a,b", "--tier-mix", "a-b",
                             "--round-timeout", "40")
    devices = _devices(tmp_path, mosquitto_url, fleet, 4)
    try:
        assert aggregator.wait(150) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = _summaries(watcher)
        assert [s.version for s in summaries] == [1, 2, 3]
        assert all(s.answered == 4 and not s.rejected for s in summaries)
        assert summaries[-1].accuracy > 0.8
        assert set(summaries[-1].accuracy_by_tier) == {"a", "b"}

        sent = _uplink(watcher, topics)
        assert not [body for _, body, _ in sent if isinstance(body, Update)], "no plain update ever left a device"
        phases = collections.Counter((device, body.phase) for device, body, _ in sent if isinstance(body, SecAgg))
        for device in ("d0", "d1", "d2", "d3"):
            for phase in ("advertise", "share_keys", "masked_input", "unmasking"):
                assert phases[device, phase] == 3, (device, phase, phases)
        assert all(count > 0 for _, body, count in sent if isinstance(body, SecAgg) and body.phase == "masked_input")
        assert all(count == 0 for _, body, count in sent if isinstance(body, SecAgg) and body.phase != "masked_input")

        with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
            accepted = dict(db.execute("SELECT kind, COUNT(*) FROM received WHERE accepted = 1 GROUP BY kind").fetchall())
            refused = db.execute("SELECT COUNT(*) FROM received WHERE accepted = 0").fetchone()[0]
        assert accepted == {"secagg": 12} and refused == 0  # 4 masked inputs a round, never an update
        log = (tmp_path / "aggregator.log").read_text()
        assert log.count("unmasked the sum of 4 masked inputs") == 3
        for i in range(4):
            assert (tmp_path / f"d{i}.log").read_text().count("sent the masked update") == 3
    finally:
        watcher.close()
        _stop([aggregator, *devices])


def test_a_device_killed_after_sharing_its_keys_is_unmasked_out_of_the_sum(tmp_path, mosquitto_url, fleet):
    topics = Topics(fleet)
    watcher = Watcher(mosquitto_url, [topics.rounds])
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--secure-aggregation", "--min-clients", "4",
                             "--rounds", "2", "--epochs", "80", "--round-timeout", "90")
    devices = _devices(tmp_path, mosquitto_url, fleet, 4)
    try:
        victim = tmp_path / "d3.log"
        _wait_for(lambda: "round 2: training tier" in victim.read_text(), 120, "d3 training round 2")
        time.sleep(0.5)  # keys are shared in milliseconds; 80 epochs of training take seconds
        devices[3].send_signal(signal.SIGKILL)  # the broker publishes d3's last will: offline
        assert aggregator.wait(120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = _summaries(watcher)
        assert [(s.version, s.answered) for s in summaries] == [(1, 4), (2, 3)]
        log = (tmp_path / "aggregator.log").read_text()
        assert "round 2: no masked_input message from d3" in log
        assert "unmasked the sum of 3 masked inputs (1 dropped after sharing keys: d3)" in log
        assert summaries[-1].accuracy > 0.8
    finally:
        watcher.close()
        _stop([aggregator, *devices])


def test_devices_with_fleet_keys_verify_every_roster_and_train(tmp_path, mosquitto_url, fleet):
    """The operator's enrolled.json, copied to every device as --fleet-keys: signed advertisements, verified rosters."""
    keys = {f"d{i}": DeviceKey(tmp_path / f"d{i}").public_hex for i in range(4)}  # the keys the clients will use
    enrolled = tmp_path / "enrolled.json"
    enrolled.write_text(json.dumps(keys))
    topics = Topics(fleet)
    watcher = Watcher(mosquitto_url, [topics.rounds, topics.all_up()])
    aggregator = _aggregator(tmp_path, mosquitto_url, fleet, "--secure-aggregation", "--enrolled", str(enrolled),
                             "--min-clients", "4", "--rounds", "2", "--lr", "0.1", "--round-timeout", "40")
    devices = _devices(tmp_path, mosquitto_url, fleet, 4, "--fleet-keys", str(enrolled))
    try:
        assert aggregator.wait(120) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
        summaries = _summaries(watcher)
        assert [(s.version, s.answered) for s in summaries] == [(1, 4), (2, 4)]
        assert not any(s.rejected for s in summaries) and summaries[-1].accuracy > 0.8

        adverts = [(body, unwrap(body, {})) for _, body, _ in _uplink(watcher, topics)
                   if isinstance(body, SecAgg) and body.phase == "advertise"]
        assert len(adverts) == 8 and len({body.session for body, _ in adverts}) == 2
        for body, advert in adverts:
            assert isinstance(advert, AdvertiseKeys)
            verify_advertisement(advert, keys, body.session)  # raises unless signed by the device's key, this session
        with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM received WHERE accepted = 0").fetchone()[0] == 0
        for i in range(4):
            log = (tmp_path / f"d{i}.log").read_text()
            assert log.count("shared keys with a roster of 4 devices, every advertisement verified against the "
                             "fleet's keys") == 2
            assert log.count("sent the masked update") == 2 and log.count("unmasking answered") == 2
            assert "not verified" not in log and "refus" not in log
    finally:
        watcher.close()
        _stop([aggregator, *devices])
