"""A Selection compiled to an SQL condition over items `i`, in SQLite's or PostgreSQL's dialect.

Parameters are `?` in both (the Postgres connection turns them into its own); what differs is
how JSON is read (SQLite's json_extract, Postgres' jsonb operators) and substring search.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .selection import Condition, Selection

_OPS = {"eq": "=", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def where(sel: Selection, dialect: str = "sqlite") -> tuple[str, list[Any]]:
    """SQL condition and parameters.

    >>> sql, params = where(Selection(cube_ids=(1,), user_id="ann"))
    >>> sql
    "i.cube_id IN (1) AND i.status = 'active' AND (i.expires_at IS NULL OR i.expires_at > ?) AND i.user_id = ?"
    >>> params[1:]
    ['ann']
    """
    parts: list[str] = []
    params: list[Any] = []
    if sel.cube_ids and dialect == "postgres":  # one text for any cubes: prepared once
        parts.append("i.cube_id = ANY(?)")
        params.append([int(c) for c in sel.cube_ids])
    elif sel.cube_ids:
        parts.append(f"i.cube_id IN ({', '.join(str(int(c)) for c in sel.cube_ids)})")
    _lifecycle(sel, parts, params)
    for name, value in sel.scope.items():
        if value is not None:
            parts.append(f"i.{name} = ?")
            params.append(value)
        elif name in sel.exact:
            parts.append(f"i.{name} IS NULL")
    if sel.parent_id is not None:
        parts.append("i.parent_id = ?")
        params.append(sel.parent_id)
    if sel.kinds is not None:
        parts.append(f"i.kind IN ({', '.join('?' * len(sel.kinds))})")
        params += sel.kinds
    for bound, op in ((sel.since, ">="), (sel.until, "<")):
        if bound is not None:
            parts.append(f"i.observed_at {op} ?")
            params.append(bound.timestamp())
    for condition in sel.conditions:
        sql, values = (_pg_condition if dialect == "postgres" else _condition)(condition)
        parts.append(sql)
        params += values
    return " AND ".join(parts) or "1", params


def _lifecycle(sel: Selection, parts: list[str], params: list[Any]) -> None:
    if sel.as_of is not None:
        t = sel.as_of.timestamp()
        # valid time: what was true (or had been said) and not yet expired at `as_of`
        parts.append("i.status != 'deleted' AND "
                     "coalesce(i.valid_from, i.observed_at, i.recorded_at) <= ? AND "
                     "(i.valid_to IS NULL OR i.valid_to > ?) AND "
                     "(i.expires_at IS NULL OR i.expires_at > ?)")
        params += [t, t, t]
    elif sel.status == "active":  # an expired item leaves search at once, before maintenance
        parts.append("i.status = 'active' AND (i.expires_at IS NULL OR i.expires_at > ?)")
        params.append(time.time())
    elif sel.status == "live":
        parts.append("i.status != 'deleted'")


def _column(c: Condition) -> str:
    if c.kind == "meta":
        return f"json_extract(i.metadata, '$.{c.field[9:]}')"
    return f"i.{c.field}"  # a validated field name (selection.py), never user text


def _condition(c: Condition) -> tuple[str, list[Any]]:
    column = _column(c)
    if c.op == "contains":
        return _contains(c, column)
    if c.op == "in":
        return f"{column} IN ({', '.join('?' * len(c.value))})", list(c.value)
    if c.value is None:
        return f"{column} IS {'NOT ' if c.op == 'ne' else ''}NULL", []
    return f"{column} {_OPS[c.op]} ?", [c.value]


def _contains(c: Condition, column: str) -> tuple[str, list[Any]]:
    if c.kind in ("tags", "meta"):
        array = "i.tags" if c.kind == "tags" else f"i.metadata, '$.{c.field[9:]}'"
        return (f"(EXISTS (SELECT 1 FROM json_each({array}) WHERE value = ?) OR "
                f"(json_type({array}) = 'text' AND instr({column}, ?) > 0))",
                [c.value, str(c.value)])
    return f"instr(lower({column}), lower(?)) > 0", [str(c.value)]


def _pg_condition(c: Condition) -> tuple[str, list[Any]]:
    """Postgres: JSON fields compare as jsonb (numbers as numbers, strings as strings, as
    SQLite's json_extract does); text fields as text."""
    if c.kind not in ("meta", "tags"):
        column = f"i.{c.field}"
        if c.op == "contains":
            return f"strpos(lower({column}), lower(?)) > 0", [str(c.value)]
        return _compare(column, c, lambda v: v, "?")
    column = "i.tags::jsonb" if c.kind == "tags" else \
        "(i.metadata::jsonb #> '{" + ",".join(c.field[9:].split(".")) + "}')"
    if c.op == "contains":
        return (f"({column} @> jsonb_build_array(?::jsonb) OR (jsonb_typeof({column}) = "
                f"'string' AND strpos({column} #>> '{{}}', ?) > 0))",
                [json.dumps(c.value), str(c.value)])
    return _compare(column, c, json.dumps, "?::jsonb")


def _compare(column: str, c: Condition, encode: Any, mark: str) -> tuple[str, list[Any]]:
    if c.op == "in":
        return f"{column} IN ({', '.join([mark] * len(c.value))})", [encode(v) for v in c.value]
    if c.value is None:
        null = f"{column} IS NULL" if mark == "?" else \
            f"({column} IS NULL OR {column} = 'null'::jsonb)"
        return (f"NOT {null}" if c.op == "ne" else null), []
    return f"{column} {_OPS[c.op]} {mark}", [encode(c.value)]
