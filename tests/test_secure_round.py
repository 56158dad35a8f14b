"""Secure rounds end to end in process: SecureRoundEngine on a fake clock and one SecureClient (real
SecAggDevice) per device, every message passed as frame bytes; tiers, dropouts, failures, refusals,
and signed key advertisements against an aggregator that substitutes keys."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aggregator.cli import configure_parser
from aggregator.engines.base import EngineConfig, Outgoing
from aggregator.engines.parts import EngineParts
from aggregator.engines.secure import SecureConfig, SecureRoundEngine, fraction_bits
from aggregator.options import secure_from_args
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from edge_client.secure_client import SecureClient
from models.export import export_all
from models.zoo import ModelSpec
from protocol.blocks import leading_slices
from protocol.frame import decode_frame, encode_frame
from protocol.messages import Reject, RejectReason, RoundSummary, SecAgg, Task, Update, new_id
from protocol.secagg.device import _share_aad, verify_advertisement
from protocol.secagg.masks import agree_key, public_key_hex
from protocol.secagg.messages import AdvertiseKeys, KeyRoster, SecAggError
from protocol.secagg.wire import unwrap, wrap
from protocol.signing import DeviceKey

SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(16,))
TIMEOUT = 20.0
START = 100.0
FLEET = "sec"
# device -> (tier, samples): three widths, unequal data
DEVICES = {"d1": ("a", 10), "d2": ("b", 30), "d3": ("a", 20), "d4": ("c", 40)}


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("secure-art")
    export_all(SPEC, ["a", "b", "c"], out)
    return out


Tamper = Callable[[str, SecAgg], SecAgg]  # what the aggregator's message to a device becomes in flight


class Fleet:
    """An engine and its devices, wired through frame bytes; what `silent` devices send is lost.

    `clients[d]` are device d's SecureClient options (signing key, fleet keys); `tamper` rewrites the
    aggregator's secure-aggregation messages on their way down; `enrolled` goes to the engine.
    """

    def __init__(self, art: Path, state: Path, threshold: float, ledger: Ledger | None = None,
                 clients: Mapping[str, dict[str, Any]] | None = None, tamper: Tamper | None = None,
                 enrolled: Mapping[str, str] | None = None) -> None:
        self.artifacts = ArtifactStore(art)
        self.registry = DeviceRegistry()
        for device, (tier, samples) in DEVICES.items():
            self.registry.hello(device, samples, 0, tier, "ort-training", now=0.0)
        config = EngineConfig(fleet=FLEET, rounds=2, round_timeout_s=TIMEOUT)
        self.engine = SecureRoundEngine(EngineParts(config, FedAvg(min_clients=2), self.artifacts, StateStore(state),
                                                    self.registry, ledger=ledger),
                                        SecureConfig(threshold_fraction=threshold), enrolled=enrolled)
        self.clients = {d: SecureClient(d, lambda body, tensors, d=d: self._up(d, body, tensors), **(clients or {}).get(d, {}))
                        for d in DEVICES}
        self.tamper = tamper
        self.sent: list[tuple[str, SecAgg]] = []  # what the devices sent that reached the aggregator
        self.uplink: list[tuple[str, bytes]] = []
        self.tasks: dict[str, Task] = {}
        self.summaries: list[RoundSummary] = []
        self.silent: set[str] = set()
        self.unsent: list[tuple[str, bytes]] = []  # what silent devices would have sent
        self.wire: dict[tuple[str, str], int] = {}  # (device, phase) -> bytes of the frames of that phase, either way
        self.now = START

    def _up(self, device: str, body: SecAgg, tensors: Mapping[str, np.ndarray] | None) -> int:
        frame = encode_frame(FLEET, device, body, tensors, "uint8")
        if device in self.silent:
            self.unsent.append((device, frame))
        else:
            self.uplink.append((device, frame))
            self.sent.append((device, body))
            self.wire[device, body.phase] = len(frame)
        return len(frame)

    def deliver(self, outgoing: list[Outgoing]) -> list[Outgoing]:
        """Send the engine's messages to the devices (as bytes); return what is not for a device."""
        rest = []
        for message in outgoing:
            if message.device_id is None:
                self.summaries.append(message.body)
                rest.append(message)
                continue
            frame = decode_frame(encode_frame(FLEET, "aggregator", message.body, message.tensors))
            body = frame.body
            if isinstance(body, Task):
                self.tasks[message.device_id] = body
                self.clients[message.device_id].on_task(body)
            elif isinstance(body, SecAgg):
                self.wire[message.device_id, body.phase] = frame.nbytes
                self.clients[message.device_id].on_message(self.tamper(message.device_id, body) if self.tamper else body)
            else:
                rest.append(message)
        return rest

    def pump(self) -> list[Outgoing]:
        """Carry messages both ways until none is left; what the engine sent that no device takes."""
        rest = []
        while self.uplink:
            device, data = self.uplink.pop(0)
            frame = decode_frame(data)
            rest += self.deliver(self.engine.on_secagg(device, frame.header.msg_id, frame.body, frame.tensors,
                                                       frame.nbytes, self.now))
        return rest

    def tick(self, now: float) -> list[Outgoing]:
        self.now = now
        return self.deliver(self.engine.tick(now)) + self.pump()

    def train(self, device: str, delta: Mapping[str, np.ndarray]) -> list[Outgoing]:
        self.clients[device].trained(self.tasks[device], delta, None)
        return self.pump()


