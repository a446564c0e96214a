"""Rows of the activation tier's KV blocks, and the rule that keeps them honest: a change to an
item's text or status drops every block holding it, in the same transaction, and the block's
file is unlinked once that transaction commits."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

_COLUMNS = ("id", "cube_id", "model_key", "user_id", "agent_id", "file", "item_ids", "tokens",
            "bytes", "created_at", "last_used", "uses")


@dataclass(frozen=True)
class BlockRow:
    id: str
    cube_id: int
    model_key: str
    user_id: str | None
    agent_id: str | None
    file: str
    item_ids: list[str]
    tokens: int
    bytes: int
    created_at: float
    last_used: float | None
    uses: int


def _row(row: Any) -> BlockRow:
    values = list(row)
    values[6] = json.loads(values[6])
    return BlockRow(*values)


class KVBlockRows:
    """Mixed into SQLiteStore (it provides `conn`, `path` and `after_commit`)."""

    conn: Any
    path: Path
    after_commit: Callable[[Callable[[], None]], None]

    @property
    def kv_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".kv")

    def insert_block(self, row: BlockRow) -> None:
        values = [getattr(row, c) for c in _COLUMNS]
        values[6] = json.dumps(row.item_ids)
        self.conn.execute(f"INSERT INTO kv_blocks ({', '.join(_COLUMNS)}) VALUES "
                          f"({', '.join('?' * len(_COLUMNS))})", values)
        self._place(row.item_ids, row.id, add=True)

    def blocks(self, cube_id: int | None = None, model_key: str | None = None) -> list[BlockRow]:
        tests = [(c, v) for c, v in (("cube_id", cube_id), ("model_key", model_key))
                 if v is not None]
        where = " AND ".join(f"{c} = ?" for c, _ in tests) or "1 = 1"
        rows = self.conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM kv_blocks WHERE {where} "
                                 "ORDER BY created_at", [v for _, v in tests])
        return [_row(r) for r in rows]

    def block(self, block_id: str) -> BlockRow | None:
        row = self.conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM kv_blocks WHERE id = ?",
                                (block_id,)).fetchone()
        return _row(row) if row else None

    def use_blocks(self, block_ids: Iterable[str]) -> None:
        now = time.time()
        self.conn.executemany("UPDATE kv_blocks SET uses = uses + 1, last_used = ? WHERE id = ?",
                              [(now, b) for b in block_ids])

    def drop_blocks(self, block_ids: Iterable[str]) -> list[str]:
        """Delete block rows and their placements; their files go when the transaction commits.
        Returns the ids dropped."""
        dropped = []
        for block_id in dict.fromkeys(block_ids):
            row = self.block(block_id)
            if row is None:
                continue
            self.conn.execute("DELETE FROM kv_blocks WHERE id = ?", (block_id,))
            self._place(row.item_ids, block_id, add=False)
            path = self.kv_dir / row.file
            self.after_commit(lambda path=path: path.unlink(missing_ok=True))
            dropped.append(block_id)
        return dropped

    def drop_blocks_of_items(self, rowids: Iterable[int]) -> list[str]:
        """The invalidation rule: every block holding one of these items goes."""
        held: list[str] = []
        for rowid in rowids:
            row = self.conn.execute("SELECT kv_blocks FROM items WHERE rowid = ?",
                                    (rowid,)).fetchone()
            if row and row[0] not in (None, "[]"):
                held += json.loads(row[0])
        return self.drop_blocks(held)

    def _place(self, item_ids: list[str], block_id: str, *, add: bool) -> None:
        place(self.conn, "kv_blocks", item_ids, block_id, add=add)


def place(conn: Any, column: str, item_ids: list[str], tier_id: str, *, add: bool) -> None:
    """Add or remove a block or shard id in the items' placement column (kv_blocks, shards)."""
    assert column in ("kv_blocks", "shards")
    for item_id in item_ids:
        row = conn.execute(f"SELECT rowid, {column} FROM items WHERE id = ?",
                           (item_id,)).fetchone()
        if row is None:
            continue
        placed = [b for b in json.loads(row[1] or "[]") if b != tier_id]
        if add:
            placed.append(tier_id)
        conn.execute(f"UPDATE items SET {column} = ? WHERE rowid = ?",
                     (json.dumps(placed), row[0]))
