"""Hostile downlink, generated: the device agent's receipt of every frame an aggregator (or anyone on its topic) sends.

A structure-aware property in the manner of tests/test_fuzz.py: each example is a short sequence of
real downlink frames (tasks, delta tasks, stale and secure tasks, blobs, rejects, key announcements
of the trusted key and of an impostor, secure-aggregation rosters, share deliveries and unmask
requests built against the agent's own advertisement, and uplink kinds that do not belong there),
each mutated by `mutate_frame` (integers, strings, tensor tables, payloads) and mostly signed
again by the aggregator's key, so verification lets it through to the checks behind. The agent is
real (its cache, trust, secure-aggregation client), fresh per example, one that was given the
aggregator's key or one that pins it on first use; only its MQTT link is a stand-in.

Property: every frame ends in an acceptance (queued, stored, counted as the aggregator's refusal,
a key pinned or confirmed, handed to the secure client) or in one typed refusal (`refused` grows by
one under a RejectReason), never an exception, each within `_memory_bound` of traced memory. The
tasks it took go through the pipeline's check of received weights (a result, TaskRefused or TaskSkipped), and a
secure session gets a trained delta to mask against the delivered shares, as the pipeline would.

Cases: a few hundred in the normal suite; TIERFL_FUZZ_EXAMPLES sets them (`make fuzz`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from aggregator.store.artifacts import ArtifactStore
from edge_client.agent import ClientConfig, DeviceAgent, TaskRefused, TaskSkipped
from models.data import load_dataset, train_test_split
from models.export import export_all
from models.manifest import TierManifest
from models.zoo import ModelSpec
from protocol.frame import decode_frame, encode_frame, read_header
from protocol.messages import (AttachedWeights, Blob, BnStatistics, Catalogue, CatalogueRequest, FrameHeader, Hello,
                               MeasureBnStatistics, Reject, RejectReason, RoundSummary, SecAgg, SecureAggregation,
                               Status, Task, TaskScope, TrainTask, Update)
from protocol.mqtt.url import parse as parse_broker
from protocol.secagg.device import SecAggDevice
from protocol.secagg.messages import (AdvertiseKeys, EncryptedShares, KeyRoster, SecAggParams, ShareDelivery,
                                      UnmaskRequest)
from protocol.secagg.wire import unwrap, wrap
from protocol.signing import KEY_ANNOUNCEMENT, DeviceKey, key_announcement
from protocol.topics import Topics
from tests.conftest import peak_traced_bytes
from tests.test_fuzz import CODEC_SPECS, RAW_JSON, _examples, _memory_bound, _mutate_json, _raw, mutate_frame

FLEET, DEVICE, AGGREGATOR, SESSION = "f", "dev", "aggregator", "5e" * 16
DOWN = Topics(FLEET).down(DEVICE)
FAR = 4.0e9  # a deadline in 2096: the same frame bytes at every replay of an example
REASONS = {reason.value for reason in RejectReason}
STEPS = ["task", "task", "delta", "stale", "secure", "roster", "delivery", "unmask", "trained", "blob", "catalogue", "announce",
         "impostor", "reject", "uplink"]
MUTATIONS = st.sampled_from([0, 0, 0, 1, 1, 1, 2, 3, 4])  # mostly few: more frames get past the header to the checks behind
UPLINK = [Hello(num_samples=10), Status(online=True), CatalogueRequest(tier="a"), BnStatistics(round=1, base_version=0, tier="a", num_samples=5),
          Update(update_id="0" * 32, round=1, base_version=0, tier="a", num_samples=5, steps=1, train_loss=1.0,
                 train_accuracy=0.5, train_seconds=0.1), RoundSummary(round=1, version=1, selected=1, answered=1)]


class Link:
    """Stands in for the agent's MqttLink: keeps what the agent publishes."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    def publish(self, topic: str, frame: bytes, retain: bool = False) -> int:
        self.published.append(frame)
        return len(frame)

    def stop(self, flush_timeout_s: float = 0.0) -> None:
        pass


