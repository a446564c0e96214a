"""Metadata filters: {"field": value} or {"field": {"op": value}}, compiled to SQL over items `i`.

Fields are the item's own (kind, speaker, user_id, observed_at, ...), `tags`, or `metadata.<key>`.
Operators: eq, ne, in, gt, gte, lt, lte, contains. Several fields are combined with AND.
"""

from __future__ import annotations

import re
from typing import Any

from .._errors import InvalidFilterError, InvalidDateError
from .._time import parse_time

TEXT_FIELDS = {"id", "kind", "role", "speaker", "user_id", "agent_id", "session_id", "parent_id",
               "producer", "content", "status", "superseded_by"}
NUMBER_FIELDS = {"version", "importance", "access_count"}
TIME_FIELDS = {"observed_at", "valid_from", "valid_to", "recorded_at", "updated_at",
               "last_accessed"}
OPERATORS = {"eq": "=", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=",
             "in": "IN", "contains": "CONTAINS"}
_META_KEY = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def compile_filters(filters: dict[str, Any] | None) -> tuple[str, list[Any]]:
    """SQL condition and parameters; raises InvalidFilterError naming the bad part.

    >>> compile_filters({"metadata.topic": {"in": ["food", "travel"]}})
    ("json_extract(i.metadata, '$.topic') IN (?, ?)", ['food', 'travel'])
    """
    if filters is None:
        return "1", []
    if not isinstance(filters, dict):
        raise InvalidFilterError(f"filters must be a dict such as {{'speaker': 'Ann'}}, "
                                 f"got {type(filters).__name__}")
    parts, params = [], []
    for name, condition in filters.items():
        column, kind = _column(name)
        ops = condition if isinstance(condition, dict) else {"eq": condition}
        if not ops:
            raise InvalidFilterError(f"filter on {name!r} has no operator")
        for op, value in ops.items():
            sql, values = _condition(name, column, kind, op, value)
            parts.append(sql)
            params.extend(values)
    return (" AND ".join(parts) or "1"), params


def _column(name: str) -> tuple[str, str]:
    if not isinstance(name, str):
        raise InvalidFilterError(f"filter field names are strings, got {name!r}")
    if name in TEXT_FIELDS:
        return f"i.{name}", "text"
    if name in NUMBER_FIELDS:
        return f"i.{name}", "number"
    if name in TIME_FIELDS:
        return f"i.{name}", "time"
    if name == "tags":
        return "i.tags", "tags"
    if name.startswith("metadata.") and _META_KEY.match(name[9:]):
        return f"json_extract(i.metadata, '$.{name[9:]}')", "meta"
    known = sorted(TEXT_FIELDS | NUMBER_FIELDS | TIME_FIELDS | {"tags"})
    raise InvalidFilterError(f"unknown filter field {name!r}. Use one of {', '.join(known)}, "
                             f"or 'metadata.<key>' for your own metadata")


def _condition(name: str, column: str, kind: str, op: str, value: Any) -> tuple[str, list[Any]]:
    if op not in OPERATORS:
        raise InvalidFilterError(f"unknown operator {op!r} on {name!r}; use one of "
                                 f"{', '.join(OPERATORS)}")
    if op == "contains":
        return _contains(name, column, kind, value)
    if op == "in":
        if not isinstance(value, (list, tuple, set)) or not value:
            raise InvalidFilterError(f"'in' on {name!r} needs a non-empty list")
        values = [_value(name, kind, v) for v in value]
        return f"{column} IN ({', '.join('?' * len(values))})", values
    if kind == "tags":
        raise InvalidFilterError("'tags' supports only 'contains'")
    if value is None and op in ("eq", "ne"):
        return f"{column} IS {'NOT ' if op == 'ne' else ''}NULL", []
    return f"{column} {OPERATORS[op]} ?", [_value(name, kind, value)]


def _contains(name: str, column: str, kind: str, value: Any) -> tuple[str, list[Any]]:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise InvalidFilterError(f"'contains' on {name!r} needs a string or number")
    if kind in ("tags", "meta"):
        array = "i.tags" if kind == "tags" else f"i.metadata, '$.{name[9:]}'"
        return (f"(EXISTS (SELECT 1 FROM json_each({array}) WHERE value = ?) OR "
                f"(json_type({array}) = 'text' AND instr({column}, ?) > 0))", [value, str(value)])
    if kind != "text":
        raise InvalidFilterError(f"'contains' works on text, tags and metadata, not {name!r}")
    return f"instr(lower({column}), lower(?)) > 0", [str(value)]


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
