"""Personalization (issue 18): --personal-layers (FedPer: layers that never leave the device) and --personalize
finetune:K (the devices' accuracy after K local steps, beside the global model's).

The unit tests check the pieces in process: which names the option resolves, how a device's copy follows a change of
tier, its file across restarts, the aggregator's refusal of an update that carries a personal layer, the summary's
per-device metrics and the options that are refused. The federations run over the real Mosquitto at 127.0.0.1:1883
with real ONNX Runtime training on a label-skewed split of digits (mlp8): the uplink is read off the broker by a
plain subscriber, and every update frame on it is decoded and checked for personal layers.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from aggregator.cli import configure_parser
from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.personal import device_metrics, worst_mean
from aggregator.engines.relay import FollowTask, RelayEngine
from aggregator.engines.rounds import RoundEngine
from aggregator.inbox import Inbox
from aggregator.monitor import Monitor
from aggregator.options import resolve_options
from aggregator.registry import DeviceRegistry
from aggregator.report import load_run, render
from aggregator.service import AggregatorService
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateRecord, StateStore
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.tiering import DynamicTiers, FixedTiers
from edge_client.agent import ClientConfig, DeviceAgent
from edge_client.personal import PersonalLayers, PersonalLayersCorrupt
from edge_client.virtual_device import VirtualDevice
from models.data import Dataset, load_digits, train_test_split
from models.export import export_all
from models.personal import fit_personal, merge_personal, personal_names
from models.spec import ModelSpec
from protocol.frame import encode_frame, read_header
from protocol.messages import Hello, Reject, RejectReason, RoundSummary, TrainTask, Update, new_id
from protocol.mqtt.url import parse as parse_broker
from protocol.signing import DeviceKey
from protocol.topics import Topics

SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(32,))  # fc1 (32 x 64) -> fc2 (10 x 32), the head
HEAD = ("fc2.weight", "fc2.bias")
PARAMETERS = ("fc1.weight", "fc1.bias", *HEAD)


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(SPEC, ["a", "c"], out)
    return out


@pytest.fixture(scope="module")
def shards() -> list[tuple[Dataset, Dataset]]:
    """Four devices of digits, each holding three classes mostly (label skew), split 70/30 into train and test."""
    digits = load_digits()
    order = np.argsort(digits.y, kind="stable")
    return [train_test_split(digits.subset(part), 0.3, seed=i) for i, part in enumerate(np.array_split(order, 4))]


# -- names, tiers and the device's file ------------------------------------------------------------------------------

def test_personal_layers_are_names_or_patterns_and_unknown_names_list_what_the_model_has():
    assert personal_names(["fc2.*"], PARAMETERS) == HEAD
    assert personal_names(["fc2.bias", "fc2.weight"], PARAMETERS) == HEAD  # in the model's order
    with pytest.raises(ValueError, match=r"no parameter 'head\.\*'; it has: fc1\.weight, fc1\.bias, fc2\.weight"):
        personal_names(["head.*"], PARAMETERS)
    with pytest.raises(ValueError, match="every parameter"):
        personal_names(["*"], PARAMETERS)
    with pytest.raises(ValueError, match="running statistics"):
        personal_names(["bn.*"], ("conv.weight", "bn.weight", "bn.running_mean", "bn.running_var"))


def test_a_personal_layer_follows_a_tier_change_own_values_on_the_shared_block_global_beyond():
    own_wide = np.arange(10 * 32, dtype=np.float32).reshape(10, 32)  # trained at tier a
    global_narrow = -np.ones((10, 8), np.float32)  # a task of tier c: the global leading block
    narrow = fit_personal(own_wide, global_narrow)
    assert np.array_equal(narrow, own_wide[:, :8])  # sliced from the device's own copy
    trained_narrow = narrow + 100
    kept = merge_personal(own_wide, trained_narrow)
    assert kept.shape == (10, 32)  # the wider part is kept for a later wider tier
    assert np.array_equal(kept[:, :8], trained_narrow) and np.array_equal(kept[:, 8:], own_wide[:, 8:])
    global_wide = -np.ones((10, 32), np.float32)
    only_narrow = fit_personal(trained_narrow, global_wide)  # a device that only ever trained tier c goes to a
    assert np.array_equal(only_narrow[:, :8], trained_narrow) and np.all(only_narrow[:, 8:] == -1)


def test_the_devices_copy_persists_starts_from_global_once_and_a_corrupt_file_names_itself(tmp_path):
    received = {"fc1.weight": np.zeros((32, 64), np.float32), "fc2.weight": np.ones((10, 32), np.float32)}
    layers = PersonalLayers(tmp_path)
    assert layers.start("mlp8", ["fc2.weight"], received)["fc2.weight"] is received["fc2.weight"]  # first time: global
    mine = {"fc2.weight": np.full((10, 32), 7.0, np.float32)}
    layers.save("mlp8", layers.trained("mlp8", mine))
    again = PersonalLayers(tmp_path)  # a restart
    started = again.start("mlp8", ["fc2.weight"], received)
    assert np.array_equal(started["fc2.weight"], mine["fc2.weight"]) and started["fc1.weight"] is received["fc1.weight"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left
    layers.path("mlp8").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(PersonalLayersCorrupt, match=r"personal-layers-mlp8\.npz cannot be read .*delete the file"):
        PersonalLayers(tmp_path)
    layers.path("mlp8").write_bytes(b"garbage")
    with pytest.raises(PersonalLayersCorrupt, match=r"\(ValueError: not an \.npz archive\); .*delete the file"):
        PersonalLayers(tmp_path)


def test_a_personal_layers_file_past_the_cache_bound_or_not_decompressing_names_itself(tmp_path):
    layers = PersonalLayers(tmp_path)
    layers.save("mlp8", {"fc2.weight": np.ones((10, 32), np.float32)})
    assert PersonalLayers(tmp_path, max_bytes=10_000).held("mlp8")  # 1280 bytes and a header: within the bound
    with pytest.raises(PersonalLayersCorrupt, match=r"personal-layers-mlp8\.npz .*more than the cache bound"):
        PersonalLayers(tmp_path, max_bytes=1_000)
    np.savez_compressed(layers.path("mlp8"), **{"fc2.weight": np.arange(10_000, dtype=np.float32)})
    data = bytearray(layers.path("mlp8").read_bytes())
    data[60:200] = bytes(b ^ 0x55 for b in data[60:200])  # deflate data that does not decompress (zlib.error)
    layers.path("mlp8").write_bytes(bytes(data))
    with pytest.raises(PersonalLayersCorrupt, match=r"personal-layers-mlp8\.npz cannot be read .*delete the file"):
        PersonalLayers(tmp_path)


# -- the aggregator ----------------------------------------------------------------------------------------------------

def test_the_summary_reports_the_devices_mean_and_worst_tenth():
    accuracies = {f"d{i}": (i / 20, min(1.0, i / 10)) for i in range(20)}
    metrics = device_metrics(accuracies)
    assert metrics["acc_global_mean"] == pytest.approx(np.mean([i / 20 for i in range(20)]))
    assert metrics["acc_global_worst10"] == pytest.approx((0 + 1 / 20) / 2)  # the lowest 2 of 20
    assert metrics["acc_finetuned_worst10"] == pytest.approx(0.05) and metrics["acc_finetuned_devices"] == 20
    assert device_metrics({"d": (0.5, None)}) == {"acc_global_mean": 0.5, "acc_global_worst10": 0.5,
                                                   "acc_global_devices": 1.0}
    assert worst_mean([0.9]) == 0.9


class Recorder:
    """Stands in for the service's MqttLink: keeps what it publishes."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def publish(self, topic: str, frame: bytes, retain: bool = False) -> int:
        self.sent.append(frame)
        return len(frame)