def _deltas(artifacts: ArtifactStore, seed: int = 7) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {d: {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in artifacts.tiers[tier].shapes.items()}
            for d, (tier, _) in DEVICES.items()}


def _plain_mean(global_weights: Mapping[str, np.ndarray], deltas: dict[str, dict[str, np.ndarray]],
                weights: dict[str, float]) -> dict[str, np.ndarray]:
    """global + per-element weighted mean of the deltas over the devices holding each element, in the clear."""
    out = {}
    for name, value in global_weights.items():
        total, mass = np.zeros(value.shape), np.zeros(value.shape)
        for device, delta in deltas.items():
            block = leading_slices(delta[name].shape)
            total[block] += weights[device] * delta[name]
            mass[block] += weights[device]
        out[name] = value + np.divide(total, mass, out=np.zeros_like(total), where=mass > 0)
    return out


def test_fraction_bits_keep_the_sum_inside_the_ring() -> None:
    assert fraction_bits(4, 16.0, 32) == 24
    assert fraction_bits(1000, 16.0, 32) == 17  # 1000 x 16 x 2^18 would pass 2^31
    assert fraction_bits(1000, 16.0, 64) == 24
    with pytest.raises(ValueError, match="fraction bits"):
        fraction_bits(10**6, 1000.0, 32)


def test_mixed_tiers_with_a_dropout_before_and_after_masking_commit_the_plain_mean(
        art_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aggregator.engines.secure")
    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.5)
    global_before = {n: v.copy() for n, v in fleet.engine.weights.items()}
    assert fleet.tick(START) == []  # tasks out, keys advertised, roster and share deliveries exchanged
    assert {d: t.secure is not None for d, t in fleet.tasks.items()} == dict.fromkeys(DEVICES, True)
    settings = {d: t.secure for d, t in fleet.tasks.items()}
    assert {s.threshold for s in settings.values()} == {2}
    assert {d: s.block for d, s in settings.items()} == {
        d: {n: list(shape) for n, shape in fleet.artifacts.tiers[tier].shapes.items()} for d, (tier, _) in DEVICES.items()}
    mean_samples = sum(n for _, n in DEVICES.values()) / len(DEVICES)
    assert {d: s.weight for d, s in settings.items()} == pytest.approx({d: n / mean_samples for d, (_, n) in DEVICES.items()})

    deltas = _deltas(fleet.artifacts)
    for device in ("d1", "d2", "d3"):  # d4 drops before masking: it never sends its masked input
        assert fleet.train(device, deltas[device]) == []
    fleet.silent.add("d3")  # d3 drops after masking: it never answers the unmask request
    assert fleet.tick(START + TIMEOUT) == []  # masked-input phase over: unmask request to d1, d2, d3
    assert fleet.engine.record.version == 0
    out = fleet.tick(START + TIMEOUT * 1.3)  # unmasking's grace over without d3: unmask with d1, d2
    assert [type(m.body) for m in out] == [RoundSummary]
    assert fleet.engine.record.version == 1
    assert (out[0].body.answered, out[0].body.selected) == (3, 4)
    assert "no masked_input message from d4" in caplog.text and "no unmasking message from d3" in caplog.text
    assert "unmasked the sum of 3 masked inputs (1 dropped after sharing keys: d4)" in caplog.text

    included = {d: deltas[d] for d in ("d1", "d2", "d3")}
    expected = _plain_mean(global_before, included, {d: settings[d].weight for d in included})
    quantum = 2.0 ** -settings["d1"].frac_bits
    for name, value in fleet.engine.weights.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=4 * quantum + 1e-6, err_msg=name)
    # The elements only d4 (tier c) would have touched are all inside the others' blocks: everything moved.
    assert not any(np.array_equal(fleet.engine.weights[n], global_before[n]) for n in global_before)


