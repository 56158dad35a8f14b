"""The device's artifact cache and the export make their renames durable: the folder is fsynced after them."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from edge_client.cache import ArtifactCache
from models.export import export_all
from models.spec import ModelSpec
from protocol import atomic_file


def record_renames_and_folder_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(event, path) for every rename and every fsync of a folder, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync folder", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", str(Path(dst).parent)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic_file.os, "fsync", fsync)  # the one os module: the cache's and the export's too
    monkeypatch.setattr(atomic_file.os, "replace", replace)
    return events


def test_a_tier_folder_is_fsynced_after_its_files_are_renamed_into_place(tmp_path, monkeypatch):
    cache = ArtifactCache(tmp_path, max_bytes=10_000)
    files = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("manifest.json", "forward.onnx")}
    for name, sha in files.items():
        cache.put(sha, name.encode())
    events = record_renames_and_folder_syncs(monkeypatch)
    folder = cache.tier_folder(files, key="k")
    renames = [i for i, (event, where) in enumerate(events) if event == "rename" and where == str(folder)]
    assert len(renames) == 2
    assert ("fsync folder", str(folder)) in events[renames[-1]:], events  # after the last rename
    assert ("fsync folder", str(tmp_path / "tiers")) in events  # the new folder's own entry


def test_an_exported_tier_folder_is_fsynced_after_its_artifacts_are_renamed_into_place(tmp_path, monkeypatch):
    events = record_renames_and_folder_syncs(monkeypatch)
    export_all(ModelSpec(arch="mlp", hidden=(8,)), ["a"], tmp_path)
    tier_dir = str(tmp_path / "a")
    renames = [i for i, (event, where) in enumerate(events) if event == "rename" and where == tier_dir]
    assert len(renames) >= 5  # the artifacts, then the manifest (an atomic write of its own)
    before_manifest = renames[-2]  # the last artifact's rename
    syncs = [i for i, event in enumerate(events) if event == ("fsync folder", tier_dir)]
    assert any(before_manifest < i < renames[-1] for i in syncs), events  # durable before the manifest names them