def test_the_aggregator_refuses_an_update_that_carries_a_personal_layer_naming_it(art, tmp_path):
    config = EngineConfig(fleet="f1", rounds=3, round_timeout_s=60.0, personal_layers=HEAD)
    engine = RoundEngine(EngineParts(config, FedAvg(min_clients=1), ArtifactStore(art), StateStore(tmp_path / "s"),
                                     DeviceRegistry()))
    service = AggregatorService(engine, parse_broker("mqtt://127.0.0.1:1"), inbox=Inbox(),
                                key=DeviceKey(tmp_path / "key", file_name="aggregator.key"))
    service.link = recorder = Recorder()  # type: ignore[assignment]
    topics, now = Topics("f1"), time.time()
    service.handle_safely(topics.status("d0"), encode_frame("f1", "d0", Hello(num_samples=10, tier="a")), now)
    service._send(engine.tick(now))  # round 1 opens: d0's task
    shapes = ArtifactStore(art).tiers["a"].shapes
    update = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=10, steps=1, train_loss=1.0,
                    train_accuracy=0.5, train_seconds=0.1)
    whole = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    service.handle_safely(topics.up("d0"), encode_frame("f1", "d0", update, whole), now)
    rejects = [body for body in (read_header(f).body for f in recorder.sent) if isinstance(body, Reject)]
    assert [r.reason for r in rejects] == [RejectReason.BAD_TENSOR]
    assert "carries personal layers ['fc2.bias', 'fc2.weight']" in rejects[0].detail
    assert engine.rejected == {"bad_tensor": 1} and engine.view().answered == 0  # nothing of it applied
    shared = {name: whole[name] for name in ("fc1.weight", "fc1.bias")}
    service.handle_safely(topics.up("d0"), encode_frame("f1", "d0", update.model_copy(update={"update_id": new_id()}),
                                                         shared), now)
    assert engine.rejected == {"bad_tensor": 1} and engine.record.version == 1  # the shared layers alone: committed


