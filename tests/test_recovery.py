"""A corrupt state directory is one clear error naming the file (exit status 2), and `--recover` rolls back (issue 13, case 8).

The state is written by a real StateStore; the aggregator is the real `tierfl aggregator` run as
a separate process. None of these starts reaches a broker: a corrupt state stops the start before,
and a recovered state whose rounds are all done exits at once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.round_spool import RoundPlan, RoundSpool
from aggregator.store.state import EXIT_NEEDS_OPERATOR, PREVIOUS_STATE_FILE, StateCorrupt, StateRecord, StateStore
from models.export import export_all
from models.spec import ModelSpec
from protocol import atomic_file
from protocol.atomic_file import atomic_write
from protocol.messages import RoundSummary

MLP = ModelSpec(arch="mlp", hidden=(16,))
SHAPES = {"fc1.weight": (16, 64), "fc1.bias": (16,), "fc2.weight": (10, 16), "fc2.bias": (10,)}  # MLP's, tier a
FLEET = "default"
ROUNDS = 3  # versions 1..3 kept, one per round


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art")
    export_all(MLP, ["a"], out)
    assert ArtifactStore(out).tiers["a"].shapes == SHAPES
    return out


def _weights(version: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(version)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _state(art: Path, root: Path) -> StateStore:
    """A state directory after ROUNDS committed rounds, with a ledger (what a real run leaves)."""
    store = StateStore(root)
    identity = ArtifactStore(art).identity
    history: list[RoundSummary] = []
    for version in range(ROUNDS + 1):
        if version:
            history.append(RoundSummary(round=version, version=version, selected=2, answered=2))
        store.commit(StateRecord(fleet=FLEET, model=identity, version=version, round=version, history=history), _weights(version))
    Ledger(root / "ledger.sqlite").close()
    return store


def _aggregator(art: Path, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TIERFL_LOG_FORMAT": "text"}
    env.pop("TIERFL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "tierfl.cli", "aggregator", "--state-dir", str(state), "--artifacts", str(art),
                           "--broker", "mqtt://127.0.0.1:1", *extra], capture_output=True, text=True, env=env, timeout=60)


def _truncate_weights(state: Path) -> str:
    path = state / "weights" / "v000003.npz"
    path.write_bytes(path.read_bytes()[:200])
    return r"v000003.npz does not match the sha256 state.json records for version 3 \(200 bytes"


def _empty_state_json(state: Path) -> str:
    (state / "state.json").write_bytes(b"")
    return r"state.json is empty"


def _garbage_state_json(state: Path) -> str:
    (state / "state.json").write_bytes(b'{"fleet": "default", "model": 3, "vers')
    return r"state.json is not a valid state file \(the file: Invalid JSON"


def _garbage_ledger(state: Path) -> str:
    (state / "ledger.sqlite").write_bytes(b"not sqlite at all " * 300)
    for leftover in state.glob("ledger.sqlite-*"):
        leftover.unlink()
    return r"ledger.sqlite is not a readable ledger \(file is not a database\)"


def _corrupt_open_round(state: Path) -> str:
    RoundSpool(state / "open_round").begin(RoundPlan(round=ROUNDS + 1, base_version=ROUNDS, started=0.0, deadline=1.0,
                                                     assignments=[]))
    plan = state / "open_round" / "plan.json"
    plan.write_bytes(plan.read_bytes()[:30])
    return r"open_round/plan.json is unreadable \(1 problems, first: the file: Invalid JSON"


CORRUPTIONS: dict[str, tuple[Callable[[Path], str], int]] = {  # what breaks, and the version --recover rolls back to
    "truncated weights": (_truncate_weights, 2),
    "empty state.json": (_empty_state_json, 2),  # state.prev.json: the state before round 3
    "garbage state.json": (_garbage_state_json, 2),
    "garbage ledger": (_garbage_ledger, 3),
    "corrupt open round": (_corrupt_open_round, 3),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_state_is_one_clear_error_then_recover_rolls_back_and_the_aggregator_starts(
        art: Path, tmp_path: Path, corruption: str) -> None:
    break_it, recovered_version = CORRUPTIONS[corruption]
    state = tmp_path / "state"
    _state(art, state)
    message = break_it(state)

    failed = _aggregator(art, state)
    assert failed.returncode == EXIT_NEEDS_OPERATOR == 2, failed.stderr
    lines = [line for line in failed.stderr.splitlines() if " INFO " not in line]  # the resume may log on the way
    assert "Traceback" not in failed.stderr and len(lines) == 1 and " ERROR " in lines[0], failed.stderr
    assert f"{state}/" in lines[0] and "--recover" in lines[0], lines[0]
    assert re.search(message, lines[0]), lines[0]

    recovered = _aggregator(art, state, "--recover")
    assert recovered.returncode == 0, recovered.stderr
    assert f"is at version {recovered_version}" in recovered.stderr
    record, weights = StateStore(state).load(FLEET, ArtifactStore(art).identity)
    assert (record.version, record.round) == (recovered_version, recovered_version)
    for name, array in _weights(recovered_version).items():
        np.testing.assert_array_equal(weights[name], array)

    again = _aggregator(art, state, "--rounds", str(recovered_version))  # all rounds done: exits before the broker
    assert again.returncode == 0 and "already done" in again.stderr, again.stderr


def test_weights_that_do_not_match_their_recorded_sha256_are_refused_at_load(art: Path, tmp_path: Path) -> None:
    store = _state(art, tmp_path)
    shutil.copy(store.weights_path(2), store.weights_path(3))  # a valid archive, but not version 3's
    with pytest.raises(StateCorrupt, match=r"v000003.npz does not match the sha256 state.json records for version 3"):
        StateStore(tmp_path).load(FLEET, ArtifactStore(art).identity)


def test_recover_keeps_a_state_that_verifies_and_its_open_round(art: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _state(art, tmp_path)
    RoundSpool(tmp_path / "open_round").begin(RoundPlan(round=ROUNDS + 1, base_version=ROUNDS, started=0.0, deadline=1.0,
                                                        assignments=[]))
    before = (tmp_path / "state.json").read_bytes()
    with caplog.at_level(logging.INFO):
        record = StateStore(tmp_path).recover(FLEET, ArtifactStore(art).identity)
    assert record is not None and record.version == ROUNDS
    assert (tmp_path / "state.json").read_bytes() == before and (tmp_path / "open_round" / "plan.json").exists()
    assert "verifies (version 3 after round 3); it stays" in caplog.text


def test_rolling_back_sets_the_open_round_aside_and_says_so(art: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _state(art, tmp_path)
    _truncate_weights(tmp_path)
    RoundSpool(tmp_path / "open_round").begin(RoundPlan(round=ROUNDS + 1, base_version=ROUNDS, started=0.0, deadline=1.0,
                                                        assignments=[]))
    with caplog.at_level(logging.INFO):
        record = StateStore(tmp_path).recover(FLEET, ArtifactStore(art).identity)
    assert record is not None and (record.version, record.round, len(record.history)) == (2, 2, 2)
    assert sorted(record.weights_sha256) == [1, 2]
    assert not (tmp_path / "open_round").exists() and len(list(tmp_path.glob("open_round.bad-*"))) == 1
    assert len(list(tmp_path.glob("state.json.bad-*"))) == 1  # kept for inspection
    assert "rolled back to version 2 after round 2" in caplog.text
    assert "will run again without its accepted updates" in caplog.text and "the ledger keeps their rows" in caplog.text


def test_nothing_that_verifies_is_one_clear_error(art: Path, tmp_path: Path) -> None:
    store = _state(art, tmp_path)
    for version in (1, 2, 3):
        store.weights_path(version).write_bytes(b"")
    with pytest.raises(StateCorrupt, match="no kept version .* verifies"):
        StateStore(tmp_path).recover(FLEET, ArtifactStore(art).identity)


def test_a_missing_state_json_beside_the_previous_one_is_not_a_fresh_start(art: Path, tmp_path: Path) -> None:
    _state(art, tmp_path)
    (tmp_path / "state.json").unlink()
    assert (tmp_path / PREVIOUS_STATE_FILE).exists()
    with pytest.raises(StateCorrupt, match="state.json is missing"):
        StateStore(tmp_path).load(FLEET, ArtifactStore(art).identity)


def test_atomic_writes_keep_the_mode_the_umask_gives(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "shared", lambda out: out.write(b"x"))
        atomic_write(tmp_path / "secret", lambda out: out.write(b"x"), mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_atomic_writes_fsync_the_folder_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_file.os, "fsync", fsync)
    monkeypatch.setattr(atomic_file.os, "replace", replace)
    atomic_write(tmp_path / "f", lambda out: out.write(b"x"))
    assert events == ["fsync file", "rename", "fsync folder"]
