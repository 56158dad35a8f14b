"""Hostile input, generated: mutated headers of every message kind, and arbitrary updates fed to the engine.

Nothing may escape as anything but a FrameError with a reason, and nothing refused may change
the aggregator's state. The structure-aware properties build frames, chunk streams and
secure-aggregation payloads from the real schemas and codecs, then mutate integers (huge,
negative, 10^400 as raw JSON), strings, tensor tables (shapes with zero and huge axes, codecs,
counts, nbytes, meta) and payloads (with the sha256 recomputed, so decoding goes past the
hash); each case's traced memory peak stays under `_memory_bound`. The fourth feeds such frames
through the aggregator's whole message handler; tests/test_fuzz_device.py does the same to the
device's downlink handler, with `mutate_frame`.

Cases per property: a few hundred in the normal suite; TIERFL_FUZZ_EXAMPLES sets them
(`make fuzz`: 34,000 for each of the five structure-aware properties, 170,000 in all, counts
printed by --hypothesis-show-statistics).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.registry import DeviceRegistry
from aggregator.service import AggregatorService
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from models.export import export_all
from models.zoo import ModelSpec
from protocol.chunking import Reassembler, split_message
from protocol.codecs import CODECS
from protocol.frame import FrameError, decode_frame, encode_frame
from protocol.messages import (MAX_LOSS, AttachedWeights, Blob, BnStatistics, Catalogue, CatalogueRequest, Fetch, Hello,
                               MeasureBnStatistics, Reject, RejectReason, RoundSummary, SecAgg, Status, Task, TierShare,
                               TrainTask, Update, new_id)
from protocol.mqtt.url import parse as parse_broker
from protocol.secagg.messages import AdvertiseKeys, SecAggError, UnmaskResponse
from protocol.secagg.shamir import Share
from protocol.secagg.wire import unwrap
from protocol.topics import Topics

SHA = "ab" * 32
SAMPLES = [
    Hello(num_samples=10, tier="a", holds={"a": 3}, seconds_per_sample={"a": 0.01}),
    Status(online=True),
    TrainTask(round=1, model_version=0, tier="a", manifest_sha256=SHA, artifacts={"m": SHA}, epochs=1, batch_size=8,
              learning_rate=0.1, deadline=1e10),
    MeasureBnStatistics(round=1, model_version=1, tier="a", manifest_sha256=SHA, artifacts={"m": SHA}, deadline=1e10,
                        weights=AttachedWeights(delta_from=0)),
    Fetch(sha256=[SHA]),
    CatalogueRequest(tier="a"),
    Catalogue(tier="a", manifest_sha256=SHA, artifacts={"manifest.json": SHA}, request="0" * 32),
    Blob(sha256=SHA, name="checkpoint"),
    Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=5, steps=1, train_loss=1.0,
           train_accuracy=0.5, train_seconds=0.1),
    BnStatistics(round=1, base_version=1, tier="a", num_samples=5),
    Reject(reason=RejectReason.LATE, detail="x"),
    RoundSummary(round=1, version=1, selected=1, answered=1),
    SecAgg(round=1, session="0" * 32, phase="advertise", payload="{}"),
    Update(update_id=new_id(), round=2, base_version=1, tier="a", num_samples=50, steps=3, train_loss=0.7,
           train_accuracy=0.6, train_seconds=0.5, eval_loss=0.8, eval_accuracy=0.5, eval_samples=20,
           contributors={"a": TierShare(samples=50, devices=2)}),
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _examples(default: int) -> int:
    """Cases per property: `default` in the normal suite, TIERFL_FUZZ_EXAMPLES under `make fuzz`."""
    return int(os.environ.get("TIERFL_FUZZ_EXAMPLES", default))


MARK = "\u2603mark\u2603"  # a string a mutation leaves in the JSON, replaced by raw text no Python value dumps to
RAW_JSON = st.sampled_from([
    "1" + "0" * 400, "-" + "9" * 400, "1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity",
    str(2**63), str(2**64), str(-(2**63) - 1), "1e19", "-0.0", "[]", "{}", "null", "true",
    json.dumps("x" * 5000), "[" + ",".join(["1"] * 2000) + "]", "[" * 300 + "]" * 300,
    json.dumps({f"k{i}": i for i in range(300)}),
])
INTEGERS = st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**9, 10**9 + 1, 2**26, 2**26 + 1,
                            2**40, 2**70]) | st.integers()
STRINGS = st.sampled_from(["", "x" * 65, "x" * 257, "x" * 5000, "\x00", "\ud7ff\u2603", "../../etc/passwd", "a/b",
                           "+", "#"]) | st.text(max_size=40)
SHAPES = st.sampled_from([(0, 2**70), (0, 2**40, 2**40), (2**40, 2**40, 0), (0, 2**63), (2**26 + 1,), (2**13, 2**14)]) \
    .map(list) \
    | st.lists(st.sampled_from([0, 1, 2, 3, 7, 2**26, 2**26 + 1, 2**40, 2**63, 2**70, -1]), max_size=10) \
    | st.lists(st.integers(0, 12), max_size=4)
LEAF = JSON_VALUES | INTEGERS | STRINGS | RAW_JSON.map(lambda _: MARK)


def _paths(node: object, path: tuple = ()) -> list[tuple]:
    """Every path into a JSON tree (dict keys and list indices), the root excluded."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found.append((*path, key))
        found.extend(_paths(child, (*path, key)))
    return found