def test_bytes_per_device_round_against_a_plain_float32_update(art_dir: Path, tmp_path: Path) -> None:
    fleet = Fleet(art_dir, tmp_path / "state", threshold=2 / 3)
    fleet.tick(START)
    deltas = _deltas(fleet.artifacts)
    for device in DEVICES:
        fleet.train(device, deltas[device])
    assert fleet.engine.record.version == 1 and fleet.summaries[-1].answered == 4  # committed without waiting
    for device, (tier, samples) in DEVICES.items():
        plain = encode_frame(FLEET, device, Update(update_id=new_id(), round=1, base_version=0, tier=tier,
                                                   num_samples=samples, steps=1, train_loss=1.0, train_accuracy=0.5,
                                                   train_seconds=0.1), deltas[device])
        phases = {phase: n for (d, phase), n in fleet.wire.items() if d == device}
        assert set(phases) == {"advertise", "roster", "share_keys", "delivery", "masked_input", "unmask_request", "unmasking"}
        # A 32-bit ring costs what float32 does; keys and shares add ~2.5 kB per other device and ~3 kB of headers.
        assert abs(phases["masked_input"] - len(plain)) < 200, (phases, len(plain))
        assert sum(phases.values()) - phases["masked_input"] < 3_000 + 3_000 * (len(DEVICES) - 1), phases


def test_a_delta_beyond_the_clip_is_clipped_on_the_device(art_dir: Path, tmp_path: Path) -> None:
    fleet = Fleet(art_dir, tmp_path / "state", threshold=2 / 3)
    global_before = {n: v.copy() for n, v in fleet.engine.weights.items()}
    fleet.tick(START)
    deltas = _deltas(fleet.artifacts)
    deltas["d2"]["fc1.weight"][0, 0] = 1e4  # d2's weight is 1.2: |weight x delta| would be far beyond the clip 16
    for device in DEVICES:
        fleet.train(device, deltas[device])
    assert fleet.engine.record.version == 1
    weights = {d: t.secure.weight for d, t in fleet.tasks.items()}
    clipped = {d: {n: np.clip(v, -16 / weights[d], 16 / weights[d]) for n, v in delta.items()} for d, delta in deltas.items()}
    expected = _plain_mean(global_before, clipped, weights)
    np.testing.assert_allclose(fleet.engine.weights["fc1.weight"], expected["fc1.weight"], rtol=0, atol=1e-5)


