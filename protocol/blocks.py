"""HeteroFL blocks on the wire: a tier's tensor is the leading block of the global tensor of the same name."""

from __future__ import annotations


def leading_slices(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Index that selects the leading `shape` block of a larger tensor (`global[idx]`)."""
    return tuple(slice(0, n) for n in shape)
