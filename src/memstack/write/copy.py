"""A whole store copied into another (SQLite to PostgreSQL and back), keys made again."""

from __future__ import annotations

from typing import Callable

from ..store.base import Store
from ..store.migrate import key_vectors, migrate, pair_vectors
from ..store.selection import Selection
from .drafts import stored_keys
from .writer import Writer


def copy_store(source: Store, target: Store, writer: Writer,
               progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Copy `source` into the empty `target` (store/migrate.py); `writer` writes to `target`
    and rebuilds the turns' context keys."""

    def rekey(src: Store, dst: Store) -> int:
        items = dst.select_items(Selection(status="live"))
        count = 0
        for rowid, item in items:
            texts, roles = stored_keys(item)
            vectors = pair_vectors(item.id, roles, key_vectors(src, rowid))
            dst.insert_keys([(rowid, texts, roles, vectors)])
            count += len(texts)
        for _, item in items:
            if item.kind == "session":
                turns = dst.select_items(Selection(status="any", parent_id=item.id))
                writer.refresh_context(item.id, [r for r, _ in turns])
        return count

    return migrate(source, target, rekey, progress)
