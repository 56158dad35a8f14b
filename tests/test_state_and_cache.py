"""Durable aggregator state, the device's content-addressed artifact cache, and the aggregator's artifact store."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from aggregator.store.artifacts import ArtifactStore
from aggregator.store.state import KEEP_VERSIONS, StateMismatch, StateRecord, StateStore
from edge_client.cache import ArtifactCache, ArtifactTooLarge, CacheFull
from models.export import ARTIFACT_FILES, MANIFEST_NAME, export_all, zoo_card
from models.manifest import GLOBAL_MODEL_FILE
from models.spec import ModelSpec
from models.tier_graph import initializer_arrays
from protocol.atomic_file import atomic_write
from protocol.messages import RoundSummary

SPEC = ModelSpec(arch="mlp", image_size=8, hidden=(16,))


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.normal(size=(16, 64)).astype(np.float32), "fc1.bias": rng.normal(size=(16,)).astype(np.float32)}


def _record(version: int, round_number: int, fleet: str = "f", model: str = "mlp8:abc") -> StateRecord:
    history = [RoundSummary(round=r, version=min(r, version), selected=2, answered=2, accuracy=0.5, loss=1.25,
                            rejected={"late": r}) for r in range(1, round_number + 1)]
    return StateRecord(fleet=fleet, model=model, version=version, round=round_number, history=history)


def _assert_weights_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == np.float32
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- StateStore -----------------------------------------------------------------------------


def test_fresh_state_dir_loads_none(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "s").load("f", "m") is None
    assert (tmp_path / "s" / "weights").is_dir()


def test_commit_load_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    record, weights = _record(3, 4), _weights(1)
    store.commit(record, weights)
    loaded = StateStore(tmp_path).load("f", "mlp8:abc")
    assert loaded is not None
    got_record, got_weights = loaded
    assert got_record.weights_sha256 == {3: _sha(store.weights_path(3).read_bytes())}  # checked at every load
    assert got_record.model_copy(update={"weights_sha256": {}}) == record
    assert got_record.history[3].rejected == {"late": 4}
    _assert_weights_equal(got_weights, weights)
    assert json.loads((tmp_path / "state.json").read_text())["version"] == 3


def test_commit_without_weights_keeps_version_weights(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.commit(_record(1, 1), _weights(1))
    store.commit(_record(1, 2), None)  # a failed round: new round number, same version
    record, weights = store.load("f", "mlp8:abc")
    assert (record.version, record.round) == (1, 2)
    _assert_weights_equal(weights, _weights(1))


def test_load_of_other_fleet_or_model_raises(tmp_path: Path) -> None:
    StateStore(tmp_path).commit(_record(0, 0), _weights(0))
    with pytest.raises(StateMismatch, match="'f'"):
        StateStore(tmp_path).load("g", "mlp8:abc")
    with pytest.raises(StateMismatch):
        StateStore(tmp_path).load("f", "mlp8:other")


def test_leftover_temp_files_and_future_weights_do_not_confuse_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.commit(_record(2, 2), _weights(2))
    # A crash mid-write leaves temp files behind; a crash between the weights and state.json
    # leaves weights of a version that state.json never named.
    (tmp_path / ".state.json.abc123").write_text('{"fleet": "f", "model": "mlp8:abc", "vers')
    (tmp_path / "weights" / ".v000003.npz.xyz").write_bytes(b"PK\x03\x04 truncated")
    np.savez(store.weights_path(3), **_weights(3))
    record, weights = StateStore(tmp_path).load("f", "mlp8:abc")
    assert record.version == 2
    _assert_weights_equal(weights, _weights(2))
    # committing version 3 for real replaces the stray file
    store.commit(_record(3, 3), _weights(33))
    _assert_weights_equal(store.load("f", "mlp8:abc")[1], _weights(33))


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def broken(out) -> None:
        out.write(b"half of the new cont")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_pruning_keeps_last_three_versions(tmp_path: Path) -> None:
    assert KEEP_VERSIONS == 3
    store = StateStore(tmp_path)
    for v in range(7):
        store.commit(_record(v, v), _weights(v))
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["v000004.npz", "v000005.npz", "v000006.npz"]
    store.commit(_record(6, 7), None)  # a failed round prunes nothing it still needs
    assert store.weights_path(6).exists() and store.weights_path(4).exists()
    record, weights = store.load("f", "mlp8:abc")
    assert (record.version, record.round) == (6, 7)
    _assert_weights_equal(weights, _weights(6))
    for v in (4, 5):
        with np.load(store.weights_path(v)) as old:
            np.testing.assert_array_equal(old["fc1.bias"], _weights(v)["fc1.bias"])


# -- ArtifactCache ----------------------------------------------------------------------------


def test_cache_put_has_missing_read(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    one, two = b"first artifact", b"second artifact"
    s1, s2 = _sha(one), _sha(two)
    assert not cache.has(s1)
    assert cache.missing({"a.onnx": s1, "b.onnx": s2, "c.onnx": s1}) == sorted({s1, s2})
    cache.put(s1, one)
    assert cache.has(s1) and not cache.has(s2)
    assert cache.missing({"a.onnx": s1, "b.onnx": s2}) == [s2]
    cache.put(s2, two)
    assert cache.missing({"a.onnx": s1, "b.onnx": s2}) == []
    assert cache.read(s1) == one and cache.read(s2) == two
    cache.put(s1, one)  # idempotent
    assert cache.read(s1) == one
    # survives a new instance on the same root
    assert ArtifactCache(tmp_path / "cache").has(s2)


def test_cache_put_with_wrong_hash_raises_and_stores_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    claimed = _sha(b"the real thing")
    with pytest.raises(ValueError, match=claimed[:12]):
        cache.put(claimed, b"something else")
    assert not cache.has(claimed)
    assert list((tmp_path / "blobs").iterdir()) == []


def test_tier_folder_lays_out_files_by_name(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    files = {"training_model.onnx": b"train", "checkpoint": b"ckpt", "manifest.json": b"{}", "copy.onnx": b"train"}
    for data in files.values():
        cache.put(_sha(data), data)
    wanted = {name: _sha(data) for name, data in files.items()}
    folder = cache.tier_folder(wanted, key="k1")
    assert folder == tmp_path / "tiers" / "k1"
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    # built once: a second call returns the same folder untouched
    assert cache.tier_folder(wanted, key="k1") == folder
    # a partially built folder is completed
    (folder / "checkpoint").unlink()
    cache.tier_folder(wanted, key="k1")
    assert (folder / "checkpoint").read_bytes() == b"ckpt"


@pytest.mark.parametrize("bad", ["sub/evil.onnx", "../escape.onnx", "/abs/path"])
def test_tier_folder_rejects_name_with_slash(tmp_path: Path, bad: str) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    cache.put(_sha(b"x"), b"x")
    with pytest.raises(ValueError, match="plain file name"):
        cache.tier_folder({bad: _sha(b"x")}, key="k")
    assert not (tmp_path / "escape.onnx").exists() and not (tmp_path / "cache" / "tiers" / "escape.onnx").exists()
    assert not Path("/abs/path").exists()


def _put_aged(cache: ArtifactCache, data: bytes, last_used: float) -> str:
    """Store `data` and pretend it was last used at unix time `last_used`."""
    sha = _sha(data)
    cache.put(sha, data)
    os.utime(cache.root / "blobs" / sha, (last_used, last_used))
    return sha


def test_bounded_cache_evicts_least_recently_used_first(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=250)
    a = _put_aged(cache, b"a" * 100, 1_000)
    b = _put_aged(cache, b"b" * 100, 2_000)
    assert cache.read(a) == b"a" * 100  # a is now the most recently used
    c = _sha(b"c" * 100)
    cache.put(c, b"c" * 100)
    assert (cache.has(a), cache.has(b), cache.has(c)) == (True, False, True)
    assert cache.size() == 200 <= cache.max_bytes


def test_eviction_removes_the_tier_folders_linking_a_blob_and_spares_those_in_use(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=1000)
    old = {"model.onnx": _put_aged(cache, b"o" * 300, 1_000), "checkpoint": _put_aged(cache, b"p" * 300, 1_100)}
    current = {"model.onnx": _put_aged(cache, b"q" * 300, 500)}  # the oldest, but in use
    old_folder = cache.tier_folder(old, key="old")
    current_folder = cache.tier_folder(current, key="current")
    for sha, when in [(old["model.onnx"], 1_000), (old["checkpoint"], 1_100), (current["model.onnx"], 500)]:
        os.utime(tmp_path / "blobs" / sha, (when, when))  # laying out the folders counted as a use
    cache.use(current.values())
    os.utime(tmp_path / "blobs" / current["model.onnx"], (500, 500))
    new = _sha(b"n" * 200)
    cache.put(new, b"n" * 200)  # 1100 bytes: one old blob must go, and its folder with it
    assert not cache.has(old["model.onnx"]) and cache.has(old["checkpoint"])
    assert not old_folder.exists(), "a folder linking an evicted blob would keep its bytes on disk"
    assert cache.has(current["model.onnx"]) and (current_folder / "model.onnx").read_bytes() == b"q" * 300
    assert cache.size() == 800
    cache.put(old["model.onnx"], b"o" * 300)  # fetched again: now the old checkpoint is the least recently used
    assert not cache.has(old["checkpoint"]) and cache.has(current["model.onnx"]) and cache.has(new)
    assert cache.size() == 800


def test_blob_larger_than_the_bound_is_an_error(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=2_000_000)
    data = b"x" * 2_500_000
    with pytest.raises(ArtifactTooLarge, match=r"is 2.50 MB, more than the cache's whole bound of 2.00 MB"):
        cache.put(_sha(data), data)
    assert not cache.has(_sha(data)) and cache.size() == 0
    with pytest.raises(ValueError, match="positive"):
        ArtifactCache(tmp_path, max_bytes=0)


def test_files_in_use_keep_the_bound_a_blob_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=500)
    tier = {name: _sha(name.encode() * 100) for name in ("w1", "w2", "w3")}
    cache.use(tier.values())
    cache.put(tier["w1"], b"w1" * 100)
    cache.put(tier["w2"], b"w2" * 100)
    with pytest.raises(CacheFull, match="does not fit beside the"):
        cache.put(tier["w3"], b"w3" * 100)  # 600 bytes all in use: nothing may be evicted, nothing stored
    assert cache.missing(tier) == [tier["w3"]] and cache.size() == 400 <= cache.max_bytes


def test_cache_keeps_its_bound_from_the_start(tmp_path: Path) -> None:
    unbounded = ArtifactCache(tmp_path)
    shas = [_put_aged(unbounded, bytes([i]) * 100, 1_000 + i) for i in range(5)]
    (tmp_path / "blobs" / f".{shas[0]}.abc.tmp").write_bytes(b"half")  # an interrupted write
    cache = ArtifactCache(tmp_path, max_bytes=300)
    assert [cache.has(sha) for sha in shas] == [False, False, True, True, True]
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == sorted(shas[2:])


# -- ArtifactStore ----------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    out = tmp_path / "art"
    export_all(SPEC, ["a", "c"], out)
    return out


def test_artifact_store_read_returns_verified_bytes(exported: Path) -> None:
    store = ArtifactStore(exported)
    assert sorted(store.tiers) == ["a", "c"]
    for tier in ("a", "c"):
        files = store.tiers[tier].files
        assert set(files) == {*ARTIFACT_FILES, MANIFEST_NAME}
        for name, sha in files.items():
            got = store.read(sha)
            assert got is not None
            got_name, data = got
            assert got_name == name
            assert data == (exported / tier / name).read_bytes()
            assert _sha(data) == sha
    assert store.tiers["a"].manifest_sha256 == _sha((exported / "a" / MANIFEST_NAME).read_bytes())
    assert store.tiers["c"].shapes["fc1.weight"] == (4, 64)
    assert store.identity == f"mlp8-h16:{store.tiers['a'].manifest_sha256[:16]}"


def test_artifact_store_unknown_hash_is_none(exported: Path) -> None:
    store = ArtifactStore(exported)
    assert store.read("0" * 64) is None
    assert store.read(_sha(b"not exported")) is None


def test_artifact_store_read_raises_if_file_changed_on_disk(exported: Path) -> None:
    store = ArtifactStore(exported)
    sha = store.tiers["a"].files["checkpoint"]
    path = exported / "a" / "checkpoint"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(RuntimeError, match="changed on disk"):
        store.read(sha)
    # other files still serve
    assert store.read(store.tiers["a"].files["eval_model.onnx"]) is not None


def test_artifact_store_needs_an_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        ArtifactStore(tmp_path)


def test_artifact_store_reads_the_card_and_the_global_weights_of_model_onnx(exported: Path) -> None:
    store = ArtifactStore(exported)
    assert store.card == zoo_card(SPEC) and store.card.input_shape == [1, 8, 8]
    assert store.param_names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    weights = store.global_weights()
    assert list(weights) == store.param_names
    in_file = initializer_arrays(onnx.load(exported / GLOBAL_MODEL_FILE))
    for name, value in weights.items():
        assert value.dtype == np.float32 and value.flags.writeable
        np.testing.assert_array_equal(value, in_file[name], err_msg=name)
    assert weights["fc1.weight"].shape == (16, 64)  # full width, though the widest manifest is read for the order
    assert store.macs == {"a": store.tiers["a"].manifest.macs, "c": store.tiers["c"].manifest.macs}
    assert store.macs["a"] > store.macs["c"] > 0


def test_artifact_store_global_weights_name_model_onnx_and_the_way_out(exported: Path) -> None:
    store = ArtifactStore(exported)
    path = exported / GLOBAL_MODEL_FILE
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(RuntimeError, match=f"{GLOBAL_MODEL_FILE} changed on disk.*re-run `tierfl export --out"):
        store.global_weights()
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"{GLOBAL_MODEL_FILE} not found.*re-run `tierfl export --out"):
        store.global_weights()


def test_artifact_store_refuses_an_export_of_the_older_format(exported: Path) -> None:
    index = json.loads((exported / "index.json").read_text())
    index.update(format_version=1, model=SPEC.model_dump(mode="json"))
    del index["global_model"]
    (exported / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"exported by an older TierFL .*: re-run tierfl export --out {exported}"):
        ArtifactStore(exported)
