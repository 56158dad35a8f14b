"""Hostile input, generated: mutated headers of every message kind, and arbitrary updates fed to the engine.

Nothing may escape as anything but a FrameError with a reason, and nothing refused may change
the aggregator's state.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.artifacts import ArtifactStore
from aggregator.engine import EngineConfig, RoundEngine
from aggregator.registry import DeviceRegistry
from aggregator.state import StateStore
from aggregator.strategy import FedAvg
from models.export import export_all
from models.zoo import ModelSpec
from protocol.frame import FrameError, decode_frame, encode_frame
from protocol.messages import (
    MAX_LOSS, Blob, Fetch, Hello, Reject, RejectReason, RoundSummary, SecAgg, Statistics, Status, Task, Update, new_id,
)

SHA = "ab" * 32
SAMPLES = [
    Hello(num_samples=10, tier="a", holds={"a": 3}, seconds_per_sample={"a": 0.01}),
    Status(online=True),
    Task(round=1, model_version=0, tier="a", manifest_sha256=SHA, artifacts={"m": SHA}, epochs=1, batch_size=8,
         learning_rate=0.1, deadline=1e10),
    Fetch(sha256=[SHA]),
    Blob(sha256=SHA, name="checkpoint"),
    Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=5, steps=1, train_loss=1.0,
           train_accuracy=0.5, train_seconds=0.1),
    Statistics(round=1, base_version=1, tier="a", num_samples=5),
    Reject(reason=RejectReason.LATE, detail="x"),
    RoundSummary(round=1, version=1, selected=1, answered=1),
    SecAgg(round=1, session="0" * 32, phase="advertise", payload="{}"),
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _with_header(frame: bytes, header: dict) -> bytes:
    (length,) = struct.unpack_from("<I", frame, 4)
    raw = json.dumps(header).encode()
    return frame[:4] + struct.pack("<I", len(raw)) + raw + frame[8 + length:]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_headers_of_every_message_kind_are_refused_or_valid(body, data):
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)} if isinstance(body, (Update, Statistics)) else None
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
    engine = RoundEngine(EngineConfig(rounds=3), FedAvg(min_clients=2), store, StateStore(state), registry)
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
        assert engine._open is not None and device not in engine._open.answered  # nothing refused was counted
    for name, value in engine.weights.items():  # a round never commits from one update of two
        np.testing.assert_array_equal(value, before[name])