GROWN_JSON_CHARS = 4 << 20  # a list grows to at most this much JSON: past the 1 MiB header bound, not to gigabytes


def _mutate_json(draw: st.DrawFn, tree: dict) -> None:
    """One structural mutation of a JSON tree in place: replace, delete, add or duplicate.

    Every value drawn must be a fresh object (no shared constant lists): later mutations edit it in place.
    """
    paths = _paths(tree)
    if not paths:
        tree[draw(STRINGS)] = draw(LEAF)
        return
    path = draw(st.sampled_from(paths))
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    key, action = path[-1], draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "grow"]))
    if action == "replace":
        parent[key] = draw(LEAF | (SHAPES if key == "shape" else INTEGERS))
    elif action == "delete":
        del parent[key]
    elif action == "add":
        if isinstance(parent, dict):
            parent[draw(STRINGS)] = draw(LEAF)
        else:
            parent.insert(draw(st.integers(0, len(parent))), draw(LEAF))
    elif isinstance(parent[key], list) and parent[key]:  # duplicates, and tables past their bound (copies, not aliases)
        text = json.dumps(parent[key])
        times = draw(st.sampled_from([2, 3, 100, 5000]))
        times = max(1, min(times, GROWN_JSON_CHARS // len(text)))  # a list grown twice must not take gigabytes
        parent[key] = json.loads(json.dumps(parent[key] * times))
    else:
        parent[key] = draw(LEAF)


def names_of(header: dict) -> list[str]:
    """The tensor names of a (possibly mutated) header's table, for entries that repeat or replace one."""
    entries = header.get("tensors")
    return [e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)] \
        if isinstance(entries, list) else []


def _raw(tree: dict, raw_text: str) -> bytes:
    return json.dumps(tree).replace(json.dumps(MARK), raw_text).encode()


def _memory_bound(message: bytes) -> int:
    """What decoding `message` may trace at most: 4 MiB plus 8 bytes per byte received (copies, float16 -> float32)."""
    return (4 << 20) + 8 * len(message)


def _traced(action: object) -> tuple[object, int]:
    """Run `action()` under tracemalloc: (its result or the FrameError it raised, the peak traced bytes)."""
    tracemalloc.start()
    try:
        try:
            result = action()
        except FrameError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _check_decoded(result: object) -> None:
    """A decode ends in a fully valid frame (finite tensors of their entry's shape) or a typed refusal."""
    if isinstance(result, FrameError):
        assert isinstance(result.reason, RejectReason) and result.detail
        return
    for entry in result.header.tensors:
        value = np.asarray(result.tensors[entry.name])
        assert list(value.shape) == entry.shape
        assert value.dtype != np.float32 or np.isfinite(value).all()


CODEC_SPECS = ["float32", "float16", "int8", "int8-row", "int4", "topk:0.5", "topk:0.3+int8"]


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    """A real frame (any message kind, tensors in any codec) with its header, tensor table and payload mutated."""
    body = draw(st.sampled_from(SAMPLES))
    names = draw(st.lists(st.sampled_from(["w", "b", "fc.weight", "x" * 200]), unique=True, max_size=3))
    tensors = {name: np.random.default_rng(len(name)).standard_normal(draw(st.sampled_from([(3, 4), (5,), (), (0, 2)])))
               .astype(np.float32) for name in names}
    codec = draw(st.sampled_from(CODEC_SPECS))
    frame = encode_frame("fleet", "dev", body, tensors, codec=codec, rng=np.random.default_rng(0))
    return mutate_frame(draw, frame)


def mutate_frame(draw: st.DrawFn, frame: bytes, sign: Callable[[dict, str], None] | None = None,
                 msg_id: str = "0" * 32, mutations: st.SearchStrategy[int] = st.integers(0, 4),
                 right_length: int = 8) -> bytes:
    """`frame` with `mutations` (0 to 4) of its header, body, tensor table, entries and payload; the payload's sha256
    mostly recomputed (so decoding goes past the hash), then `sign(header, raw_text)` (to sign the header again, so
    verification goes past the signature), then a raw JSON text put in place of any MARK, and the header length
    right `right_length` times in `right_length` + 4."""
    (length,) = struct.unpack_from("<I", frame, 4)
    header, payload = json.loads(frame[8 : 8 + length]), bytearray(frame[8 + length :])
    header.update(msg_id=msg_id, sent_at=1.7e9)  # the same header every time the draws are replayed
    for _ in range(draw(mutations)):
        target = draw(st.sampled_from(["header", "body", "table", "entry", "entry", "payload", "payload"]))
        if target == "body" and isinstance(header.get("body"), dict):
            _mutate_json(draw, header["body"])
        elif target == "table":
            header["tensors"] = header.get("tensors") if isinstance(header.get("tensors"), list) else []
            extra = draw(st.binary(max_size=64))
            header["tensors"].append({"name": draw(st.sampled_from(["new", "w", *names_of(header)]) | STRINGS),
                                      "codec": draw(st.sampled_from([*CODECS, "zip", ""])),
                                      "dtype": draw(st.sampled_from(["float32", "float32", "uint8", "int64"])),
                                      "shape": draw(SHAPES), "nbytes": draw(st.just(len(extra)) | INTEGERS),
                                      "meta": draw(st.builds(dict, scale=st.just(1.0)) | st.dictionaries(STRINGS, LEAF, max_size=3))})
            payload += extra
        elif target == "entry" and isinstance(header.get("tensors"), list) and header["tensors"] \
                and isinstance(header["tensors"][0], dict):
            entry = header["tensors"][draw(st.integers(0, len(header["tensors"]) - 1))]
            if isinstance(entry, dict):
                key = draw(st.sampled_from(["shape", "codec", "nbytes", "meta", "dtype", "name"]))
                entry[key] = draw({"shape": SHAPES, "codec": st.sampled_from([*CODECS, "x"]),
                                   "nbytes": INTEGERS, "meta": st.dictionaries(STRINGS, LEAF, max_size=3)}.get(key, LEAF))
        elif target == "payload" and payload:
            at = draw(st.integers(0, len(payload) - 1))
            action = draw(st.sampled_from(["flip", "cut", "grow"]))
            if action == "flip":
                payload[at] ^= draw(st.integers(1, 255))
            elif action == "cut":
                del payload[at:]
            else:
                payload[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            _mutate_json(draw, header)
    if draw(st.integers(0, 3)) and isinstance(header, dict):
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()  # mostly: so decoding goes past the hash
    raw_text = draw(RAW_JSON)
    if sign is not None:
        sign(header, raw_text)
    raw = _raw(header, raw_text)
    length = draw(st.sampled_from([len(raw)] * right_length + [len(raw) - 1, len(raw) + 1, 2**32 - 1, 0]))
    return b"TFL1" + struct.pack("<I", length) + raw + bytes(payload)


@settings(max_examples=_examples(1500), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                HealthCheck.data_too_large])
@given(hostile_frames())
def test_structure_aware_frames_end_in_a_frame_or_a_refusal_within_memory(frame):
    result, peak = _traced(lambda: decode_frame(frame))
    _check_decoded(result)
    assert peak < _memory_bound(frame), f"decoding a {len(frame)}-byte frame traced {peak} bytes"


def _chunk_header(message: bytes) -> dict | None:
    """The JSON header of a chunk message, None when it has none (already mutated)."""
    if len(message) < 8:
        return None
    (length,) = struct.unpack_from("<I", message, 4)
    try:
        header = json.loads(message[8 : 8 + length])
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


CHUNKED_FRAMES = [  # encoded once: a fresh sent_at per draw would change their lengths, and so the draws
    encode_frame("fleet", "dev", SAMPLES[5], {"w": np.ones(size, np.float32)}) for size in (500, 3000, 9000)
]


@st.composite
def hostile_chunk_streams(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """Real chunked frames from two sources, interleaved, with pieces dropped, repeated, reordered, cut or rewritten."""
    streams = []
    for source in ("up/dev-1", draw(st.sampled_from(["up/dev-1", "up/evil"]))):
        frame = draw(st.sampled_from(CHUNKED_FRAMES))
        streams += [(source, m) for m in split_message(frame, draw(st.sampled_from([1536, 2048, 4096])))]
    for _ in range(draw(st.integers(0, 5))):
        at = draw(st.integers(0, len(streams) - 1))
        source, message = streams[at]
        action = draw(st.sampled_from(["drop", "repeat", "swap", "cut", "header", "raw", "empty"]))
        if action == "drop":
            del streams[at]
        elif action == "repeat":
            streams.insert(draw(st.integers(0, len(streams))), (source, message))
        elif action == "swap":
            other = draw(st.integers(0, len(streams) - 1))
            streams[at], streams[other] = streams[other], streams[at]
        elif action == "cut":
            streams[at] = (source, message[: draw(st.integers(0, len(message)))])
        elif action == "raw":
            streams[at] = (source, draw(st.sampled_from([b"TFC1", b"TFL1", b""])) + draw(st.binary(max_size=64)))
        elif message[:4] == b"TFC1" and (header := _chunk_header(message)) is not None:
            (length,) = struct.unpack_from("<I", message, 4)
            piece = b"" if action == "empty" else message[8 + length :]
            if action == "header":
                header[draw(st.sampled_from(["index", "count", "total_bytes", "transfer_id", "extra"]))] = \
                    draw(INTEGERS | STRINGS | RAW_JSON.map(lambda _: MARK))
            raw = _raw(header, draw(RAW_JSON))
            streams[at] = (source, b"TFC1" + struct.pack("<I", len(raw)) + raw + piece)
        if not streams:
            break
    return streams


@settings(max_examples=_examples(600), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                               HealthCheck.data_too_large])
@given(hostile_chunk_streams())
def test_structure_aware_chunk_streams_end_in_frames_or_refusals_within_budgets(stream):
    reassembler = Reassembler(max_frame_bytes=1 << 16, max_pending_bytes=1 << 15, max_transfers=4)
    received = sum(len(m) for _, m in stream)

    def feed_all() -> list[object]:
        outcomes = []
        for source, message in stream:
            if not message:
                continue  # the link drops empty (retained-clearing) payloads before the reassembler
            try:
                whole = reassembler.feed(source, message)
            except FrameError as exc:
                outcomes.append(exc)
                continue
            if whole is not None:
                try:
                    outcomes.append(decode_frame(whole, 1 << 16))
                except FrameError as exc:
                    outcomes.append(exc)
            assert reassembler.pending_bytes <= 1 << 15 and reassembler.pending_transfers <= 4
        return outcomes

    outcomes, peak = _traced(feed_all)
    for outcome in outcomes:
        _check_decoded(outcome)
    assert peak < _memory_bound(b"x" * received), f"{received} bytes of chunks traced {peak} bytes"


def _secagg_payloads() -> list[tuple[str, dict]]:
    share = Share(x=1, threshold=2, length=32, limbs=[5, 6, 7]).model_dump(mode="json")
    return [
        ("advertise", AdvertiseKeys(round=1, device="d", c_public="1" * 64, s_public="2" * 64,
                                    shapes={"w": (3, 4)}).model_dump(mode="json")),
        ("unmasking", UnmaskResponse(round=1, device="d", b_shares={"e": Share.model_validate(share)},
                                     s_shares={}).model_dump(mode="json")),
    ]


@settings(max_examples=_examples(400), deadline=None)
@given(st.sampled_from(_secagg_payloads()), st.data())
def test_structure_aware_secagg_payloads_parse_or_are_refused(sample, data):
    phase, payload = sample
    payload = json.loads(json.dumps(payload))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate_json(data.draw, payload)
    text = _raw(payload, data.draw(RAW_JSON)).decode()
    try:
        body = SecAgg(round=1, session="0" * 32, phase=phase, payload=text)
    except ValidationError:  # a payload past its bound: the frame carrying it is malformed
        return
    try:
        unwrap(body, {})
    except SecAggError as exc:
        assert str(exc)


def _with_header(frame: bytes, header: dict) -> bytes:
    (length,) = struct.unpack_from("<I", frame, 4)
    raw = json.dumps(header).encode()
    return frame[:4] + struct.pack("<I", len(raw)) + raw + frame[8 + length:]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_headers_of_every_message_kind_are_refused_or_valid(body, data):
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)} if isinstance(body, (Update, BnStatistics)) else None
    frame = encode_frame("fleet", "dev", body, tensors)
    (length,) = struct.unpack_from("<I", frame, 4)
    header = json.loads(frame[8 : 8 + length])
    target = data.draw(st.sampled_from(["body", "header", "tensor"]))
    where = header["body"] if target == "body" else header["tensors"][0] if target == "tensor" and tensors else header
    key = data.draw(st.sampled_from([*where, "extra"]))
    where[key] = data.draw(JSON_VALUES)
    try:
        decoded = decode_frame(_with_header(frame, header))
    except FrameError as exc:
        assert isinstance(exc.reason, RejectReason) and exc.detail
        return
    assert decoded.body.kind in {s.kind for s in SAMPLES}  # whatever passed is a fully validated message
    for value in decoded.tensors.values():
        assert np.isfinite(value).all()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-art")
    export_all(ModelSpec(arch="mlp", hidden=(4,)), ["a", "c"], out)
    return out


