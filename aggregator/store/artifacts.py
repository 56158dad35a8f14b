"""The aggregator's view of an export: its model card, per-tier manifests and every file by sha256, to serve
devices, and the global model (`model.onnx`) the first version's weights come from.

Nothing here rebuilds a model: whatever was exported (a zoo model or a user's ONNX file) is read
from the export's own files, each checked against the sha256 the index or its manifest records.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
from pydantic import BaseModel, ValidationError

from aggregator.store.round_spool import first_problem
from models.manifest import FORMAT_VERSION, GLOBAL_MODEL_FILE, INDEX_NAME, ExportIndex, ModelCard, TierManifest
from models.tier_graph import initializer_arrays

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class TierArtifacts:
    """One tier's manifest, its hash, and its files (name -> sha256, manifest.json included)."""

    manifest: TierManifest
    manifest_sha256: str
    files: dict[str, str]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> its shape at this tier, in the manifest's order."""
        return {p.name: tuple(p.shape) for p in self.manifest.params}


def _validated(schema: type[Model], raw: bytes, path: Path, root: Path) -> Model:
    """`raw` read as `schema`; a ValueError naming the file, its first problem and the way out otherwise."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        raise ValueError(f"{path} is not a valid {schema.__name__} ({first_problem(exc)}): "
                         f"re-run `tierfl export --out {root}`") from None


def _load_index(index_path: Path, root: Path) -> ExportIndex:
    """The export's index; ValueError naming the way out when an older TierFL wrote it."""
    raw = index_path.read_bytes()
    try:
        version = json.loads(raw).get("format_version")
    except (ValueError, AttributeError):  # not a JSON object: validation below names what is wrong
        version = None
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise ValueError(f"{index_path}: exported by an older TierFL (format {version}, this one reads "
                         f"{FORMAT_VERSION}): re-run tierfl export --out {root}")
    return _validated(ExportIndex, raw, index_path, root)


MAX_CACHED_BYTES = 64 << 20  # verified files kept in memory for fetches (least recently used go first)


class ArtifactStore:
    """Read-only index of an export directory written by `tierfl export`."""

    def __init__(self, root: Path) -> None:
        index_path = root / INDEX_NAME
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} not found: run `tierfl export --out {root}` first")
        self.root = root
        self.index = _load_index(index_path, root)
        self.tiers: dict[str, TierArtifacts] = {}
        self._paths: dict[str, Path] = {}
        self._cached: collections.OrderedDict[str, tuple[str, bytes]] = collections.OrderedDict()  # sha -> verified
        self._cached_bytes = 0
        for tier, rel in self.index.tiers.items():
            manifest_path = root / rel
            manifest_bytes = manifest_path.read_bytes()
            manifest = _validated(TierManifest, manifest_bytes, manifest_path, root)
            manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
            files = {name: entry.sha256 for name, entry in manifest.files.items()}
            files["manifest.json"] = manifest_sha
            for name, sha in files.items():
                self._paths[sha] = manifest_path.parent / name
            self.tiers[tier] = TierArtifacts(manifest, manifest_sha, files)
        if not self.tiers:
            raise ValueError(f"{index_path} names no tier: re-run `tierfl export --out {root}`")

    @property
    def card(self) -> ModelCard:
        """What was exported: name, one sample's shape, classes, batch norm, origin."""
        return self.index.model

    @property
    def widest(self) -> TierArtifacts:
        """The tier of the highest width rate."""
        return max(self.tiers.values(), key=lambda t: t.manifest.rate)

    @property
    def identity(self) -> str:
        """Model name plus the hash of its widest tier's manifest: what a state directory belongs to."""
        return f"{self.card.name}:{self.widest.manifest_sha256[:16]}"

    @property
    def macs(self) -> dict[str, int]:
        """Tier -> multiply-accumulates of one sample's forward pass at that tier."""
        return {tier: t.manifest.macs for tier, t in self.tiers.items()}

    @property
    def param_names(self) -> list[str]:
        """Every parameter of the model (trainable and frozen), in the widest tier manifest's order."""
        return [p.name for p in self.widest.manifest.params]

    def global_forward(self) -> onnx.ModelProto:
        """The full-width (rate 1) forward graph, `model.onnx`, verified against the index's sha256."""
        path = self.root / GLOBAL_MODEL_FILE
        way_out = f"re-run `tierfl export --out {self.root}`"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found (index.json names it as the global model): {way_out}") from None
        if hashlib.sha256(data).hexdigest() != self.index.global_model.sha256:
            raise RuntimeError(f"{path} changed on disk since export (sha256 is not index.json's); {way_out}")
        return onnx.load_model_from_string(data)

    def global_weights(self) -> dict[str, np.ndarray]:
        """The initial global weights: `model.onnx`'s parameters (float32, full width), in `param_names` order."""
        arrays = initializer_arrays(self.global_forward())
        names = self.param_names
        if missing := [n for n in names if n not in arrays]:
            raise ValueError(f"{self.root / GLOBAL_MODEL_FILE} holds no parameter {', '.join(missing)} of the tier "
                             f"manifests: re-run `tierfl export --out {self.root}`")
        weights = {n: np.array(arrays[n], np.float32, order="C", copy=True) for n in names}
        for tier, artifacts in self.tiers.items():
            for name, shape in artifacts.shapes.items():
                full = weights[name].shape
                if len(shape) != len(full) or any(s > f for s, f in zip(shape, full)):
                    raise ValueError(f"{self.root / GLOBAL_MODEL_FILE}: {name} is {list(full)}, smaller than tier "
                                     f"{tier}'s {list(shape)}: re-run `tierfl export --out {self.root}`")
        return weights

    def read(self, sha256: str) -> tuple[str, bytes] | None:
        """(file name, bytes) of an exported file, verified against its hash; None if unknown.

        Verified files are kept in memory (up to MAX_CACHED_BYTES, least recently used out first): a fleet's
        first-time participants all fetch the same few files, each read and hashed once."""
        if (cached := self._cached.get(sha256)) is not None:
            self._cached.move_to_end(sha256)
            return cached
        path = self._paths.get(sha256)
        if path is None:
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{path} changed on disk since export (hash mismatch); re-run `tierfl export`")
        if len(data) <= MAX_CACHED_BYTES:
            self._cached[sha256] = (path.name, data)
            self._cached_bytes += len(data)
            while self._cached_bytes > MAX_CACHED_BYTES:
                _, (_, dropped) = self._cached.popitem(last=False)
                self._cached_bytes -= len(dropped)
        return path.name, data
