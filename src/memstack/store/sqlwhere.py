"""A Selection compiled to an SQL condition over items `i` (SQLite's dialect)."""

from __future__ import annotations

from typing import Any

from .selection import Condition, Selection

_OPS = {"eq": "=", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def where(sel: Selection) -> tuple[str, list[Any]]:
    """SQL condition and parameters.

    >>> where(Selection(cube_ids=(1,), user_id="ann"))
    ("i.cube_id IN (1) AND i.status = 'active' AND i.user_id = ?", ['ann'])
    """
    parts: list[str] = []
    params: list[Any] = []
    if sel.cube_ids:
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
        sql, values = _condition(condition)
        parts.append(sql)
        params += values
    return " AND ".join(parts) or "1", params


def _lifecycle(sel: Selection, parts: list[str], params: list[Any]) -> None:
    if sel.as_of is not None:
        t = sel.as_of.timestamp()
        # valid time: what was true (or had been said) at `as_of`
        parts.append("i.status != 'deleted' AND "
                     "coalesce(i.valid_from, i.observed_at, i.recorded_at) <= ? AND "
                     "(i.valid_to IS NULL OR i.valid_to > ?)")
        params += [t, t]
    elif sel.status == "active":
        parts.append("i.status = 'active'")
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
