"""What shared corpus statistics reveal across cubes, and what per-cube statistics would cost.

SQLite FTS5 computes BM25's document frequencies over its whole table, which holds the keys of
every cube. `leak` measures how another cube's writes move a caller's own results; `table_cost`
measures the price of the alternative, one FTS5 table per cube (file size, the schema parse a
new connection pays, creation time, query latency within one cube).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from .._memory import Memory
from ..embed import Embedder
from ..store.sqlite_fts_bench import time_fts_tables

WORDS = [f"w{i}" for i in range(3000)]


def leak(embedder: Embedder, background: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Bob searches his own cube; Alice writes a secret word in hers. How much moves?"""
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as folder, \
            Memory(Path(folder) / "m.db", embedder=embedder) as m:
        m.add_many([{"messages": " ".join(rnd.choices(WORDS, k=12)), "user_id": f"u{i % 50}",
                     "cube": f"c{i % 10}", "session_id": f"s{i}"} for i in range(background)])
        for n in range(5):  # pasta is common elsewhere, zebra is not (yet)
            m.add(f"pasta recipe {n}", user_id="carol", cube="carol", session_id="c")
        m.add("my zebra is striped", user_id="bob", cube="bob", session_id="b1")
        m.add("my pasta is good", user_id="bob", cube="bob", session_id="b2")

        def bob(query: str) -> tuple[float, float, list[str]]:
            hits = m.search(query, user_id="bob", cube="bob", top_k=2)
            return hits[0].scores["bm25"], hits[0].score, [h.item.content for h in hits]

        raw0, fused0, _ = bob("zebra")
        first = bob("zebra pasta")[2]
        m.add("the vault code is 4417 zebra", user_id="alice", cube="alice", session_id="a")
        raw1, fused1, _ = bob("zebra")
        flip_after = None
        for n in range(1, 51):  # zebras elsewhere: zebra's weight falls below pasta's
            if bob("zebra pasta")[2] != first:
                flip_after = n
                break
            m.add(f"zebra note {n}", user_id="alice", cube="alice", session_id="a")
    return {"background_items": background, "raw_bm25_before": round(raw0, 4),
            "raw_bm25_after_one_foreign_item": round(raw1, 4),
            "fused_before": round(fused0, 4), "fused_after": round(fused1, 4),
            "own_order_flips_after_foreign_items": flip_after}


def table_cost(cubes: int, docs: int = 20_000, queries: int = 200, seed: int = 0
               ) -> dict[str, Any]:
    """One FTS5 table per cube, `docs` short documents spread over them."""
    rnd = random.Random(seed)
    texts = [" ".join(rnd.choices(WORDS, k=15)) for _ in range(docs)]
    terms = [" OR ".join(rnd.choices(WORDS, k=3)) for _ in range(queries)]
    times = time_fts_tables(cubes, texts, terms)
    latencies = sorted(times.query_seconds)
    return {"cubes": cubes, "docs": docs, "create_s": round(times.create_seconds, 3),
            "file_mb": round(times.file_bytes / 1e6, 2),
            "first_query_ms": round(times.connect_seconds * 1e3, 2),
            "query_p50_ms": round(latencies[len(latencies) // 2] * 1e3, 3),
            "query_p95_ms": round(latencies[int(len(latencies) * 0.95)] * 1e3, 3)}
