"""Persistence: the Store protocol (base.py) and its stores, SQLite (embedded) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from .._errors import InvalidInputError
from .base import Store
from .sqlite import SQLiteStore

__all__ = ["Store", "SQLiteStore", "open_store", "is_url"]

URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(target: str | Path) -> bool:
    return isinstance(target, str) and "://" in target


def open_store(target: str | Path, *, files: str | Path | None = None,
               read_only: bool = False) -> Store:
    """The store at `target`: a PostgreSQL URL (postgresql://user:pw@host/db) or an SQLite
    file path. `files` is where a PostgreSQL store keeps the tiers' files. `read_only` (for a
    PostgreSQL read replica): no schema migration, and every write is refused.

    >>> open_store("memory.db")
    """
    if not is_url(target):
        if read_only:
            raise InvalidInputError("read_only is for a PostgreSQL read replica; an SQLite "
                                    "file is read by its own process")
        return SQLiteStore(target)
    if not str(target).startswith(URL_SCHEMES):
        scheme = str(target).split("://", 1)[0]
        raise InvalidInputError(f"a store is an SQLite file path or a postgresql:// URL; "
                                f"{scheme}:// is not supported")
    from .postgres import PostgresStore

    return PostgresStore(str(target), files=files, read_only=read_only)