def test_a_secure_round_open_at_a_restart_starts_again_with_fresh_keys(art_dir: Path, tmp_path: Path) -> None:
    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.5)
    fleet.tick(START)
    first = fleet.tasks["d1"].secure.session
    restarted = Fleet(art_dir, tmp_path / "state", threshold=0.5)  # the same state directory
    assert restarted.engine.current_round is None and restarted.engine.record.round == 0
    restarted.tick(START + 5)
    assert restarted.engine.current_round == 1 and restarted.tasks["d1"].secure.session != first
    # A message of the first attempt is stale now.
    body, _ = wrap(AdvertiseKeys(round=1, device="d1", c_public="01" * 32, s_public="02" * 32,
                                 shapes={n: tuple(s) for n, s in fleet.artifacts.tiers["a"].shapes.items()}), first)
    out = restarted.engine.on_secagg("d1", new_id(), body, {}, 100, START + 6)
    assert _reason(out, "d1") is RejectReason.STALE_ROUND and "earlier attempt" in out[0].body.detail
    deltas = _deltas(restarted.artifacts)
    for device in DEVICES:
        restarted.train(device, deltas[device])
    assert restarted.engine.record.version == 1


def test_too_many_dropouts_fail_the_round_with_a_reason(art_dir: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.75)  # threshold 3 of 4
    fleet.tick(START)
    first_session = fleet.tasks["d1"].secure.session
    deltas = _deltas(fleet.artifacts)
    for device in ("d1", "d2"):
        fleet.train(device, deltas[device])
    before = {n: v.copy() for n, v in fleet.engine.weights.items()}
    with caplog.at_level(logging.WARNING, logger="aggregator.engines.secure"):
        out = fleet.tick(START + TIMEOUT)
    assert [type(m.body) for m in out] == [RoundSummary] and out[0].body.version == 0
    assert (fleet.engine.record.round, fleet.engine.record.version) == (1, 0)
    assert "secure aggregation failed: only 2 devices sent masked inputs, below the threshold 3" in caplog.text
    for name, value in fleet.engine.weights.items():
        np.testing.assert_array_equal(value, before[name])
    # The next round starts afresh, with a new session.
    fleet.tick(START + TIMEOUT + 1)
    assert fleet.engine.current_round == 2 and fleet.tasks["d1"].round == 2
    assert fleet.tasks["d1"].secure.session != first_session


def test_a_round_whose_keys_never_came_fails_at_the_advertise_deadline(art_dir: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.75)
    fleet.silent.update({"d2", "d3"})
    with caplog.at_level(logging.WARNING, logger="aggregator.engines.secure"):
        assert fleet.tick(START) == []
        out = fleet.tick(START + 0.2 * TIMEOUT)
    assert [type(m.body) for m in out] == [RoundSummary] and fleet.engine.record.version == 0
    assert "only 2 devices advertised keys, below the threshold 3" in caplog.text
    assert "no advertise message from d2, d3" in caplog.text


def _reason(out: list[Outgoing], device: str) -> RejectReason:
    assert len(out) == 1 and out[0].device_id == device and isinstance(out[0].body, Reject), out
    return out[0].body.reason