class Downlink:
    """The aggregator's side: its key, an impostor's, the exported tier, and the device's data."""

    def __init__(self, root: Path) -> None:
        export_all(ModelSpec(arch="mlp", hidden=(8,)), ["a"], root / "export")
        self.store = ArtifactStore(root / "export")
        self.tier = self.store.tiers["a"]
        self.manifest = TierManifest.model_validate_json(self.store.read(self.tier.manifest_sha256)[1])
        self.key = DeviceKey(root / "aggregator", file_name="aggregator.key")
        self.impostor = DeviceKey(root / "impostor", file_name="aggregator.key")
        self.data = train_test_split(load_dataset("digits").subset(np.arange(60)), 0.25, seed=0)
        self.root = root
        self.weights = {name: np.full(shape, 0.01, np.float32) for name, shape in self.tier.shapes.items()}

    def agent(self, trusted: bool) -> tuple[DeviceAgent, Link]:
        """A fresh agent; the cache folder (and so the device key) is shared, a key pinned before is removed."""
        cache = self.root / ("trusted" if trusted else "tofu")
        (cache / KEY_ANNOUNCEMENT).unlink(missing_ok=True)
        config = ClientConfig(broker=parse_broker("mqtt://127.0.0.1:1"), device_id=DEVICE, fleet=FLEET, cache_dir=cache,
                              aggregator_key=self.key.public_hex if trusted else None)
        agent = DeviceAgent(config, *self.data)
        link = Link()
        agent.link = link  # type: ignore[assignment]
        return agent, link


@pytest.fixture(scope="module")
def downlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Downlink]:
    """The downlink, with logging off: tens of thousands of refusals (each agent is new, so each logs) stay out of
    the captured log; a log call cannot raise into the agent anyway."""
    logging.disable(logging.ERROR)
    try:
        yield Downlink(tmp_path_factory.mktemp("fuzz-device"))
    finally:
        logging.disable(logging.NOTSET)


def _task(downlink: Downlink, round_number: int, **changes: object) -> TrainTask:
    fields = dict(round=round_number, model_version=round_number - 1, tier="a", epochs=1, batch_size=16,
                  manifest_sha256=downlink.tier.manifest_sha256, artifacts=downlink.tier.files, learning_rate=0.1,
                  deadline=FAR, evaluate=False)
    return TrainTask(**(fields | changes))


class Secure:
    """One example's secure round as the aggregator runs it: two peers beside the device, rosters and deliveries."""

    def __init__(self, downlink: Downlink, round_number: int) -> None:
        shapes = {name: tuple(shape) for name, shape in downlink.tier.shapes.items()}
        self.round = round_number
        self.params = SecAggParams(round=round_number, threshold=2, max_devices=3, shapes=shapes, clip=8.0, frac_bits=16)
        self.settings = SecureAggregation(session=SESSION, threshold=2, max_devices=3, frac_bits=16, clip=8.0, weight=1.0,
                                          shapes={n: list(s) for n, s in shapes.items()},
                                          block={n: list(s) for n, s in shapes.items()})
        self.task = _task(downlink, round_number, secure=self.settings)
        self.peers = [SecAggDevice(peer, self.params, shapes, session=SESSION) for peer in ("p1", "p2")]
        self.adverts = [peer.advertise() for peer in self.peers]
        self.delivered: list[EncryptedShares] = []

    def roster(self, mine: AdvertiseKeys | None) -> KeyRoster:
        roster = KeyRoster(round=self.round, devices=[*([mine] if mine else []), *self.adverts])
        if mine is not None and not self.delivered:
            for peer in self.peers:  # the peers share their keys: the device's delivery is what they encrypted for it
                self.delivered += [s for s in peer.share_keys(roster).shares if s.recipient == DEVICE]
        return roster

    def delivery(self) -> ShareDelivery:
        shares = self.delivered or [EncryptedShares(sender="p1", recipient=DEVICE, nonce="00" * 12, ciphertext="ab" * 40)]
        return ShareDelivery(round=self.round, device=DEVICE, shares=shares)


