"""Which items a read sees, as a value: the query language between the services and a Store.

A `Selection` names cubes, lifecycle, scope, kinds, a time window and metadata filters; each
store compiles it to its own SQL (store/sqlwhere.py). Nothing above the store writes SQL.

Filters: {"field": value} or {"field": {"op": value}} over the item's own fields
(kind, speaker, user_id, observed_at, ...), `tags`, or `metadata.<key>`. Operators: eq, ne, in,
gt, gte, lt, lte, contains. Several fields are combined with AND.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Sequence

from .._errors import InvalidDateError, InvalidFilterError, UnknownKindError
from .._models import KINDS
from .._time import parse_time

Status = Literal["active", "live", "any"]  # live: anything not deleted
SCOPE_FIELDS = ("user_id", "agent_id", "session_id")
TEXT_FIELDS = {"id", "kind", "role", "speaker", "user_id", "agent_id", "session_id", "parent_id",
               "producer", "content", "status", "superseded_by"}
NUMBER_FIELDS = {"version", "importance", "access_count"}
TIME_FIELDS = {"observed_at", "valid_from", "valid_to", "recorded_at", "updated_at",
               "last_accessed", "expires_at"}
OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "contains")
_META_KEY = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


@dataclass(frozen=True)
class Condition:
    """One validated filter: `field` is an item field, "tags" or "metadata.<key>"; `kind` is
    text, number, time, tags or meta; time values are epoch seconds."""

    field: str
    kind: str
    op: str
    value: Any


@dataclass(frozen=True)
class Selection:
    """The items a read may see. Scope fields left None match anything, unless named in
    `exact` (then they match a missing value only). `as_of` sees what was valid then (any
    status but deleted). Build it with `Selection.of(...)`, which validates user input.

    >>> Selection.of(cube_ids=[1], scope={"user_id": "ann"}, kinds=["fact"])
    """

    cube_ids: tuple[int, ...] = ()  # empty: every cube
    status: Status = "active"
    as_of: datetime | None = None
    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None
    exact: frozenset[str] = frozenset()
    kinds: tuple[str, ...] | None = None
    since: datetime | None = None
    until: datetime | None = None
    parent_id: str | None = None
    conditions: tuple[Condition, ...] = field(default=())

    @classmethod
    def of(cls, *, cube_ids: Sequence[int] = (), scope: dict[str, str | None] | None = None,
           kinds: Sequence[str] | str | None = None, filters: dict[str, Any] | None = None,
           since: Any = None, until: Any = None, as_of: datetime | None = None,
           status: Status = "active", exact: Sequence[str] = (),
           parent_id: str | None = None) -> "Selection":
        scope = scope or {}
        bounds = [parse_time(b, field="since/until") if b is not None else None
                  for b in (since, until)]
        return cls(tuple(cube_ids), status, as_of, scope.get("user_id"), scope.get("agent_id"),
                   scope.get("session_id"), frozenset(exact), _kinds(kinds), bounds[0],
                   bounds[1], parent_id, parse_filters(filters))

    @property
    def scope(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in SCOPE_FIELDS}

    @property
    def narrow(self) -> bool:
        """It selects a small part of its cubes (a user, a session, a filter...)."""
        return any(self.scope.values()) or bool(self.conditions) or self.since is not None \
            or self.until is not None or self.parent_id is not None


def _kinds(kinds: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if kinds is None:
        return None
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UnknownKindError(f"unknown kinds {unknown or kinds}; use {', '.join(KINDS)}")
    return tuple(kinds)


def parse_filters(filters: dict[str, Any] | None) -> tuple[Condition, ...]:
    """Validated conditions; raises InvalidFilterError naming the bad part.

    >>> parse_filters({"metadata.topic": {"in": ["food", "travel"]}})
    (Condition(field='metadata.topic', kind='meta', op='in', value=('food', 'travel')),)
    """
    if filters is None:
        return ()
    if not isinstance(filters, dict):
        raise InvalidFilterError(f"filters must be a dict such as {{'speaker': 'Ann'}}, "
                                 f"got {type(filters).__name__}")
    out = []
    for name, condition in filters.items():
        kind = _field_kind(name)
        ops = condition if isinstance(condition, dict) else {"eq": condition}
        if not ops:
            raise InvalidFilterError(f"filter on {name!r} has no operator")
        out += [_condition(name, kind, op, value) for op, value in ops.items()]
    return tuple(out)


def _field_kind(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidFilterError(f"filter field names are strings, got {name!r}")
    for kind, names in (("text", TEXT_FIELDS), ("number", NUMBER_FIELDS), ("time", TIME_FIELDS),
                        ("tags", {"tags"})):
        if name in names:
            return kind
    if name.startswith("metadata.") and _META_KEY.match(name[9:]):
        return "meta"
    known = sorted(TEXT_FIELDS | NUMBER_FIELDS | TIME_FIELDS | {"tags"})
    raise InvalidFilterError(f"unknown filter field {name!r}. Use one of {', '.join(known)}, "
                             f"or 'metadata.<key>' for your own metadata")


def _condition(name: str, kind: str, op: str, value: Any) -> Condition:
    if op not in OPERATORS:
        raise InvalidFilterError(f"unknown operator {op!r} on {name!r}; use one of "
                                 f"{', '.join(OPERATORS)}")
    if op == "contains":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InvalidFilterError(f"'contains' on {name!r} needs a string or number")
        if kind not in ("text", "tags", "meta"):
            raise InvalidFilterError(f"'contains' works on text, tags and metadata, not {name!r}")
        return Condition(name, kind, op, value)
    if op == "in":
        if not isinstance(value, (list, tuple, set)) or not value:
            raise InvalidFilterError(f"'in' on {name!r} needs a non-empty list")
        return Condition(name, kind, op, tuple(_value(name, kind, v) for v in value))
    if kind == "tags":
        raise InvalidFilterError("'tags' supports only 'contains'")
    if value is None and op in ("eq", "ne"):
        return Condition(name, kind, op, None)
    return Condition(name, kind, op, _value(name, kind, value))


def _value(name: str, kind: str, value: Any) -> Any:
    if kind == "time":
        try:
            return parse_time(value, field=name).timestamp()
        except InvalidDateError as exc:
            raise InvalidFilterError(str(exc)) from exc
    if kind == "number" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise InvalidFilterError(f"{name!r} compares with numbers, got {value!r}")
    if kind == "text" and not isinstance(value, str):
        raise InvalidFilterError(f"{name!r} compares with strings, got {value!r}")
    if kind == "meta" and not isinstance(value, (str, int, float, bool)):
        raise InvalidFilterError(f"metadata filters compare with scalars, got {value!r}")
    return value