def test_plain_updates_and_malformed_or_out_of_phase_messages_are_refused(art_dir: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.5, ledger=ledger)
    fleet.silent.add("d4")  # d4's advert is held back, and replayed and forged by hand below
    engine, now = fleet.engine, START + 1
    fleet.tick(START)  # tasks and adverts: the round is in its advertise phase, waiting for d4
    session = fleet.tasks["d4"].secure.session
    tier_shapes = fleet.artifacts.tiers["c"].shapes
    [(_, held_back)] = fleet.unsent
    advert = unwrap(decode_frame(held_back).body, {})
    assert isinstance(advert, AdvertiseKeys)

    update = Update(update_id=new_id(), round=1, base_version=0, tier="c", num_samples=40, steps=1, train_loss=1.0,
                    train_accuracy=0.5, train_seconds=0.1)
    plain = decode_frame(encode_frame(FLEET, "d4", update, {n: np.zeros(s, np.float32) for n, s in tier_shapes.items()}))
    assert _reason(engine.on_update("d4", new_id(), plain.body, plain.tensors, plain.nbytes, now), "d4") is RejectReason.UNEXPECTED

    def secagg(device: str, **fields: object) -> list[Outgoing]:
        body = SecAgg(**{"round": 1, "session": session, "phase": "advertise", "payload": "{}", **fields})
        return engine.on_secagg(device, new_id(), body, {}, 100, now)

    wide = advert.model_copy(update={"shapes": {n: tuple(s) for n, s in fleet.artifacts.tiers["a"].shapes.items()}})
    assert _reason(secagg("d4", payload="not json"), "d4") is RejectReason.MALFORMED
    assert _reason(secagg("d4", payload=wide.model_dump_json()), "d4") is RejectReason.MALFORMED  # not its tier
    low_order = advert.model_copy(update={"s_public": "00" * 32})  # every device's pair secret would be public
    assert _reason(secagg("d4", payload=low_order.model_dump_json()), "d4") is RejectReason.MALFORMED
    assert _reason(secagg("d4", payload=advert.model_dump_json(), round=2), "d4") is RejectReason.FUTURE_ROUND
    assert _reason(secagg("d4", payload=advert.model_dump_json(), session=new_id()), "d4") is RejectReason.STALE_ROUND
    assert _reason(secagg("d4", phase="masked_input"), "d4") is RejectReason.UNEXPECTED  # out of phase
    assert _reason(secagg("d4", phase="roster"), "d4") is RejectReason.UNEXPECTED  # not a device's message
    assert _reason(secagg("d1", payload=advert.model_dump_json()), "d1") is RejectReason.DUPLICATE  # d1 advertised
    assert _reason(secagg("d1", payload=advert.model_copy(update={"device": "d1"}).model_dump_json()), "d1") \
        is RejectReason.DUPLICATE
    assert _reason(secagg("mallory", payload=advert.model_dump_json()), "mallory") is RejectReason.NOT_SELECTED
    body, _ = wrap(advert, session)
    assert _reason(engine.on_secagg("d3", new_id(), body, {}, 100, now), "d3") is RejectReason.DUPLICATE

    fleet.silent.clear()
    out = fleet.deliver(secagg("d4", payload=advert.model_dump_json()))  # d4's own: accepted, the roster goes out
    assert out == [] and fleet.pump() == [] and engine.secure_round.phase.value == "masked_input"
    assert _reason(secagg("d4", payload=advert.model_dump_json()), "d4") is RejectReason.LATE  # advertise closed
    assert engine.record.version == 0
    counts = ledger.counts()
    assert counts.get("accepted", 0) == 0 and counts["unexpected"] == 3 and counts["duplicate"] == 3
    rows = ledger._db.execute("SELECT COUNT(*) FROM received WHERE kind = 'update' AND accepted = 1").fetchone()
    assert rows == (0,)


@pytest.mark.parametrize("extra,clash", [
    (["--robust", "median"], "--robust median"),
    (["--dp", "central", "--dp-clip", "1", "--dp-noise", "1"], "--dp central"),
    (["--strategy", "fedbuff"], "--strategy fedbuff"),
    (["--strategy", "fedmut"], "--strategy fedmut"),
    (["--weigh-partial-work"], "--weigh-partial-work"),
    (["--min-clients", "1"], "--min-clients 2 or more"),
])
def test_options_that_need_individual_updates_are_refused(extra: list[str], clash: str) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert secure_from_args(parser.parse_args(["--secure-aggregation", "--dp", "local", "--dp-clip", "1",
                                               "--dp-noise", "0.1"])) is not None  # local DP is the device's
    assert secure_from_args(parser.parse_args(extra)) is None  # without --secure-aggregation nothing clashes
    with pytest.raises(ValueError, match=re.escape(clash)):
        secure_from_args(parser.parse_args(["--secure-aggregation", *extra]))