def test_the_status_page_and_the_report_show_the_devices_accuracies(art, tmp_path):
    registry = DeviceRegistry()
    for device in ("d0", "d1"):
        registry.hello(device, 50, 10, "a", "portable", now=0.0)
    engine = RoundEngine(EngineParts(EngineConfig(fleet="f", rounds=2, round_timeout_s=10, finetune_steps=5),
                                     FedAvg(min_clients=2), ArtifactStore(art), StateStore(tmp_path / "state"), registry))
    zeros = {n: np.zeros(s, np.float32) for n, s in ArtifactStore(art).tiers["a"].shapes.items()}
    monitor = Monitor(refresh_s=60)
    engine.tick(1.0)
    for device, (before, after) in {"d0": (0.25, 0.75), "d1": (0.5, 0.5)}.items():
        update = Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=50, steps=2, train_loss=1.0,
                        train_accuracy=0.1, train_seconds=0.1, eval_loss=1.0, eval_accuracy=before, eval_samples=10,
                        personal_loss=0.5, personal_accuracy=after)
        engine.on_update(device, new_id(), update, zeros, 1000, 2.0)
    monitor.observe(engine, 3.0)
    [round1] = json.loads(monitor.snapshot().json_bytes)["history"]
    assert round1["personal"] == {"acc_global_mean": 0.375, "acc_global_worst10": 0.25, "acc_global_devices": 2.0,
                                  "acc_finetuned_mean": 0.625, "acc_finetuned_worst10": 0.5, "acc_finetuned_devices": 2.0}
    page = render(load_run(tmp_path / "state"))
    assert '<section id="personalization">' in page and "<th>fine-tuned, mean (round 1)</th><td>0.6250</td>" in page
    bare = tmp_path / "bare"
    StateStore(bare).commit(StateRecord(fleet="f", model="m", version=1, round=1, history=[
        RoundSummary(round=1, version=1, selected=1, answered=1, accuracy=0.5)]), None)
    assert 'id="personalization"' not in render(load_run(bare))  # nothing personal reported: no section


def test_a_relay_refuses_a_personalized_task_saying_why(art, tmp_path):
    store = ArtifactStore(art)
    relay = RelayEngine(EngineParts(EngineConfig(fleet="site1"), FollowTask(), store, StateStore(tmp_path / "s"),
                                    DeviceRegistry()))
    tier = store.tiers["a"]
    task = TrainTask(round=1, model_version=0, tier="a", manifest_sha256=tier.manifest_sha256, artifacts=tier.files,
                     deadline=time.time() + 60, epochs=1, batch_size=16, learning_rate=0.1, personal_layers=list(HEAD))
    weights = {n: np.zeros(s, np.float32) for n, s in tier.shapes.items()}
    for personalized in (task, task.model_copy(update={"personal_layers": [], "finetune_steps": 5})):
        with pytest.raises(ValueError, match="a relay does not forward personalization"):
            relay.start(personalized, weights, time.time())