@st.composite
def _tensors(draw: st.DrawFn, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Some of the tier's tensor names (or a bogus one), each with the right or a random shape and dtype."""
    names = draw(st.lists(st.sampled_from([*shapes, "bogus"]), unique=True, max_size=5))
    tensors = {}
    for name in names:
        shape = shapes.get(name) if draw(st.booleans()) else tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int8]))
        tensors[name] = np.zeros(shape or (1,), dtype)
    return tensors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_engine_refuses_arbitrary_updates_without_changing_state(artifacts, tmp_path, data):
    registry = DeviceRegistry()
    for device in ("d1", "d2"):
        registry.hello(device, 10, 0, "a", "ort-training", now=0.0)
    store = ArtifactStore(artifacts)
    state = Path(tempfile.mkdtemp(dir=tmp_path))  # a fresh state directory per example: the open round persists
    engine = RoundEngine(EngineParts(EngineConfig(rounds=3), FedAvg(min_clients=2), store, StateStore(state), registry))
    engine.tick(1.0)
    before = {n: w.copy() for n, w in engine.weights.items()}
    update = Update(
        update_id=new_id(), round=data.draw(st.integers(1, 3)), base_version=data.draw(st.integers(0, 2)),
        tier=data.draw(st.sampled_from(["a", "c", "z"])), num_samples=data.draw(st.integers(1, 10**9)),
        steps=data.draw(st.integers(0, 10)), train_loss=data.draw(st.floats(-MAX_LOSS, MAX_LOSS)),
        train_accuracy=0.5, train_seconds=data.draw(st.floats(0, 1e9)), unchanged=data.draw(st.booleans()),
    )
    device = data.draw(st.sampled_from(["d1", "d2", "stranger"]))
    shapes = store.tiers["a"].shapes
    out = engine.on_update(device, new_id(), update, data.draw(_tensors(shapes)), 100, 2.0)
    refused = [o for o in out if isinstance(o.body, Reject)]
    if refused:
        assert engine.open_round is not None and device not in engine.open_round.answered  # nothing refused was counted
    for name, value in engine.weights.items():  # a round never commits from one update of two
        np.testing.assert_array_equal(value, before[name])