def test_batch_norm_statistics_measured_on_devices_are_refused(tmp_path: Path) -> None:
    spec = ModelSpec(arch="mlp", image_size=8, hidden=(16,), batch_norm=True)
    export_all(spec, ["a"], tmp_path / "art")
    config = EngineConfig(fleet=FLEET, bn_statistics="devices")
    with pytest.raises(ValueError, match="use --bn-statistics averaged"):
        SecureRoundEngine(EngineParts(config, FedAvg(), ArtifactStore(tmp_path / "art"), StateStore(tmp_path / "s"),
                                      DeviceRegistry()), SecureConfig())
    averaged = SecureRoundEngine(EngineParts(config.model_copy(update={"bn_statistics": "averaged"}), FedAvg(),
                                             ArtifactStore(tmp_path / "art"), StateStore(tmp_path / "s"),
                                             DeviceRegistry()), SecureConfig())
    assert averaged.record.version == 0


# ---------------------------------------------------------------- signed key advertisements (--fleet-keys)

def _device_keys(folder: Path) -> tuple[dict[str, DeviceKey], dict[str, str]]:
    """Each device's key (as `tierfl client` keeps it) and the fleet's keys file: device -> public hex."""
    keys = {d: DeviceKey(folder / d) for d in DEVICES}
    return keys, {d: k.public_hex for d, k in keys.items()}


def _verifying(keys: Mapping[str, DeviceKey], fleet_keys: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    return {d: {"signing_key": key.private_key, "fleet_keys": fleet_keys} for d, key in keys.items()}


def _sent(fleet: Fleet, phase: str) -> dict[str, Any]:
    """device -> the protocol message of `phase` it sent."""
    return {device: unwrap(body, {}) for device, body in fleet.sent if body.phase == phase}


def _reroster(body: SecAgg, change: Callable[[AdvertiseKeys], AdvertiseKeys]) -> SecAgg:
    """A roster message with `change` applied to every advertisement in it."""
    roster = unwrap(body, {})
    assert isinstance(roster, KeyRoster)
    forged, _ = wrap(KeyRoster(round=roster.round, devices=[change(a) for a in roster.devices]), body.session)
    return forged


def _opens(key: X25519PrivateKey, sealed: Any, adverts: Mapping[str, AdvertiseKeys]) -> bool:
    """Whether `key`, in the recipient's place, decrypts the shares `sealed` of round 1."""
    shared = agree_key(key, adverts[sealed.sender].c_public, "shares", 1, sealed.recipient, sealed.sender)
    try:
        AESGCM(shared).decrypt(bytes.fromhex(sealed.nonce), bytes.fromhex(sealed.ciphertext),
                               _share_aad(1, sealed.sender, sealed.recipient))
    except InvalidTag:
        return False
    return True


def test_with_fleet_keys_an_honest_round_commits_the_plain_mean(art_dir: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_client.secure_client")
    keys, fleet_keys = _device_keys(tmp_path / "keys")
    fleet = Fleet(art_dir, tmp_path / "state", threshold=2 / 3, clients=_verifying(keys, fleet_keys), enrolled=fleet_keys)
    global_before = {n: v.copy() for n, v in fleet.engine.weights.items()}
    fleet.tick(START)
    deltas = _deltas(fleet.artifacts)
    for device in DEVICES:
        fleet.train(device, deltas[device])
    assert fleet.engine.record.version == 1 and fleet.summaries[-1].answered == 4
    weights = {d: t.secure.weight for d, t in fleet.tasks.items()}
    expected = _plain_mean(global_before, deltas, weights)
    for name, value in fleet.engine.weights.items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-5, err_msg=name)
    assert "refus" not in caplog.text and "not verified" not in caplog.text

    adverts = _sent(fleet, "advertise")
    session = fleet.tasks["d1"].secure.session
    for advert in adverts.values():
        verify_advertisement(advert, fleet_keys, session)  # signed by the device's key, for this attempt
    with pytest.raises(SecAggError, match="replayed from another round"):
        verify_advertisement(adverts["d1"], fleet_keys, new_id())  # the same advertisement in another attempt


@pytest.mark.parametrize("verified", [False, True], ids=["roster-on-trust", "fleet-keys"])
def test_keys_substituted_in_the_roster_expose_shares_unless_devices_verify_it(
        art_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, verified: bool) -> None:
    caplog.set_level(logging.INFO)
    keys, fleet_keys = _device_keys(tmp_path / "keys")
    victim, attacker_c, attacker_s = "d2", X25519PrivateKey.generate(), X25519PrivateKey.generate()

    def substitute(device: str, body: SecAgg) -> SecAgg:
        """The aggregator puts its own keys in d2's place, in the roster of every device but d2 (signature kept)."""
        if body.phase != "roster" or device == victim:
            return body
        return _reroster(body, lambda a: a.model_copy(update={"c_public": public_key_hex(attacker_c),
                                                              "s_public": public_key_hex(attacker_s)})
                         if a.device == victim else a)

    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.5, tamper=substitute,
                  clients=_verifying(keys, fleet_keys if verified else None))
    fleet.tick(START)
    adverts, share_sets = _sent(fleet, "advertise"), _sent(fleet, "share_keys")
    for_victim = [sealed for message in share_sets.values() for sealed in message.shares if sealed.recipient == victim]
    readable = [sealed.sender for sealed in for_victim if _opens(attacker_c, sealed, adverts)]
    if not verified:  # today's behaviour without --fleet-keys: the attack works
        assert sorted(readable) == ["d1", "d3", "d4"]
        assert caplog.text.count("the key roster is not verified (no --fleet-keys)") == len(DEVICES)
        return

    assert set(share_sets) == {victim} and for_victim == [] and readable == []  # nothing was sealed for the attacker
    for device in ("d1", "d3", "d4"):
        assert (f"round 1: secure aggregation step refused, leaving the round: {device}: refusing the roster: the "
                f"signature on the keys of d2 does not verify against its key in the fleet's keys") in caplog.text
    deltas = _deltas(fleet.artifacts)
    for device in DEVICES:
        fleet.train(device, deltas[device])
    assert caplog.text.count("trained, but its secure session is gone; nothing sent") == 3
    out = fleet.tick(START + 0.2 * TIMEOUT)  # the share-keys deadline: only d2 shared keys
    assert [type(m.body) for m in out] == [RoundSummary] and fleet.engine.record.version == 0
    assert "secure aggregation failed: only 1 devices shared their keys, below the threshold 2" in caplog.text
    assert {device for device, _ in fleet.sent} == set(DEVICES)
    assert [device for device, body in fleet.sent if body.phase not in ("advertise", "share_keys")] == []


