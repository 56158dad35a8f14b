"""Issue 13, cases 1-3: every decoder is total and every field of every message is bounded.

Frames are built by hand (raw JSON headers) the way a hostile publisher would, so the schema's
own serialisation cannot hide what a peer can send.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.engines.secure import SecureConfig, SecureRoundEngine
from aggregator.registry import DeviceRegistry
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import StateStore
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.sampling import make_sampler, round_count
from aggregator.strategies.tiering import make_tier_policy, parse_tier_mix
from models.export import export_all
from models.zoo import ModelSpec
from protocol.frame import FrameError, decode_frame, encode_frame, read_header
from protocol.messages import (MAX_DETAIL, MAX_FRAME_ELEMENTS, MAX_ROUND, MAX_SAMPLES, MAX_TENSORS, BnStatistics, Hello,
                               Reject, RejectReason, RoundSummary, SecAgg, Status, Task, TierShare, TrainTask, Update,
                               new_id)
from protocol.secagg.messages import SecAggError
from protocol.secagg.wire import unwrap

SHA = "ab" * 32
CODECS = ["float32", "uint8", "float16", "int8", "int8-row", "int4", "topk", "topk+int8"]


def _frame(header: dict, payload: bytes = b"") -> bytes:
    """Frame bytes around a raw header dict (payload sha256 filled in)."""
    header = {"protocol": 1, "fleet": "f", "sender": "d", "msg_id": new_id(), "sent_at": time.time(),
              "payload_sha256": hashlib.sha256(payload).hexdigest(), **header}
    raw = json.dumps(header).encode()
    return b"TFL1" + struct.pack("<I", len(raw)) + raw + payload


def _status() -> dict:
    return {"kind": "status", "online": True}


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**40, 2**40], [2**40, 2**40, 0], [0, 2**63], [2**63], [-1, 0]])
@pytest.mark.parametrize("codec", CODECS)
def test_zero_dimension_next_to_a_huge_one_is_a_typed_refusal(codec: str, shape: list[int]) -> None:
    """Case 1: raised ValueError ('Maximum allowed dimension exceeded') or was accepted before."""
    entry = {"name": "w", "codec": codec, "dtype": "uint8" if codec == "uint8" else "float32", "shape": shape,
             "nbytes": 0, "meta": {"scale": 1.0}}
    with pytest.raises(FrameError) as caught:
        decode_frame(_frame({"body": _status(), "tensors": [entry]}))
    assert caught.value.reason is RejectReason.MALFORMED and "shape" in caught.value.detail


def test_more_tensor_entries_than_the_bound_are_refused() -> None:
    """Case 3: a 1 MiB header held thousands of entries."""
    entries = [{"name": f"t{i}", "codec": "float32", "dtype": "float32", "shape": [0], "nbytes": 0}
               for i in range(MAX_TENSORS + 1)]
    with pytest.raises(FrameError, match="tensors") as caught:
        read_header(_frame({"body": _status(), "tensors": entries}))
    assert caught.value.reason is RejectReason.MALFORMED


def _sparse_of_zeros(n: int) -> bytes:
    """A valid top-k tensor of `n` elements keeping one zero: tiny on the wire, n float32 once decoded."""
    bitmap = bytearray((n + 7) // 8)
    bitmap[0] = 0x80
    return struct.pack("<I", 1) + zlib.compress(bytes(bitmap) + np.float32(0).tobytes(), 9)


def test_sparse_bomb_is_refused_before_anything_is_inflated() -> None:
    """Case 3: 17 top-k tensors of 2^22 elements (a few KB each) decoded to 272 MiB before."""
    n = 1 << 22
    piece = _sparse_of_zeros(n)
    count = MAX_FRAME_ELEMENTS // n + 1
    entries = [{"name": f"t{i}", "codec": "topk", "dtype": "float32", "shape": [n], "nbytes": len(piece)}
               for i in range(count)]
    frame = _frame({"body": _status(), "tensors": entries}, piece * count)
    assert len(frame) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="elements") as caught:
            decode_frame(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason is RejectReason.MALFORMED
    assert peak < 4 << 20, f"refusing the bomb traced {peak} bytes"


def test_one_sparse_tensor_at_the_bound_still_decodes() -> None:
    """The bound is on what is declared: an honest sparse tensor below it decodes as before."""
    piece = _sparse_of_zeros(1000)
    entry = {"name": "w", "codec": "topk", "dtype": "float32", "shape": [10, 100], "nbytes": len(piece)}
    frame = decode_frame(_frame({"body": _status(), "tensors": [entry]}, piece))
    assert frame.tensors["w"].shape == (10, 100) and not frame.tensors["w"].any()


HUGE = [2**63, 10**400, -1, MAX_ROUND + 1]
BODIES = {
    "hello": ({"kind": "hello", "num_samples": 10}, ["num_samples", "num_test_samples"]),
    "update": ({"kind": "update", "update_id": new_id(), "round": 1, "base_version": 0, "tier": "a", "num_samples": 5,
                "steps": 1, "train_loss": 1.0, "train_accuracy": 0.5, "train_seconds": 0.1},
               ["round", "base_version", "num_samples", "eval_samples"]),
    "bn_statistics": ({"kind": "bn_statistics", "round": 1, "base_version": 0, "tier": "a", "num_samples": 5},
                   ["round", "base_version", "num_samples"]),
    "train": ({"kind": "train", "round": 1, "model_version": 0, "tier": "a", "manifest_sha256": SHA,
               "artifacts": {"m": SHA}, "epochs": 1, "batch_size": 8, "learning_rate": 0.1, "deadline": 1e9},
              ["round", "model_version", "weights.delta_from", "weights.variant"]),
    "measure_bn_statistics": ({"kind": "measure_bn_statistics", "round": 1, "model_version": 0, "tier": "a",
                               "manifest_sha256": SHA, "artifacts": {"m": SHA}, "deadline": 1e9},
                              ["round", "model_version", "weights.delta_from"]),
    "secagg": ({"kind": "secagg", "round": 1, "session": "0" * 32, "phase": "advertise", "payload": "{}"},
               ["round", "eval_samples"]),
    "reject": ({"kind": "reject", "reason": "late", "detail": "x"}, ["round"]),
    "round": ({"kind": "round", "round": 1, "version": 1, "selected": 1, "answered": 1},
              ["round", "version", "selected", "answered", "bytes_up"]),
}


@pytest.mark.parametrize("value", HUGE, ids=["2^63", "10^400", "-1", "1e9+1"])
@pytest.mark.parametrize("kind,field", [(kind, field) for kind, (_, fields) in BODIES.items() for field in fields])
def test_out_of_bound_integers_are_malformed(kind: str, field: str, value: int) -> None:
    """Case 2: round, num_samples, eval_samples, ... took 2^63 and 10^400 before (and crashed the ledger)."""
    body = dict(BODIES[kind][0])
    *outer, name = field.split(".")  # "weights.delta_from": a field of a nested model
    into = body
    for part in outer:
        into = into.setdefault(part, {})
    into[name] = 2**63 if field == "bytes_up" and value == MAX_ROUND + 1 else value  # bytes are bounded at 2^50
    with pytest.raises(FrameError) as caught:
        decode_frame(_frame({"body": body}))
    assert caught.value.reason is RejectReason.MALFORMED


@pytest.mark.parametrize("where,value", [
    ("sent_at", "1e400"), ("sent_at", "NaN"), ("sent_at", "-1"), ("deadline", "Infinity"), ("deadline", "1e300"),
    ("train_loss", "NaN"), ("train_loss", "1e300"), ("train_seconds", "Infinity"), ("seed", "1" + "0" * 400),
    ("contributors", '{"a": {"samples": 10000000000, "devices": 1}}'),
    ("libraries", json.dumps({f"l{i}": "1" for i in range(1000)})), ("backend", json.dumps("x" * 10_000)),
    ("tier", json.dumps("x" * 10_000)), ("holds", json.dumps({f"t{i}": 1 for i in range(1000)})),
    ("meta", json.dumps({"scale": 1.0, **{f"k{i}": 1 for i in range(100)}})), ("meta", '{"scale": 1e400}'),
    ("meta", json.dumps({"scale": "x" * 10_000})), ("name", json.dumps("x" * 10_000)),
])
def test_out_of_bound_floats_strings_and_dicts_are_malformed(where: str, value: str) -> None:
    """Case 2: floats finite and bounded, strings and dicts of bounded size, in the body, the header and the tensor table."""
    body = {"update": BODIES["update"][0], "train": BODIES["train"][0], "hello": BODIES["hello"][0]}
    kind = {"deadline": "train", "seed": "train", "libraries": "hello", "backend": "hello", "tier": "hello",
            "holds": "hello"}.get(where, "update")
    header = {"body": dict(body[kind]), "tensors": [
        {"name": "w", "codec": "int8", "dtype": "float32", "shape": [1], "nbytes": 1, "meta": {"scale": 1.0}}]}
    marker = "__MARK__"
    if where == "sent_at":
        header["sent_at"] = marker
    elif where in ("meta", "name"):
        header["tensors"][0][where] = marker
    else:
        header["body"][where] = marker
    raw = json.dumps({"protocol": 1, "fleet": "f", "sender": "d", "msg_id": new_id(), "sent_at": 1.0,
                      "payload_sha256": hashlib.sha256(b"\0").hexdigest(), **header})
    raw = raw.replace(f'"{marker}"', value).encode()
    frame = b"TFL1" + struct.pack("<I", len(raw)) + raw + b"\0"
    with pytest.raises(FrameError) as caught:
        decode_frame(frame)
    assert caught.value.reason is RejectReason.MALFORMED


def test_honest_messages_as_really_sent_still_validate() -> None:
    """The bounds leave every message the aggregator and devices send valid (engine, agent, downlink)."""
    now = time.time()
    bodies = [
        Hello(tier="a", num_samples=1797, num_test_samples=200, backend="ort-training", holds={"a": 12, "c": 3},
              seconds_per_sample={"a": 0.0004}, session=new_id(), libraries={"onnxruntime": "1.19.2"}),
        TrainTask(round=10**6, model_version=10**6, tier="a", manifest_sha256=SHA, artifacts={"manifest.json": SHA},
                  epochs=1, batch_size=32, learning_rate=0.05, deadline=now + 3600, seed=(2**31 - 1) * 100_003 + 10**6),
        Update(update_id=new_id(), round=7, base_version=6, tier="a", num_samples=MAX_SAMPLES, steps=57,
               train_loss=2.3, train_accuracy=0.1, train_seconds=1.5, eval_loss=2.2, eval_accuracy=0.2,
               eval_samples=200, contributors={"a": TierShare(samples=5000, devices=30)}),
        BnStatistics(round=3, base_version=3, tier="c", num_samples=300),
        RoundSummary(round=5, version=5, selected=3, answered=3, accuracy=0.9, loss=0.3, accuracy_source="held-out",
                     accuracy_by_tier={"a": 0.9}, bytes_up=10**9, bytes_down=10**9, seconds=12.5,
                     rejected={"late": 2, "bad_tensor": 1}, metrics={"dp_epsilon": 3.2, "fedmut_alpha": 0.5}),
    ]
    for body in bodies:
        frame = decode_frame(encode_frame("fleet", "dev", body, {"w": np.ones((3, 4), np.float32)}))
        assert frame.body.kind == body.kind


def test_a_long_reject_detail_is_cut_not_refused() -> None:
    """A refusal's detail is bounded, and building a reject with a long one (an exception's text) never fails."""
    reject = Reject(reason=RejectReason.MALFORMED, detail="x" * 100_000)
    assert len(reject.detail) == MAX_DETAIL
    assert decode_frame(encode_frame("f", "aggregator", reject)).body.detail == reject.detail


@pytest.mark.parametrize("payload", [
    '{"kind": "secagg_advertise", "round": 1, "device": "d", "c_public": "' + "0" * 64 + '", "s_public": "'
    + "0" * 64 + '", "shapes": {"w": [0, ' + str(2**70) + ']}}',
    '{"kind": "secagg_advertise", "round": ' + "9" * 400 + ', "device": "d", "c_public": "' + "0" * 64
    + '", "s_public": "' + "0" * 64 + '", "shapes": {}}',
    '{"kind": "secagg_advertise", "round": 1, "device": "d", "c_public": "' + "0" * 64 + '", "s_public": "'
    + "0" * 64 + '", "shapes": {"w": [' + str(2**13) + ", " + str(2**14) + ']}}',
    '{"kind": "secagg_unmask_response", "round": 1, "device": "d", "s_shares": {}, "b_shares": {"e": '
    '{"x": 1, "threshold": 1, "length": 15, "limbs": [' + "7" * 400 + ']}}}',
    '{"kind": "secagg_unmask_response", "round": 1, "device": "d", "s_shares": {}, "b_shares": {"e": '
    '{"x": 1, "threshold": ' + str(2**63) + ', "length": 15, "limbs": [1]}}}',
    '{"kind": "secagg_unmask_response", "round": 1, "device": "d", "s_shares": {}, "b_shares": {"e": '
    '{"x": 1, "threshold": 1, "length": 15, "limbs": [' + ", ".join(["1"] * 1000) + ']}}}',
])
def test_secure_aggregation_payloads_are_bounded(payload: str) -> None:
    """Case 2 for the secure-aggregation payloads: refused as SecAggError, which the engines turn into a reject."""
    phase = "advertise" if "advertise" in payload else "unmasking"
    with pytest.raises(SecAggError, match="does not parse"):
        unwrap(SecAgg(round=1, session="0" * 32, phase=phase, payload=payload), {})


SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(16,))


@pytest.fixture(scope="module")
def tiers_abc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art-abc")
    export_all(SPEC, ["a", "b", "c"], out)
    return out


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_a_hello_claiming_max_samples_leaves_tick_selecting_sensibly(tiers_abc: Path, tmp_path: Path,
                                                                     secure: bool) -> None:
    """Case 2: a retained hello with a huge count crashed tick under secure aggregation, --sampling loss and
    --tier-policy auto. At the bound: real engines pick a round, the claimant gets the tier its speed allows."""
    registry = DeviceRegistry()
    for i in range(6):
        registry.hello(f"d{i}", 100, 10, None, "portable", now=0.0, seconds_per_sample={"c": 1e-4})
    registry.hello("mallory", MAX_SAMPLES, MAX_SAMPLES, None, "portable", now=0.0, seconds_per_sample={"c": 1e-3})
    artifacts = ArtifactStore(tiers_abc)
    strategy = FedAvg(fraction=0.5, min_clients=2, sampler=make_sampler("loss", 0.5, 2, seed=3, candidates=1.0),
                      tiers=make_tier_policy("auto", parse_tier_mix("a1-b1-c1"), artifacts.macs, epochs=1,
                                             deadline_s=20.0))
    config = EngineConfig(fleet="f", rounds=2, round_timeout_s=20.0, max_share=0.5)
    parts = EngineParts(config, strategy, artifacts, StateStore(tmp_path / "state"), registry)
    engine = SecureRoundEngine(parts, SecureConfig()) if secure else RoundEngine(parts)
    tasks = {message.device_id: message.body for message in engine.tick(1.0) if isinstance(message.body, Task)}
    assert len(tasks) == round_count(0.5, 2, 7) and engine.view() is not None
    assert "mallory" in tasks  # power of choice draws by announced data size: the claim does buy selection ...
    assert tasks["mallory"].tier == "c"  # ... but 10^9 samples fit no wider tier within the deadline
    assert all(task.tier == "a" for device, task in tasks.items() if device != "mallory")
    if secure:
        weights = {device: task.secure.weight for device, task in tasks.items()}
        assert all(0 < w < len(tasks) and np.isfinite(w) for w in weights.values())
        assert sum(weights.values()) == pytest.approx(len(tasks))  # public weights over their mean
