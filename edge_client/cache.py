"""Content-addressed artifact cache on the device: files are stored and found by sha256."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from protocol.atomic_file import atomic_write


class ArtifactCache:
    """Stores artifact files under `root/blobs/<sha256>` and lays out tier folders from them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._blobs.mkdir(parents=True, exist_ok=True)

    def has(self, sha256: str) -> bool:
        """True when a file with this hash is cached."""
        return (self._blobs / sha256).is_file()

    def missing(self, wanted: Mapping[str, str]) -> list[str]:
        """The hashes of `wanted` (name -> sha256) that are not cached yet."""
        return sorted({sha for sha in wanted.values() if not self.has(sha)})

    def put(self, sha256: str, data: bytes) -> None:
        """Store `data` atomically after checking it hashes to `sha256` (ValueError if not)."""
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ValueError(f"artifact bytes hash to {actual[:12]}, expected {sha256[:12]}")
        atomic_write(self._blobs / sha256, lambda out: out.write(data))

    def read(self, sha256: str) -> bytes:
        """The cached bytes of `sha256`."""
        return (self._blobs / sha256).read_bytes()

    def tier_folder(self, files: Mapping[str, str], key: str) -> Path:
        """A folder holding `files` (name -> sha256) under their names, built once per `key`."""
        folder = self.root / "tiers" / key
        if all((folder / name).is_file() for name in files):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        for name, sha in files.items():
            if Path(name).name != name:
                raise ValueError(f"artifact name {name!r} is not a plain file name")
            target = folder / name
            tmp = folder / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            os.link(self._blobs / sha, tmp)
            os.replace(tmp, target)
        return folder
