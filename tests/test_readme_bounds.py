"""README section 5 keeps up with the schemas: every bounded field of every message has its row in the
bounds table, and every refusal reason its row in the reasons table (so neither can drift silently)."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import annotated_types
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import protocol.chunking
import protocol.messages
import protocol.secagg.messages
import protocol.secagg.shamir
from protocol.messages import RejectReason

README = Path(__file__).resolve().parent.parent / "README.md"
SCHEMA_MODULES = (protocol.messages, protocol.secagg.messages, protocol.chunking, protocol.secagg.shamir)
_LIMITS = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt, annotated_types.MinLen,
           annotated_types.MaxLen)


def schemas() -> dict[str, type[BaseModel]]:
    """The public pydantic models of the wire formats, by class name."""
    return {name: value for module in SCHEMA_MODULES for name, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == module.__name__
            and not name.startswith("_")}


def _bounded(annotation: object, metadata: typing.Iterable[object] = ()) -> bool:
    """Whether a type carries a bound anywhere: a number range, a length or a pattern, on it or on what it holds
    (list items, dict keys and values, union members); nested models are rows of their own."""
    for item in metadata:
        if isinstance(item, FieldInfo):
            if _bounded(None, item.metadata):
                return True
        elif isinstance(item, _LIMITS) or getattr(item, "pattern", None):
            return True
    if typing.get_origin(annotation) is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        return _bounded(inner, extra)
    return any(_bounded(arg) for arg in typing.get_args(annotation)
               if not (isinstance(arg, type) and issubclass(arg, BaseModel)))


def bounded_fields(model: type[BaseModel]) -> list[str]:
    """The fields of `model` with a bound, in its annotation or in its Field(...) default."""
    hints = typing.get_type_hints(model, include_extras=True)  # resolves the forward references pydantic defers
    return [name for name, info in model.model_fields.items() if _bounded(hints[name], info.metadata)]


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    return text[start : text.index("\n\n", text.index("\n|", start))]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _bounds_rows() -> list[tuple[list[str], str]]:
    """The bounds table's rows: (the names in backquotes of the first cell, the second cell)."""
    rows = []
    for line in _section("**Bounds in every message**").splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first, second = _cells(line)[:2]
            rows.append((re.findall(r"`(\w+)`", first), second))
    return rows


def test_the_bounded_fields_are_what_the_schemas_say():
    """The detector itself: bounds in Field defaults, nested Annotated items, optional and forward-referenced types."""
    assert bounded_fields(protocol.secagg.shamir.Share) == ["x", "threshold", "length", "limbs"]
    update = bounded_fields(protocol.messages.Update)
    assert {"contributors", "num_samples", "eval_loss", "update_id"} <= set(update)
    assert "unchanged" not in update and "kind" not in update
    assert "secure" not in bounded_fields(protocol.messages.TrainTask)  # a model: its own row
    assert "seconds" not in bounded_fields(protocol.messages.RoundSummary)  # a plain float


@pytest.mark.parametrize("name", sorted(schemas()))
def test_every_bounded_field_is_in_the_readme_bounds_table(name):
    rows = [row for names, row in _bounds_rows() if name in names]
    assert rows, f"README section 5's bounds table has no row for `{name}`"
    listed = set(re.findall(r"`(\w+)`", " ".join(rows)))
    missing = [field for field in bounded_fields(schemas()[name]) if field not in listed]
    assert not missing, f"the bounds table's `{name}` row does not list {missing}"


def test_the_bounds_table_names_only_messages_and_fields_that_exist():
    models = schemas()
    for names, row in _bounds_rows():
        assert all(name in models for name in names), f"the bounds table names {names}: not all are messages"
        fields = set().union(*(models[name].model_fields for name in names))
        unknown = set(re.findall(r"`([a-z][a-z0-9_]*)`", row)) - fields
        assert not names or not unknown, f"the bounds table's {names} row names {sorted(unknown)}, not their fields"


def test_every_refusal_reason_is_in_the_readme():
    listed = set()
    for line in _section("| reason | the message ... |").splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            listed |= set(re.findall(r"`(\w+)`", _cells(line)[0]))
    assert listed == {reason.value for reason in RejectReason}
