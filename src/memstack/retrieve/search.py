"""Hybrid search: BM25 candidates from FTS5 and vector candidates from the ANN index, fused.

Each retriever ranks items (an item's best key counts). Fusion is reciprocal rank fusion; items
whose time matches a time cue in the query ("last May") get a boost.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from .._models import Hit
from ..index import HnswIndex
from ..store.sqlite import SQLiteStore
from .fusion import rrf
from .query import Query, analyse

__all__ = ["analyse", "hybrid"]

TIME_BOOST = 1.3


def candidates_needed(top_k: int) -> int:
    return max(50, 4 * top_k)


def hybrid(store: SQLiteStore, indexes: Sequence[HnswIndex], query: Query, qvec: np.ndarray,
           where: str, params: Sequence[Any], top_k: int) -> list[Hit]:
    n = candidates_needed(top_k)
    with store.lock:
        bm25 = store.fts(query.fts, where, params, n) if query.fts else []
        vector = _vector(store, indexes, qvec, where, params, n)
    rankings = {"bm25": [r for r, _ in bm25], "vector": [r for r, _ in vector]}
    fused = rrf(rankings)
    raw = {"bm25": dict(bm25), "vector": dict(vector)}
    if query.time_range is not None:
        with store.lock:
            times = store.item_times(list(fused))
        fused = {r: s * (TIME_BOOST if _in_range(*times[r], query.time_range) else 1.0)
                 for r, s in fused.items()}
    order = sorted(fused, key=lambda r: (-fused[r], r))[:top_k]
    with store.lock:
        items = store.items_by_rowid(order)
    ranks = {name: {r: n for n, r in enumerate(ranked, 1)} for name, ranked in rankings.items()}
    return [Hit(items[r], fused[r], {k: v[r] for k, v in ranks.items() if r in v},
                {k: v[r] for k, v in raw.items() if r in v}) for r in order]


def _vector(store: SQLiteStore, indexes: Sequence[HnswIndex], qvec: np.ndarray, where: str,
            params: Sequence[Any], n: int) -> list[tuple[int, float]]:
    """Best vector similarity per item within the scope, best first."""
    found: list[tuple[int, float]] = []
    for index in indexes:
        hits = index.search(qvec, min(len(index), 4 * n))
        items = _allowed_items(store, hits, where, params)
        if len(items) < n and len(hits) < len(index):
            # the scope is narrower than the cube: search within its keys only
            hits = index.search(qvec, n, allowed=store.scoped_keys(where, params))
            items = _allowed_items(store, hits, where, params)
        found += items
    best: dict[int, float] = {}
    for rowid, sim in found:
        best[rowid] = max(sim, best.get(rowid, -1.0))
    return sorted(best.items(), key=lambda kv: -kv[1])[:n]


def _allowed_items(store: SQLiteStore, hits: list[tuple[int, float]], where: str,
                   params: Sequence[Any]) -> list[tuple[int, float]]:
    if not hits:
        return []
    owners = store.key_items([k for k, _ in hits])
    rowids = sorted(set(owners.values()))
    marks = ", ".join("?" * len(rowids))
    allowed = {r for (r,) in store.conn.execute(
        f"SELECT i.rowid FROM items i JOIN cubes c ON c.id = i.cube_id "
        f"WHERE i.rowid IN ({marks}) AND {where}", (*rowids, *params))}
    out, seen = [], set()
    for key, sim in hits:
        rowid = owners.get(key)
        if rowid in allowed and rowid not in seen:
            seen.add(rowid)
            out.append((rowid, sim))
    return out


def _in_range(observed_at: float | None, resolved: str | None, window) -> bool:
    start, end = window
    if observed_at is not None and start.timestamp() <= observed_at < end.timestamp():
        return True
    for span in json.loads(resolved) if resolved else []:
        if span["start"] < end.date().isoformat() and span["end"] > start.date().isoformat():
            return True
    return False