@pytest.fixture(scope="module")
def service(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> AggregatorService:
    """One aggregator service (its link never started) that every example of the handler property is fed to."""
    engine = RoundEngine(EngineParts(EngineConfig(fleet="fleet", rounds=3, round_timeout_s=60.0),
                                     FedAvg(min_clients=50), ArtifactStore(artifacts),
                                     StateStore(tmp_path_factory.mktemp("fuzz-state")), DeviceRegistry()))
    service = AggregatorService(engine, parse_broker("mqtt://127.0.0.1:1883"))
    service.handle_safely(Topics("fleet").status("dev"), encode_frame("fleet", "dev", Hello(num_samples=10)), 1.0)
    return service


@settings(max_examples=_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                HealthCheck.data_too_large])
@given(hostile_frames(), st.sampled_from(["up", "status"]))
def test_structure_aware_frames_through_the_aggregator_handler_never_reach_its_guard(service, frame, channel):
    """The aggregator's whole receipt path (header, sender, tensor table, payload, engine): a refusal or an
    acceptance, never the last-resort guard (internal_error)."""
    topics = Topics("fleet")
    topic = topics.up("dev") if channel == "up" else topics.status("dev")
    service.handle_safely(topic, frame, 2.0)
    assert "internal_error" not in service.engine.rejected