def _advertisement(link: Link) -> AdvertiseKeys | None:
    """The device's own key advertisement, from what it published."""
    for frame in link.published:
        body = decode_frame(frame).body
        if isinstance(body, SecAgg) and body.phase == "advertise":
            return unwrap(body, {})  # type: ignore[return-value]
    return None


def _signer(draw: st.DrawFn, key: DeviceKey, impostor: DeviceKey) -> Callable[[dict, str], None]:
    """Mostly signs the mutated header again with `key` (when it still parses), else keeps, drops or forges the signature."""

    def sign(header: dict, raw_text: str) -> None:
        how = draw(st.sampled_from(["again", "again", "again", "again", "keep", "none", "impostor"]))
        if how == "keep":
            return
        header.pop("signature", None)
        if how == "none":
            return
        try:
            parsed = FrameHeader.model_validate_json(_raw(header, raw_text))
        except ValidationError:
            return
        header["signature"] = (impostor if how == "impostor" else key).sign(parsed)

    return sign


OTHER_SHA = "cd" * 32
TASK_FIELDS = {  # every field of a task (and its kind: "measure"), varied within its schema bounds
    "round": st.integers(1, 10**9), "model_version": st.integers(0, 10**9),
    "weights": st.builds(AttachedWeights, delta_from=st.none() | st.integers(0, 10**9), variant=st.integers(0, 10**9)),
    "tier": st.sampled_from(["b", "A" * 64, ".", ".."]),
    "manifest_sha256": st.just(OTHER_SHA), "epochs": st.integers(1, 1000), "batch_size": st.integers(1, 65536),
    "learning_rate": st.floats(0, 10, exclude_min=True), "proximal_mu": st.floats(0, 100), "dp_clip": st.floats(0, 1e9),
    "dp_noise": st.floats(0, 1e9), "seed": st.integers(-(2**63 - 1), 2**63 - 1), "deadline": st.floats(0, 1e13),
    "evaluate": st.booleans(), "mask_classes": st.booleans(), "measure": st.booleans(), "weighted": st.booleans(),
}
ODD_NAMES = ["../escape.onnx", ".hidden", "a/b", "manifest.json", "x" * 256, "aggregator.pub", "device.key"]


def _in_bounds_task(draw: st.DrawFn, downlink: Downlink, task: TrainTask) -> Task:
    """`task` with some fields, its artifacts or its secure settings changed to other values the schema allows, or made
    a batch-norm statistics task of the same scope."""
    changes = {name: draw(TASK_FIELDS[name]) for name in draw(st.lists(st.sampled_from(sorted(TASK_FIELDS)), max_size=3))}
    measure = changes.pop("measure", False)
    files = dict(downlink.tier.files)
    how = draw(st.sampled_from(["same", "same", "drop", "retarget", "odd", "many"]))
    if how == "drop":
        files.pop(draw(st.sampled_from(sorted(files))))
    elif how == "retarget":
        files[draw(st.sampled_from(sorted(files)))] = OTHER_SHA
    elif how == "odd":
        files[draw(st.sampled_from(ODD_NAMES))] = draw(st.sampled_from([OTHER_SHA, *files.values()]))
    elif how == "many":
        files |= {f"x{i}.onnx": OTHER_SHA for i in range(64 - len(files))}
    if task.secure is not None and draw(st.booleans()):
        secure, shapes = task.secure, dict(task.secure.shapes)
        name = draw(st.sampled_from(sorted(shapes)))
        block = draw(st.sampled_from([shapes, {}, shapes | {name: [s + 1 for s in shapes[name]]}, shapes | {name: [1]},
                                      shapes | {"extra": [1 << 26]}]))
        changes["secure"] = secure.model_copy(update={
            "threshold": draw(st.integers(2, 6)), "max_devices": draw(st.integers(2, 6)),
            "ring_bits": draw(st.sampled_from([32, 64])), "frac_bits": draw(st.integers(0, 52)),
            "clip": draw(st.floats(1e-9, 1e9)), "weight": draw(st.floats(1e-9, 1e12)),
            "block": block, "shapes": draw(st.sampled_from([shapes, block, shapes | {"extra": [1 << 26]}]))})
    fields = task.model_dump() | {"artifacts": files} | changes
    if measure:
        return MeasureBnStatistics.model_validate({k: v for k, v in fields.items() if k in TaskScope.model_fields})
    return TrainTask.model_validate(fields)


