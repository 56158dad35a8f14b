"""Atomic file writes, shared by every package that keeps state on disk."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """Make the renames and unlinks done in `folder` durable (a power cut must not undo them)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object], mode: int | None = None,
                 exclusive: bool = False, durable: bool = True) -> None:
    """Write `path` so readers see the old file or the whole new one, never a part (temp, fsync, rename, fsync
    of the folder). The file gets the permissions the umask gives a new file, or `mode` exactly when given.
    `exclusive`: never replace an existing `path` (FileExistsError, nothing written), even one made meanwhile.
    `durable=False` skips both fsyncs: still atomic for readers, not across a power cut (a simulated device's cache)."""
    target = Path(path)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            if mode is not None:
                os.fchmod(out.fileno(), mode)  # exactly `mode`, whatever the umask
            if durable:
                os.fsync(out.fileno())
        if exclusive:
            _link_new(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        sync_folder(target.parent)


def _link_new(tmp: Path, target: Path) -> None:
    """Put `tmp` in place as `target` unless `target` exists (FileExistsError)."""
    try:
        os.link(tmp, target)  # atomic, and fails if `target` exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename (a narrow race, only there)
        if target.exists():
            raise FileExistsError(f"{target} exists") from None
        os.replace(tmp, target)
        return
    tmp.unlink()