def test_a_virtual_device_refuses_a_task_naming_personal_layers_instead_of_sending_them(art, tmp_path):
    tier = ArtifactStore(art).tiers["a"]
    task = TrainTask(round=1, model_version=0, tier="a", manifest_sha256=tier.manifest_sha256, artifacts=tier.files,
                     deadline=time.time() + 60, epochs=1, batch_size=16, learning_rate=0.1, personal_layers=list(HEAD))
    refused: list[tuple[object, ...]] = []
    device = SimpleNamespace(runtime=SimpleNamespace(count=lambda name: None), _task=None,
                             _refuse=lambda *why: refused.append(why))
    VirtualDevice._handle(device, SimpleNamespace(body=task, header=SimpleNamespace(sender="aggregator")))
    assert device._task is None  # never trained, so no update carrying the head is ever sent
    assert refused[0][0] is RejectReason.UNEXPECTED and "personal layers" in refused[0][1]


def _resolve(*options: str) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    resolve_options(parser.parse_args(["--arch", "mlp", "--state-dir", "/nonexistent/p18", *options]))


@pytest.mark.parametrize("options,message", [
    (["--personalize", "finetune"], "expected finetune:K"),
    (["--personalize", "finetune:0"], "expected finetune:K"),
    (["--personalize", "finetune:100001"], "expected finetune:K"),
    (["--personalize", "tune:5"], "expected finetune:K"),
    (["--personal-layers", "head"], r"no parameter 'head'; it has: fc1\.weight, fc1\.bias, fc2\.weight"),
    (["--personal-layers", " , "], "names no parameter"),
    (["--personal-layers", "fc3.*", "--secure-aggregation"], "cannot be combined with --secure-aggregation"),
    (["--personal-layers", "fc3.*", "--dp", "central", "--dp-clip", "1", "--dp-noise", "1"], "--dp central"),
    (["--personal-layers", "fc3.*", "--eval-data", "digits"], "--eval-data"),
    (["--personalize", "finetune:5", "--secure-aggregation"], "masked answer"),
])
def test_personalization_options_that_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        _resolve(*options)


def test_personalization_options_resolve_patterns_against_the_models_parameters():
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--arch", "mlp", "--state-dir", "/nonexistent/p18", "--personal-layers", "fc3.*",
                              "--personalize", "finetune:20"])
    settings = resolve_options(args).personalization
    assert settings.personal_layers == ("fc3.weight", "fc3.bias") and settings.finetune_steps == 20


# -- federations over Mosquitto ------------------------------------------------------------------------------------------

class Uplink:
    """A plain paho subscriber on the fleet's uplink topics: every frame any device publishes, as the broker relays it."""

    def __init__(self, url: str, fleet: str) -> None:
        self.frames: list[bytes] = []
        self.arrived = threading.Condition()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
        self.client.on_message = lambda c, u, m: self._take(m.payload)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.subscribe(f"{Topics(fleet).base}/up/+", qos=1)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def _take(self, frame: bytes) -> None:
        with self.arrived:
            self.frames.append(frame)
            self.arrived.notify_all()

    def updates(self, expected: int) -> list[tuple[Update, list[str], str]]:
        """The update frames seen once `expected` of them arrived (10 s at most; the aggregator counted them, but this
        subscriber may still be a frame behind): body, names of the tensors carried, sender."""

        def seen() -> list[tuple[Update, list[str], str]]:
            headers = [read_header(frame).header for frame in self.frames]
            return [(h.body, [t.name for t in h.tensors], h.sender) for h in headers if isinstance(h.body, Update)]

        with self.arrived:
            self.arrived.wait_for(lambda: len(seen()) >= expected, timeout=10)
            return seen()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextmanager
def federation(url: str, fleet: str, art: Path, state: Path, caches: Path, shards: list[tuple[Dataset, Dataset]],
               config: EngineConfig, strategy: FedAvg) -> Iterator[tuple[RoundEngine, list[DeviceAgent]]]:
    """An aggregator service and one device agent per shard over the broker, until the engine's rounds are done."""
    engine = RoundEngine(EngineParts(config, strategy, ArtifactStore(art), StateStore(state), DeviceRegistry()))
    service = AggregatorService(engine, parse_broker(url), inbox=Inbox(),
                                key=DeviceKey(state, file_name="aggregator.key"))
    stop = threading.Event()
    agents = [DeviceAgent(ClientConfig(broker=parse_broker(url), device_id=f"d{i}", fleet=fleet, cache_dir=caches / f"d{i}",
                                       send_margin_s=0.5), train, test) for i, (train, test) in enumerate(shards)]
    threads = [threading.Thread(target=agent.run, args=(stop,), daemon=True) for agent in agents]
    server = threading.Thread(target=service.run, args=(stop,), daemon=True)
    server.start()
    for thread in threads:
        thread.start()
    try:
        server.join(60)
        assert engine.finished, "the federation did not finish its rounds within 60 s"
        yield engine, agents
    finally:
        stop.set()
        for thread in [server, *threads]:
            thread.join(20)


