"""The aggregator's view of an export: per-tier manifests and every file by sha256, to serve devices."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from models.manifest import ExportIndex, TierManifest
from models.zoo import ModelSpec


@dataclass(frozen=True)
class TierArtifacts:
    """One tier's manifest, its hash, and its files (name -> sha256, manifest.json included)."""

    manifest: TierManifest
    manifest_sha256: str
    files: dict[str, str]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.name: tuple(p.shape) for p in self.manifest.params}


class ArtifactStore:
    """Read-only index of an export directory written by `tierfl export`."""

    def __init__(self, root: Path) -> None:
        index_path = root / "index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} not found: run `tierfl export --out {root}` first")
        self.root = root
        self.index = ExportIndex.load(index_path)
        self.tiers: dict[str, TierArtifacts] = {}
        self._paths: dict[str, Path] = {}
        for tier, rel in self.index.tiers.items():
            manifest_path = root / rel
            manifest_bytes = manifest_path.read_bytes()
            manifest = TierManifest.model_validate_json(manifest_bytes)
            manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
            files = {name: entry.sha256 for name, entry in manifest.files.items()}
            files["manifest.json"] = manifest_sha
            for name, sha in files.items():
                self._paths[sha] = manifest_path.parent / name
            self.tiers[tier] = TierArtifacts(manifest, manifest_sha, files)

    @property
    def spec(self) -> ModelSpec:
        return self.index.model

    @property
    def identity(self) -> str:
        """Model name plus the hash of its widest tier's manifest: what a state directory belongs to."""
        widest = max(self.tiers.values(), key=lambda t: t.manifest.rate)
        return f"{self.spec.name}:{widest.manifest_sha256[:16]}"

    def read(self, sha256: str) -> tuple[str, bytes] | None:
        """(file name, bytes) of an exported file, verified against its hash; None if unknown."""
        path = self._paths.get(sha256)
        if path is None:
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{path} changed on disk since export (hash mismatch); re-run `tierfl export`")
        return path.name, data
