"""Copy a whole store into an empty one (SQLite to PostgreSQL and back): `memstack migrate`.

Rows keep their ids and rowids (versions point at items by rowid), the audit log its sequence,
every vector its bytes. Search keys are the one part not copied as rows: SQLite's full-text index
keeps no text (it is contentless), so each item's keys are made again from its text by the same
rules (ingest/rules.py) and given the vectors stored for them, in order; the context keys of a
session's turns are made again from the turns. A key whose vector is missing (rules changed
since it was written) is an error that names the item: run `memstack reembed` on the source.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .._errors import InvalidInputError
from .base import Store

# table -> columns copied as they are (both schemas have them)
TABLES: dict[str, tuple[str, ...]] = {
    "cubes": ("id", "name", "owner", "created_at", "embed_model", "embed_dim", "generation",
              "metadata"),
    "items": ("rowid", "cube_id", "id", "kind", "content", "content_hash", "role", "speaker",
              "user_id", "agent_id", "session_id", "parent_id", "metadata", "tags",
              "observed_at", "valid_from", "valid_to", "recorded_at", "updated_at", "status",
              "version", "superseded_by", "source_ids", "producer", "access_count",
              "last_accessed", "importance", "kv_blocks", "shards", "expires_at"),
    "versions": ("item_rowid", "version", "content", "metadata", "status", "valid_from",
                 "valid_to", "changed_at", "reason", "actor", "superseded_by", "source_ids"),
    "audit": ("seq", "at", "actor", "action", "cube", "item_ids", "detail", "prev", "hash"),
    "users": ("id", "role", "created_at"),
    "api_keys": ("id", "user_id", "hash", "cubes", "label", "created_at", "last_used",
                 "revoked_at"),
    "grants": ("cube_id", "user_id", "access", "granted_by", "granted_at"),
    "kv_blocks": ("id", "cube_id", "model_key", "user_id", "agent_id", "file", "item_ids",
                  "tokens", "bytes", "created_at", "last_used", "uses"),
    "shards": ("id", "cube_id", "model_key", "folder", "item_ids", "parent", "status",
               "changed_items", "created_at"),
    "repairs": ("name", "state", "done_at", "detail"),
    "retention": ("cube_id", "kind", "expire_after", "archive_unused", "purge_after", "set_by",
                  "set_at"),
    "answers": ("id", "cube_id", "kind", "user_id", "agent_id", "query", "item_ids",
                "created_at"),
}


def migrate(source: Store, target: Store, rekey: Callable[[Store, Store], int],
            progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Copy `source` into the empty `target` in one transaction; `rekey(source, target)` writes
    the search keys (the facade passes one that knows the rules). Returns rows per table."""
    if target.cube_count():
        raise InvalidInputError(f"{target.location} is not empty; migrate copies into an "
                                "empty store")
    counts: dict[str, int] = {}
    with target.transaction():
        target.clear_repairs()
        for table, columns in TABLES.items():
            rows = source.dump_rows(table, columns)
            target.load_rows(table, columns, rows)
            counts[table] = len(rows)
            if progress:
                progress(table, len(rows))
        counts["keys"] = rekey(source, target)
        target.sync_sequences()
    return counts


def key_vectors(source: Store, item_rowid: int) -> dict[str, list[np.ndarray]]:
    """An item's stored vectors by key role, in the order they were written."""
    out: dict[str, list[np.ndarray]] = {}
    for role, vector in source.key_vectors(item_rowid):
        out.setdefault(role, []).append(vector)
    return out


def pair_vectors(item_id: str, roles: list[str], stored: dict[str, list[np.ndarray]]
                 ) -> np.ndarray:
    """The stored vectors for keys of these roles, in order; an error if any is missing."""
    taken: dict[str, int] = {}
    out: list[Any] = []
    for role in roles:
        n = taken.get(role, 0)
        vectors = stored.get(role, [])
        if n >= len(vectors):
            raise InvalidInputError(f"item {item_id}: no stored vector for its {role!r} key "
                                    "(its keys were made by other rules); run `memstack "
                                    "reembed` on the source first")
        out.append(vectors[n])
        taken[role] = n + 1
    return np.stack(out) if out else np.zeros((0, 0), np.float32)
