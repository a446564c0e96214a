"""Stores: the source of truth. SQLite is the embedded default."""

from .sqlite import SQLiteStore

__all__ = ["SQLiteStore"]