def _in_bounds_weights(draw: st.DrawFn, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights of other shapes, names or values (NaN, Inf, huge), or some left out."""
    out = {}
    for name, value in weights.items():
        how = draw(st.sampled_from(["same", "same", "same", "shape", "nan", "inf", "huge", "drop"]))
        if how == "shape":
            out[name] = np.zeros(draw(st.sampled_from([(3, 3), (0,), (), (*value.shape, 1)])), np.float32)
        elif how in ("nan", "inf", "huge"):
            out[name] = np.full(value.shape, {"nan": np.nan, "inf": np.inf, "huge": 3e38}[how], np.float32)
        elif how == "same":
            out[name] = value
    if draw(st.booleans()):
        out[draw(st.sampled_from(["extra", *ODD_NAMES]))] = np.ones(3, np.float32)
    return out


def _in_bounds_secagg(draw: st.DrawFn, message: BaseModel) -> BaseModel:
    """A roster, delivery or unmask request with its devices, shares or lists changed within the schema."""
    if isinstance(message, KeyRoster):
        devices = list(message.devices)
        how = draw(st.sampled_from(["twice", "drop", "round", "reuse", "shapes", "alone"]))
        at = draw(st.integers(0, len(devices) - 1))
        if how == "twice":
            devices.append(devices[at])
        elif how == "drop":
            del devices[at]
        elif how == "round":
            devices[at] = devices[at].model_copy(update={"round": devices[at].round + 1})
        elif how == "reuse":
            devices[at] = devices[at].model_copy(update={"s_public": devices[at - 1].c_public})
        elif how == "shapes":
            devices[at] = devices[at].model_copy(update={"shapes": {"w": (1 << 26,)}})
        else:
            devices = devices[:1]
        return message.model_copy(update={"devices": devices, "round": draw(st.sampled_from([message.round] * 3 + [9]))})
    if isinstance(message, ShareDelivery):
        shares = list(message.shares)
        how = draw(st.sampled_from(["tamper", "recipient", "sender", "twice", "empty", "device"]))
        at = draw(st.integers(0, len(shares) - 1))
        if how == "tamper":
            text = shares[at].ciphertext
            i = draw(st.integers(0, len(text) - 1))
            shares[at] = shares[at].model_copy(update={"ciphertext": text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1:]})
        elif how in ("recipient", "sender"):
            shares[at] = shares[at].model_copy(update={how: draw(st.sampled_from(["p1", "p2", DEVICE, "zz"]))})
        elif how == "twice":
            shares.append(shares[at])
        elif how == "empty":
            shares = []
        return message.model_copy(update={"shares": shares, "device": DEVICE if how != "device" else "p1"})
    names = st.lists(st.sampled_from([DEVICE, "p1", "p2", "zz"]), max_size=5)
    return message.model_copy(update={"survivors": draw(names), "dropped": draw(names)})


def _frame(draw: st.DrawFn, downlink: Downlink, step: str, index: int, secure: Secure | None,
           link: Link) -> tuple[bytes, Secure | None]:
    """One hostile downlink frame of the kind `step`, and the example's secure round (opened by a secure task).

    Half the frames first get changes their schema allows (fields, files, shapes, values, shares), then every frame
    goes through `mutate_frame` (changes it does not allow), mostly signed again by the key its receiver trusts.
    """
    key, codec, tensors = downlink.key, "float32", None
    round_number = draw(st.integers(1, 3))
    hostile = draw(st.booleans())
    if step in ("task", "delta", "stale", "secure"):
        if step == "secure":
            secure = secure or Secure(downlink, round_number)
            body = secure.task
        else:
            changes = {"weights": AttachedWeights(delta_from=round_number - 1)} if step == "delta" else {"deadline": 1.0e9} if step == "stale" else {}
            body = _task(downlink, round_number, **changes)
        names = draw(st.lists(st.sampled_from(sorted(downlink.weights)), unique=True, min_size=1)) if step == "delta" \
            else sorted(downlink.weights)
        tensors, codec = {name: downlink.weights[name] for name in names}, draw(st.sampled_from(CODEC_SPECS))
        if hostile:
            body, tensors = _in_bounds_task(draw, downlink, body), _in_bounds_weights(draw, tensors)
            if not all(np.isfinite(value).all() for value in tensors.values()):
                codec = "float32"  # the only codec that carries NaN and Inf
            if draw(st.booleans()):
                tensors, codec = {name: value.reshape(-1).view(np.uint8) for name, value in tensors.items()}, "uint8"
    elif step in ("roster", "delivery", "unmask"):
        secure = secure or Secure(downlink, round_number)
        message = secure.roster(_advertisement(link)) if step == "roster" else secure.delivery() if step == "delivery" \
            else UnmaskRequest(round=secure.round, survivors=[DEVICE, "p1"], dropped=["p2"])
        body, tensors = wrap(_in_bounds_secagg(draw, message) if hostile else message, SESSION)
        if draw(st.integers(0, 3)) == 0:  # the payload's JSON mutated past its schema
            tree = json.loads(body.payload)
            _mutate_json(draw, tree)
            body = SecAgg.model_construct(**(body.model_dump() | {"payload": _raw(tree, draw(RAW_JSON)).decode()}))
    elif step == "blob":
        sha = draw(st.sampled_from(sorted(downlink.tier.files.values())))
        name, content = downlink.store.read(sha)
        if hostile:
            name = draw(st.sampled_from([name, *ODD_NAMES]))
            sha = draw(st.sampled_from([sha, OTHER_SHA, hashlib.sha256(content[:-1]).hexdigest()]))
            content = draw(st.sampled_from([content, content[:-1], b"", content * 2]))
        body, tensors, codec = Blob(sha256=sha, name=name), {"data": np.frombuffer(content, np.uint8)}, "uint8"
    elif step == "catalogue":  # answers no request of this agent's: refused on receipt or by the loop, never acted on
        files = dict(downlink.tier.files)
        if hostile:
            files = draw(st.dictionaries(st.sampled_from([*files, *ODD_NAMES]), st.sampled_from([*files.values(), OTHER_SHA]),
                                         max_size=6))
        body = Catalogue(tier=draw(st.sampled_from(["a", "b"])), manifest_sha256=downlink.tier.manifest_sha256,
                         artifacts=files, request=draw(st.sampled_from(["0" * 32, f"{index + 1:032x}"])))
    elif step in ("announce", "impostor"):
        key = downlink.key if step == "announce" else downlink.impostor  # an announcement is signed by the key it carries
        (body, tensors), codec = key_announcement(key), "uint8"
        if hostile:
            data = draw(st.sampled_from([tensors["data"][:31], np.concatenate([tensors["data"], [0]]).astype(np.uint8),
                                         tensors["data"][::-1].copy()]))
            body = draw(st.sampled_from([body, Blob(sha256=hashlib.sha256(data.tobytes()).hexdigest(), name=KEY_ANNOUNCEMENT)]))
            tensors = draw(st.sampled_from([{"data": data}, {"data": tensors["data"], "more": data}, {"key": data}]))
    elif step == "reject":
        body = Reject(reason=draw(st.sampled_from(list(RejectReason))), detail="refused", round=round_number)
        if hostile:
            body = Reject(reason=body.reason, detail=draw(st.text(max_size=3000)), round=draw(st.none() | st.integers(0, 10**9)),
                          ref_msg_id=draw(st.none() | st.text(max_size=64)))
    else:
        body = draw(st.sampled_from(UPLINK))
    sender = draw(st.sampled_from([AGGREGATOR] * 8 + [DEVICE, "mallory"]))
    frame = encode_frame(FLEET, sender, body, tensors, codec=codec, rng=np.random.default_rng(0))
    return mutate_frame(draw, frame, _signer(draw, key, downlink.impostor), msg_id=f"{index + 1:032x}",
                        mutations=MUTATIONS, right_length=40), secure


def _outcome(agent: DeviceAgent, frame: bytes, before: dict[str, int], queued: int) -> str:
    """How the agent ended a frame: 'refused:<reason>' (exactly one typed refusal) or what it accepted it as."""
    grown = {key: agent.refused[key] - before.get(key, 0) for key in agent.refused if agent.refused[key] != before.get(key, 0)}
    if grown:
        assert len(grown) == 1 and set(grown.values()) == {1}, f"one frame, several refusals: {grown}"
        (key,) = grown
        reason = key.removeprefix("by-aggregator:")
        assert reason in REASONS, f"an untyped refusal {key!r}"
        return "accepted: the aggregator's refusal" if key.startswith("by-aggregator:") else f"refused:{reason}"
    body = read_header(frame).body  # nothing refused: a frame that passed every check
    if isinstance(body, Task):
        assert len(agent._tasks) == queued + 1, "a task neither refused nor taken"
    else:
        assert isinstance(body, (Blob, SecAgg)), f"a {body.kind} neither refused nor acted on"
    return f"accepted: {body.kind}"


def _receive(agent: DeviceAgent, frame: bytes) -> None:
    """The frame as the network thread receives it, then whatever it queued as the device loop handles it."""
    agent._on_frame(DOWN, frame)
    while len(agent.inbox):
        agent._serve(0)


@settings(max_examples=_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                HealthCheck.data_too_large])
@given(st.data())
def test_structure_aware_downlink_frames_end_in_acceptance_or_a_typed_refusal(downlink, data):
    """The device's whole receipt path (topic, header, sender, signature or key pinning, payload, dispatch), then the
    task pipeline's checks of what it took: never an exception, one typed refusal or an acceptance per frame."""
    trusted = data.draw(st.sampled_from([True, True, True, False]))  # else it pins the first key announced
    agent, link = downlink.agent(trusted)
    secure: Secure | None = None
    steps = data.draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=3))
    if not trusted and data.draw(st.booleans()):
        steps.insert(0, "announce")
    for index, step in enumerate(steps):
        if step == "trained":  # the pipeline's trained delta for the secure task: masked against the delivered shares
            if secure is not None:
                agent.secure.trained(secure.task, {n: np.zeros_like(w) for n, w in downlink.weights.items()}, None)
            continue
        frame, secure = _frame(data.draw, downlink, step, index, secure, link)
        before, queued = dict(agent.refused), len(agent._tasks)
        peak = peak_traced_bytes(lambda: _receive(agent, frame))
        outcome = _outcome(agent, frame, before, queued)
        note(f"frame {index} ({step}): {outcome}")
        event(f"{step}: {outcome}")  # counted by --hypothesis-show-statistics
        assert peak < _memory_bound(frame), f"receiving a {len(frame)}-byte frame traced {peak} bytes"
    while agent._tasks:  # what the task pipeline checks first of a task it took: the weights it carries
        taken = agent._tasks.popleft()
        if taken.body.manifest_sha256 == downlink.tier.manifest_sha256:
            try:
                agent._get_weights(taken.body, taken.tensors, downlink.manifest)
            except TaskRefused as exc:
                assert exc.reason.value in REASONS and exc.detail
            except TaskSkipped:  # a delta against a version it does not hold: refused as wrong_version, hello sent
                pass
