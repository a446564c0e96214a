"""Deletion receipts: what a deletion removed, checked after the fact, for a data-subject
request.

Before the purge, `capture` records for every item the deletion will reach (the item, a
session's turns, facts derived from them) its words, its search vectors, the KV blocks and
shards that hold it, and when it was recorded. After the purge, `check` looks again, each
check a read of the store, not a promise: the row keeps no text, no version keeps text, the
full-text index finds none of its words for it, the vector index returns it for none of its
own vectors, its KV blocks are gone (rows and files), its shards are stale (to retrain without
it), derived facts are deleted; and it lists the backups and cube archives written while the
item existed (from the audit log), which still hold it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import InvalidQueryError
from .._models import Item
from ..retrieve.query import analyse
from ..store.base import Store
from ..store.selection import Selection

_COPIES = ("backup", "export", "export_cube")  # audit actions that wrote the store's items elsewhere


@dataclass
class Trace:
    """One item as it was before the deletion."""

    item_id: str
    rowid: int
    cube_id: int
    kind: str
    words: tuple[str, ...]
    vectors: list[np.ndarray]
    kv_blocks: dict[str, str]  # block id -> its file, relative to the store's KV folder
    shards: list[str]
    recorded_at: dt.datetime | None
    derived: bool = False  # reached through source_ids (a fact from the deleted text)


@dataclass
class Capture:
    requested: list[str]
    traces: dict[str, Trace] = field(default_factory=dict)


def capture(store: Store, cube_id: int, ids: list[str], cascade: bool) -> Capture:
    """Everything the deletion of `ids` will reach, as it is now (the purge's own rounds:
    the items, a session's turns, then what was derived from them)."""
    out, pending, derived = Capture(list(ids)), list(ids), False
    while pending:
        round_ids = []
        for item_id in pending:  # grows while it runs: a session's turns join it
            found = store.item_by_id(item_id)
            if found is None or found[1].status == "deleted" or item_id in out.traces:
                continue
            item = found[1]
            out.traces[item_id] = _trace(store, cube_id, item, derived)
            round_ids.append(item_id)
            if item.kind == "session":
                pending.extend(i.id for _, i in store.select_items(
                    Selection(status="live", parent_id=item.id)))
        pending = [i for i in store.derived_from(cube_id, round_ids) if i not in out.traces] \
            if cascade else []
        derived = True
    return out


def _trace(store: Store, cube_id: int, item: Item, derived: bool) -> Trace:
    rowid = store.item_by_id(item.id)[0]
    try:
        words = analyse(item.content or "", dt.datetime.now(dt.timezone.utc)).words[:12]
    except InvalidQueryError:
        words = ()
    vectors = [v for _, v in store.key_vectors(rowid)]
    blocks = {b: row.file for b in item.kv_blocks if (row := store.block(b)) is not None}
    return Trace(item.id, rowid, cube_id, item.kind, tuple(words), vectors, blocks,
                 list(item.shards), item.recorded_at, derived)


def check(store: Store, cube: str, before: Capture) -> dict[str, Any]:
    """The receipt: per item what was checked and found clean, and the copies that were
    written while it existed. `clean` is true when every check passed."""
    items = {item_id: _check_item(store, trace) for item_id, trace in before.traces.items()}
    copies = _copies(store, cube, before)
    clean = all(all(v is True for k, v in r.items() if k.endswith("_clean")) for r in
                items.values())
    return {"requested": before.requested, "deleted": sorted(items),
            "derived_deleted": sorted(i for i, t in before.traces.items() if t.derived),
            "items": items, "copies_still_holding": copies, "clean": clean,
            "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _check_item(store: Store, trace: Trace) -> dict[str, Any]:
    item = store.items_by_rowid([trace.rowid])[trace.rowid]
    versions = store.versions(trace.rowid, trace.item_id)
    scope = Selection(cube_ids=(trace.cube_id,), status="any")
    words_hit = trace.words and any(
        rowid == trace.rowid for hits in store.fts(trace.words, scope, 1000).values()
        for rowid, _ in hits)
    vector_hit = any(rowid == trace.rowid for vec in trace.vectors
                     for hits in store.vector_candidates(vec, scope, 50).values()
                     for rowid, _ in hits)
    blocks_left = [b for b, file in trace.kv_blocks.items()
                   if store.block(b) is not None or (store.kv_dir / file).exists()]
    shards = [store.shard(s) for s in trace.shards]
    return {
        "kind": trace.kind,
        "row_clean": item.status == "deleted" and item.content is None and not item.metadata,
        "versions_clean": all(v.content is None for v in versions),
        "versions_checked": len(versions),
        "full_text_clean": not words_hit, "words_checked": len(trace.words),
        "vector_index_clean": not vector_hit, "vectors_checked": len(trace.vectors),
        "kv_blocks_dropped": sorted(trace.kv_blocks), "kv_blocks_clean": not blocks_left,
        "shards_stale": [s.id for s in shards if s is not None and s.status == "stale"],
        "shards_clean": all(s is None or s.status == "stale" and trace.item_id in
                            s.changed_items for s in shards),
    }


def _copies(store: Store, cube: str, before: Capture) -> list[dict[str, Any]]:
    """Backups of the store and exports of this cube written after the earliest of the items
    was recorded: they were taken while it existed and still hold it."""
    times = [t.recorded_at for t in before.traces.values() if t.recorded_at is not None]
    if not times:
        return []
    since, out, after = min(times), [], 0
    while entries := store.audit_log(5000, after):
        for entry in entries:
            whole = entry.action == "backup" and entry.cube is None
            if (whole or entry.action in _COPIES and entry.cube == cube) and entry.at >= since:
                out.append({"action": entry.action, "at": entry.at.isoformat(),
                            "file": entry.detail.get("dest") or entry.detail.get("file"),
                            "audit_seq": entry.seq})
        after = entries[-1].seq
    return out