D4Case = Callable[[dict[str, DeviceKey], dict[str, str], Path], tuple[dict[str, Any], dict[str, str]]]


def _old_client(keys: dict[str, DeviceKey], fleet_keys: dict[str, str], tmp_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """d4 has no device key (nor fleet keys): it advertises unsigned keys."""
    return {}, fleet_keys


def _unlisted(keys: dict[str, DeviceKey], fleet_keys: dict[str, str], tmp_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The fleet keys the others hold predate d4."""
    return {"signing_key": keys["d4"].private_key}, {d: k for d, k in fleet_keys.items() if d != "d4"}


def _other_key(keys: dict[str, DeviceKey], fleet_keys: dict[str, str], tmp_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """d4 signs with a key other than the one the fleet keys list for it."""
    return {"signing_key": DeviceKey(tmp_path / "mallory").private_key}, fleet_keys


@pytest.mark.parametrize("d4_case,refusal", [
    (_old_client, "the keys of d4 are not signed"),
    (_unlisted, "d4 is not in the fleet's keys, so its keys cannot be verified"),
    (_other_key, "the signature on the keys of d4 does not verify"),
], ids=["unsigned", "unknown-device", "wrongly-signed"])
def test_devices_refuse_a_roster_with_an_unverifiable_advertisement(
        art_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, d4_case: D4Case, refusal: str) -> None:
    caplog.set_level(logging.INFO)
    keys, fleet_keys = _device_keys(tmp_path / "keys")
    d4_options, others_hold = d4_case(keys, fleet_keys, tmp_path)
    clients = {**_verifying({d: keys[d] for d in ("d1", "d2", "d3")}, others_hold), "d4": d4_options}
    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.5, clients=clients)  # an aggregator that checks nothing
    fleet.tick(START)
    assert set(_sent(fleet, "advertise")) == set(DEVICES)
    assert set(_sent(fleet, "share_keys")) == {"d4"}
    for device in ("d1", "d2", "d3"):
        assert f"leaving the round: {device}: refusing the roster: {refusal}" in caplog.text
    out = fleet.tick(START + 0.2 * TIMEOUT)
    assert [type(m.body) for m in out] == [RoundSummary] and fleet.engine.record.version == 0
    assert "only 1 devices shared their keys" in caplog.text and "--fleet-keys" in caplog.text


def test_a_signature_stripped_in_flight_is_refused(art_dir: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_client.secure_client")
    keys, fleet_keys = _device_keys(tmp_path / "keys")

    def strip(device: str, body: SecAgg) -> SecAgg:
        if body.phase != "roster":
            return body
        return _reroster(body, lambda a: a.model_copy(update={"signature": None}) if a.device == "d3" else a)

    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.5, clients=_verifying(keys, fleet_keys), tamper=strip)
    fleet.tick(START)
    assert _sent(fleet, "advertise")["d3"].signature is not None and _sent(fleet, "share_keys") == {}
    for device in ("d1", "d2", "d4"):
        assert f"{device}: refusing the roster: the keys of d3 are not signed" in caplog.text
    assert "leaving the round: d3: the roster does not carry my own advertisement unchanged" in caplog.text


def test_an_aggregator_with_enrolled_keys_leaves_an_unsigned_device_out_and_commits(
        art_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys, fleet_keys = _device_keys(tmp_path / "keys")
    clients = {**_verifying(keys, fleet_keys), "d4": {}}  # d4 advertises unsigned keys
    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.5, clients=clients, enrolled=fleet_keys)
    with caplog.at_level(logging.WARNING, logger="aggregator.engines.secure"):
        out = fleet.tick(START)
    assert _reason(out, "d4") is RejectReason.BAD_SIGNATURE
    assert "the keys of d4 are not signed" in out[0].body.detail
    fleet.tick(START + 0.2 * TIMEOUT)  # the advertise deadline: the roster goes out without d4
    deltas = _deltas(fleet.artifacts)
    for device in ("d1", "d2", "d3"):
        fleet.train(device, deltas[device])
    assert fleet.engine.record.version == 1 and fleet.summaries[-1].answered == 3
    assert set(_sent(fleet, "masked_input")) == {"d1", "d2", "d3"}


def test_fleet_keys_that_do_not_list_this_device_s_key_are_refused_at_start(tmp_path: Path) -> None:
    keys, fleet_keys = _device_keys(tmp_path / "keys")
    send = lambda body, tensors: 0  # noqa: E731
    SecureClient("d1", send, keys["d1"].private_key, fleet_keys)
    with pytest.raises(ValueError, match="list another key for d1"):
        SecureClient("d1", send, keys["d2"].private_key, fleet_keys)
    with pytest.raises(ValueError, match=r"do not list this device \(d5\)"):
        SecureClient("d5", send, keys["d1"].private_key, fleet_keys)
    with pytest.raises(ValueError, match="needs this device's own signing key"):
        SecureClient("d1", send, None, fleet_keys)


def test_without_fleet_keys_the_unverified_roster_is_warned_about_once(art_dir: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_client.secure_client")
    keys, _ = _device_keys(tmp_path / "keys")
    fleet = Fleet(art_dir, tmp_path / "state", threshold=0.5, clients=_verifying(keys, None))
    deltas = _deltas(fleet.artifacts)
    for round_number in (1, 2):
        fleet.tick(START + (round_number - 1) * TIMEOUT)
        for device in DEVICES:
            fleet.train(device, deltas[device])
        assert fleet.engine.record.version == round_number
    assert caplog.text.count("the key roster is not verified (no --fleet-keys)") == len(DEVICES)  # once per device
    assert all(advert.signature for advert in _sent(fleet, "advertise").values())  # signed all the same
