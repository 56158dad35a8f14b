"""Structure-aware fuzzing of the device's downlink handler and task pipeline (issue 13, case 6).

Frames are built from the real schemas (tasks, deltas, blobs, rejects, secure-aggregation
messages) with drawn integers, artifact lists, tensor tables and codecs, signed by the trusted
aggregator key, by another key or not at all, then optionally mutated in their header JSON or
their bytes. Property: the handler never raises, the worker never meets an error it did not
refuse by name, and afterwards the agent still trains an honest task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.messages import AttachedWeights, Blob, Reject, RejectReason, SecAgg, Update
from protocol.signing import DeviceKey, key_announcement
from tests.test_device_hostile import DOWN, Aggregator, data, exported, make_agent, settle, working  # noqa: F401

HUGE = st.sampled_from([0, -1, 2**31, 2**63, 10**400, 1e308, -1e308])
CODECS = ["float32", "float16", "int8", "int8-row", "int4", "uint8", "topk:0.5"]
SHAPES = st.lists(st.integers(0, 40), min_size=0, max_size=3)


def _tensors(draw: st.DrawFn, names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    chosen = draw(st.lists(st.sampled_from(names + ["bogus", "fc1.weight.extra"]), max_size=4, unique=True))
    out = {}
    for name in chosen:
        shape = shapes[name] if name in shapes and draw(st.booleans()) else tuple(draw(SHAPES))
        fill = draw(st.sampled_from([0.0, 0.01, 1e30, -3e38]))
        out[name] = np.full(shape, fill, np.float32)
    return out


def _mutate_header(frame: bytes, path: list[str], value: object) -> bytes:
    (length,) = struct.unpack_from("<I", frame, 4)
    header = json.loads(frame[8 : 8 + length])
    target = header
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(target, dict) else {}
    if isinstance(target, dict):
        target[path[-1]] = value
    raw = json.dumps(header).encode()
    return frame[:4] + struct.pack("<I", len(raw)) + raw + frame[8 + length :]


@st.composite
def downlink_frames(draw: st.DrawFn, aggregator: Aggregator, mallory: DeviceKey) -> bytes:
    """One downlink frame, honest in form or not, signed or not, mutated or not."""
    tier = aggregator.tier
    kind = draw(st.sampled_from(["task", "delta", "blob", "reject", "secagg", "announce"]))
    codec = "float32"
    tensors: dict[str, np.ndarray] | None = None
    if kind in ("task", "delta"):
        files = dict(tier.files)
        extra = draw(st.integers(0, 80))
        if draw(st.booleans()):
            files |= {f"f{i}.onnx": hashlib.sha256(b"%d" % i).hexdigest() for i in range(extra)}
        if draw(st.booleans()) and len(files) > 1:
            files.pop(draw(st.sampled_from(sorted(files))))
        body = aggregator.task(draw(st.integers(1, 10**6)), artifacts=files,
                               deadline=time.time() + draw(st.sampled_from([-5.0, 0.5, 2.0])),
                               epochs=draw(st.integers(1, 2)), learning_rate=draw(st.sampled_from([0.1, 10.0])),
                               weights=AttachedWeights(delta_from=draw(st.integers(0, 3)) if kind == "delta" else None))
        names = list(tier.shapes)
        tensors = aggregator.weights() if draw(st.booleans()) else _tensors(draw, names, tier.shapes)
        codec = draw(st.sampled_from(CODECS))
        if codec == "uint8":
            tensors = {n: np.zeros(v.shape, np.uint8) for n, v in tensors.items()}
    elif kind == "blob":
        sha = draw(st.sampled_from(sorted(tier.files.values())))
        content = draw(st.binary(max_size=64)) if draw(st.booleans()) else aggregator.store.read(sha)[1]
        body = Blob(sha256=sha if draw(st.booleans()) else hashlib.sha256(content).hexdigest(), name="x")
        tensors, codec = {"data": np.frombuffer(content, np.uint8)}, "uint8"
    elif kind == "reject":
        body = Reject(reason=draw(st.sampled_from(list(RejectReason))), detail=draw(st.text(max_size=20)))
    elif kind == "secagg":
        body = SecAgg(round=1, session="0" * 32, phase=draw(st.sampled_from(["roster", "delivery", "unmask_request"])),
                      payload=draw(st.text(max_size=40)))
    else:
        body, tensors = key_announcement(draw(st.sampled_from([aggregator.key, mallory])))
        codec = "uint8"
    signer = draw(st.sampled_from([aggregator.key.sign, mallory.sign, None]))
    frame = aggregator.frame(body, tensors, codec, signer=signer, signed=signer is not None)
    mutation = draw(st.sampled_from(["none", "none", "header", "bytes", "truncate"]))
    if mutation == "header":
        path = draw(st.sampled_from([["body", "round"], ["body", "model_version"], ["body", "weights", "delta_from"],
                                     ["body", "epochs"], ["body", "deadline"], ["tensors"], ["body", "artifacts"]]))
        value = draw(HUGE | st.lists(st.dictionaries(st.sampled_from(["name", "codec", "shape", "nbytes", "dtype"]),
                                                     HUGE | SHAPES | st.sampled_from(CODECS), max_size=5), max_size=3))
        frame = _mutate_header(frame, path, value)
    elif mutation in ("bytes", "truncate"):  # where: a share of the length (frames differ in size run to run)
        at = int(draw(st.floats(0, 1)) * (len(frame) - 1))
        flip = draw(st.integers(1, 255))
        frame = frame[:at] + bytes([frame[at] ^ flip]) + frame[at + 1 :] if mutation == "bytes" else frame[:at]
    return frame


def test_the_device_survives_hundreds_of_hostile_frames_and_still_trains(tmp_path, exported, data, caplog):
    aggregator = Aggregator(tmp_path / "agg", exported)
    mallory = DeviceKey(tmp_path / "mallory")
    agent, link = make_agent(tmp_path, aggregator, data, codec="int8")
    cases = 0

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(downlink_frames(aggregator, mallory))
    def feed(frame: bytes) -> None:
        nonlocal cases
        cases += 1
        agent._on_frame(DOWN, frame)  # raises nothing, whatever the frame

    with caplog.at_level(logging.WARNING), working(agent) as worker:
        feed()
        settle(agent, timeout=60)
        honest = aggregator.task(10**7)
        agent._on_frame(DOWN, aggregator.frame(honest, aggregator.weights()))
        settle(agent, timeout=60)
        assert worker.is_alive()
    assert cases == 300
    assert "internal_error" not in agent.refused, [r.message for r in caplog.records if "failed" in r.message]
    assert sum(agent.refused.values()) > 100  # most of them were refused, each with a named reason
    assert any(u.round == 10**7 for u in link.bodies(Update))