def _summary(engine: RoundEngine) -> RoundSummary:
    return engine.record.history[-1]


@pytest.mark.integration
def test_finetuning_on_a_label_skewed_split_beats_the_global_model(art, shards, tmp_path, mosquitto_url, fleet):
    uplink = Uplink(mosquitto_url, fleet)
    config = EngineConfig(fleet=fleet, rounds=2, round_timeout_s=30.0, finetune_steps=20)
    strategy = FedAvg(min_clients=4, batch_size=16, learning_rate=0.1, tiers=FixedTiers({"a": 1.0}))
    try:
        with federation(mosquitto_url, fleet, art, tmp_path / "state", tmp_path / "caches", shards, config,
                        strategy) as (engine, _):
            metrics = _summary(engine).metrics
        updates = uplink.updates(8)
    finally:
        uplink.close()
    assert metrics["acc_global_devices"] == metrics["acc_finetuned_devices"] == 4
    assert metrics["acc_finetuned_mean"] > metrics["acc_global_mean"] + 0.1, metrics
    assert metrics["acc_finetuned_worst10"] > metrics["acc_global_worst10"], metrics
    assert len(updates) == 8 and all(u.personal_accuracy is not None for u, _, _ in updates)
    assert all(set(names) == set(PARAMETERS) for _, names, _ in updates)  # fine-tuning changes nothing that is sent


@pytest.mark.integration
def test_personal_layers_never_leave_the_device_and_survive_its_restart(art, shards, tmp_path, mosquitto_url, fleet):
    uplink = Uplink(mosquitto_url, fleet)
    config = EngineConfig(fleet=fleet, rounds=3, round_timeout_s=30.0, personal_layers=HEAD)
    strategy = FedAvg(min_clients=4, batch_size=16, learning_rate=0.1, tiers=DynamicTiers({"a": 0.5, "c": 0.5}, seed=3))
    caches = tmp_path / "caches"
    try:
        with federation(mosquitto_url, fleet, art, tmp_path / "state", caches, shards, config, strategy) as (engine, agents):
            committed_head = {name: engine.model.weights[name] for name in HEAD}
            saved = [agent.personal.held(SPEC.name) for agent in agents]
            metrics = _summary(engine).metrics
        updates = uplink.updates(12)
    finally:
        uplink.close()
    assert len(updates) == 12
    for update, names, _ in updates:  # on the wire: the shared layers of the update's tier, never the head
        assert not set(names) & set(HEAD) and set(names) == {"fc1.weight", "fc1.bias"}, (update.tier, names)
    tiers_of = {sender: {u.tier for u, _, s in updates if s == sender} for _, _, sender in updates}
    assert any(tiers == {"a", "c"} for tiers in tiers_of.values()), tiers_of  # a device's tier changed between rounds
    initial = ArtifactStore(art).global_weights()
    for name in HEAD:  # never aggregated: the global copy keeps its first values
        assert np.array_equal(committed_head[name], initial[name])
    widths = {tier: ArtifactStore(art).tiers[tier].shapes["fc2.weight"] for tier in ("a", "c")}
    for i, held in enumerate(saved):  # each device's copy is as wide as the widest tier it trained
        assert held["fc2.weight"].shape == widths["a" if "a" in tiers_of[f"d{i}"] else "c"]
        assert set(held) == set(HEAD) and not np.array_equal(held["fc2.weight"][:, :8], initial["fc2.weight"][:, :8])
        restarted = DeviceAgent(ClientConfig(broker=parse_broker(mosquitto_url), device_id=f"d{i}", fleet=fleet,
                                             cache_dir=caches / f"d{i}"), *shards[i])  # the device started again
        for name in HEAD:
            assert np.array_equal(restarted.personal.held(SPEC.name)[name], held[name])
    assert metrics["acc_global_devices"] == 4  # each device measured the shared layers with its own head
