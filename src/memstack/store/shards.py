"""Rows of the parametric tier's LoRA shards. A change to an item's text or status marks every
shard trained on it stale (in the same transaction); `maintain` retrains or drops it."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .kvblocks import place

_COLUMNS = ("id", "cube_id", "model_key", "folder", "item_ids", "parent", "status",
            "changed_items", "created_at")


@dataclass(frozen=True)
class ShardRow:
    id: str
    cube_id: int
    model_key: str
    folder: str
    item_ids: list[str]
    parent: str | None
    status: str
    changed_items: list[str]
    created_at: float


def _row(row: Any) -> ShardRow:
    values = list(row)
    values[4], values[7] = json.loads(values[4]), json.loads(values[7])
    return ShardRow(*values)


class ShardRows:
    """Mixed into SQLiteStore (it provides `conn`, `path` and `after_commit`)."""

    conn: Any
    path: Path
    after_commit: Callable[[Callable[[], None]], None]

    @property
    def shard_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".shards")

    def insert_shard(self, row: ShardRow) -> None:
        values = [getattr(row, c) for c in _COLUMNS]
        values[4], values[7] = json.dumps(row.item_ids), json.dumps(row.changed_items)
        self.conn.execute(f"INSERT INTO shards ({', '.join(_COLUMNS)}) VALUES "
                          f"({', '.join('?' * len(_COLUMNS))})", values)
        place(self.conn, "shards", row.item_ids, row.id, add=True)

    def shards(self, status: str | None = None) -> list[ShardRow]:
        where, params = ("status = ?", [status]) if status is not None else ("1 = 1", [])
        rows = self.conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM shards WHERE {where} "
                                 "ORDER BY created_at", params)
        return [_row(r) for r in rows]

    def shard(self, shard_id: str) -> ShardRow | None:
        row = self.conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM shards WHERE id = ?",
                                (shard_id,)).fetchone()
        return _row(row) if row else None

    def drop_shard(self, shard_id: str) -> None:
        """Delete the row and placements; the adapter folder goes when the transaction commits."""
        row = self.shard(shard_id)
        if row is None:
            return
        self.conn.execute("DELETE FROM shards WHERE id = ?", (shard_id,))
        self.conn.execute("UPDATE shards SET parent = NULL WHERE parent = ?", (shard_id,))
        place(self.conn, "shards", row.item_ids, shard_id, add=False)
        folder = self.shard_dir / row.folder
        self.after_commit(lambda: shutil.rmtree(folder, ignore_errors=True))

    def mark_shards_stale(self, rowids: Iterable[int]) -> None:
        for rowid in rowids:
            row = self.conn.execute("SELECT id, shards FROM items WHERE rowid = ?",
                                    (rowid,)).fetchone()
            if not row or row[1] in (None, "[]"):
                continue
            for shard_id in json.loads(row[1]):
                shard = self.shard(shard_id)
                if shard is not None:
                    changed = sorted({*shard.changed_items, row[0]})
                    self.conn.execute("UPDATE shards SET status = 'stale', changed_items = ? "
                                      "WHERE id = ?", (json.dumps(changed), shard_id))
