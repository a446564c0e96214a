"""A micro-benchmark of raw SQLite FTS5, outside any memstack store: what one FTS5 table per
cube would cost (creation time, file size, the schema parse a new connection pays, query
latency within one table). bench/corpus.py makes the documents and reports the numbers."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .sqlite import _driver


@dataclass(frozen=True)
class FtsTableTimes:
    create_seconds: float  # CREATE VIRTUAL TABLE of every table, in one transaction
    file_bytes: int  # the database and its WAL after a checkpoint
    connect_seconds: float  # the first query of a new connection (it parses the whole schema)
    query_seconds: list[float]  # one BM25 query each, all on the first table


def time_fts_tables(tables: int, docs: Sequence[str], queries: Sequence[str]) -> FtsTableTimes:
    """Spread `docs` round-robin over `tables` FTS5 tables in a temporary database, then run
    `queries` (FTS5 MATCH syntax) on the first table."""
    db = _driver()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fts.db")
        create = _fill(db.connect(path, isolation_level=None), tables, docs)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        started = time.perf_counter()
        conn = db.connect(path, isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM f0").fetchone()  # parses the whole schema
            connect = time.perf_counter() - started
            latencies = [_timed_query(conn, query) for query in queries]
        finally:
            conn.close()
    return FtsTableTimes(create, size, connect, latencies)


def _fill(conn: Any, tables: int, docs: Sequence[str]) -> float:
    """Create the tables and insert the documents; returns the seconds the creation took."""
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        started = time.perf_counter()
        conn.execute("BEGIN")
        for k in range(tables):
            conn.execute(f"CREATE VIRTUAL TABLE f{k} USING fts5(text, tokenize='porter unicode61')")
        conn.execute("COMMIT")
        create = time.perf_counter() - started
        conn.execute("BEGIN")
        for i, text in enumerate(docs):
            conn.execute(f"INSERT INTO f{i % tables} (text) VALUES (?)", (text,))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return create


def _timed_query(conn: Any, query: str) -> float:
    started = time.perf_counter()
    conn.execute("SELECT rowid, bm25(f0) FROM f0 WHERE f0 MATCH ? ORDER BY bm25(f0) LIMIT 50",
                 (query,)).fetchall()
    return time.perf_counter() - started
