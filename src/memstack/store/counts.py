"""Counts over a store's items, for reports and benchmarks."""

from __future__ import annotations

from typing import Any


class CountRows:
    """Item counts, on the store's connection (a mixin of the SQL stores)."""

    conn: Any

    def count_items(self, *, kind: str, status: str = "active") -> int:
        """How many items of one kind and status there are, over every cube."""
        return self.conn.execute("SELECT count(*) FROM items WHERE kind = ? AND status = ?",
                                 (kind, status)).fetchone()[0]
