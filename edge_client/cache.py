"""Content-addressed artifact cache on the device: files are stored and found by sha256, within a size bound.

Blobs live in `root/blobs/<sha256>`; a tier's folder `root/tiers/<key>/` holds hard links to
them under their file names (renamed into place, then the folder fsynced, as for every blob).
Each use of a blob renews its modification time, so when a new blob pushes the cache over its
bound the least recently used blobs go first, together with the tier folders that link them (a
hard link would keep the bytes on disk). Blobs marked in use
(the current task's and tier's) are never evicted, and never push the cache over its bound either:
a blob that does not fit beside them is refused (CacheFull), so a task cannot fill the disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from protocol.atomic_file import atomic_write, sync_folder

log = logging.getLogger(__name__)


class ArtifactTooLarge(ValueError):
    """An artifact larger than the whole cache bound."""


class CacheFull(ArtifactTooLarge):
    """An artifact that does not fit beside the artifacts in use within the cache bound."""


class ArtifactCache:
    """Stores artifact files under `root/blobs/<sha256>` and lays out tier folders from them."""

    def __init__(self, root: Path, max_bytes: int | None = None, durable: bool = True, pool: Path | None = None) -> None:
        """`durable=False`: no fsyncs (still atomic for readers); `pool`: a folder of blobs by sha256 shared with
        other caches, each file written there once and hard-linked into this cache (both for the many virtual
        devices of `tierfl fleet`: every device still receives and checks every byte, the disk holds them once)."""
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"cache bound must be positive, not {max_bytes} bytes")
        self.root = root
        self.max_bytes = max_bytes
        self.durable = durable
        self.pool = pool
        if pool is not None:
            pool.mkdir(parents=True, exist_ok=True)
        self._blobs = root / "blobs"
        self._tiers = root / "tiers"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the network thread stores blobs while the worker lays out folders
        self._in_use: frozenset[str] = frozenset()
        for leftover in self._blobs.glob(".*.tmp"):  # an interrupted write
            leftover.unlink(missing_ok=True)
        with self._lock:
            self._evict()

    def has(self, sha256: str) -> bool:
        """True when a file with this hash is cached."""
        return (self._blobs / sha256).is_file()

    def missing(self, wanted: Mapping[str, str]) -> list[str]:
        """The hashes of `wanted` (name -> sha256) that are not cached yet."""
        return sorted({sha for sha in wanted.values() if not self.has(sha)})

    def size(self) -> int:
        """Bytes of all cached blobs (tier folders only link them)."""
        return sum(size for _, size, _ in self._blob_stats())

    def use(self, hashes: Iterable[str]) -> None:
        """Mark these blobs as in use (replacing the previous set): never evicted, and now the most recent."""
        with self._lock:
            self._in_use = frozenset(hashes)
            for sha in self._in_use:
                self._touch(sha)

    def put(self, sha256: str, data: bytes) -> None:
        """Store `data` atomically after checking it hashes to `sha256`, then evict down to the bound.

        ValueError if the bytes do not match the hash; ArtifactTooLarge if they alone exceed the bound;
        CacheFull (nothing stored) if they do not fit beside the blobs in use.
        """
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ValueError(f"artifact bytes hash to {actual[:12]}, expected {sha256[:12]}")
        if self.max_bytes is not None and len(data) > self.max_bytes:
            raise ArtifactTooLarge(f"artifact {sha256[:12]} is {len(data) / 1e6:.2f} MB, more than the cache's "
                                   f"whole bound of {self.max_bytes / 1e6:.2f} MB")
        with self._lock:
            existed = self.has(sha256)
            if not (self.pool is not None and self._link_pooled(sha256, data)):
                atomic_write(self._blobs / sha256, lambda out: out.write(data), durable=self.durable)
            if not self._evict(keep=frozenset({sha256})) and not existed:
                self._remove_folders_linking(self._blobs / sha256)
                (self._blobs / sha256).unlink(missing_ok=True)
                raise CacheFull(f"artifact {sha256[:12]} ({len(data) / 1e6:.2f} MB) does not fit beside the "
                                f"artifacts in use within the cache's bound of {self.max_bytes / 1e6:.2f} MB")

    def _link_pooled(self, sha256: str, data: bytes) -> bool:
        """Put the pool's copy of a checked blob in place (written there first if new); False if that failed."""
        assert self.pool is not None
        pooled = self.pool / sha256
        try:
            if not pooled.is_file() or pooled.stat().st_size != len(data):
                atomic_write(pooled, lambda out: out.write(data), durable=self.durable)
            tmp = self._blobs / f".{sha256}.{os.getpid()}.link.tmp"
            tmp.unlink(missing_ok=True)
            os.link(pooled, tmp)
            os.replace(tmp, self._blobs / sha256)
            return True
        except OSError:
            return False

    def read(self, sha256: str) -> bytes:
        """The cached bytes of `sha256`."""
        with self._lock:
            self._touch(sha256)
            return (self._blobs / sha256).read_bytes()

    def tier_folder(self, files: Mapping[str, str], key: str) -> Path:
        """A folder holding `files` (name -> sha256) under their names, built once per `key`."""
        folder = self._tiers / key
        with self._lock:
            for sha in files.values():
                self._touch(sha)
            if all((folder / name).is_file() for name in files):
                return folder
            if not folder.is_dir():
                folder.mkdir(parents=True)
                if self.durable:
                    sync_folder(self._tiers)  # the new folder's own entry
            for name, sha in files.items():
                if Path(name).name != name:
                    raise ValueError(f"artifact name {name!r} is not a plain file name")
                target = folder / name
                tmp = folder / f".{name}.tmp"
                tmp.unlink(missing_ok=True)
                os.link(self._blobs / sha, tmp)
                os.replace(tmp, target)
            if self.durable:
                sync_folder(folder)  # the renames survive a power cut
            return folder

    def _touch(self, sha256: str) -> None:
        try:
            os.utime(self._blobs / sha256)
        except FileNotFoundError:
            pass

    def _blob_stats(self) -> list[tuple[str, int, float]]:
        """(sha256, bytes, last use) of every cached blob."""
        stats = []
        with os.scandir(self._blobs) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_file():
                    info = entry.stat()
                    stats.append((entry.name, info.st_size, info.st_mtime))
        return stats

    def _evict(self, keep: frozenset[str] = frozenset()) -> bool:
        """Delete least recently used blobs, and the tier folders linking them, until within the bound.

        False when the blobs in use and `keep` alone exceed the bound.
        """
        if self.max_bytes is None:
            return True
        blobs = self._blob_stats()
        total = sum(size for _, size, _ in blobs)
        protected = self._in_use | keep
        for sha, size, _ in sorted(blobs, key=lambda blob: blob[2]):
            if total <= self.max_bytes:
                return True
            if sha in protected:
                continue
            self._remove_folders_linking(self._blobs / sha)
            (self._blobs / sha).unlink(missing_ok=True)
            total -= size
            log.info("cache: evicted artifact %s (%.2f MB), least recently used", sha[:12], size / 1e6)
        return total <= self.max_bytes

    def _remove_folders_linking(self, blob: Path) -> None:
        """Remove every tier folder holding a hard link to `blob` (it would keep the bytes on disk)."""
        if not self._tiers.is_dir():
            return
        inode = blob.stat().st_ino
        for folder in self._tiers.iterdir():
            if any(file.stat().st_ino == inode for file in folder.iterdir() if file.is_file()):
                shutil.rmtree(folder, ignore_errors=True)
                log.info("cache: removed tier folder %s", folder.name)
