"""The embedded store: one SQLite file in WAL mode, FTS5 (BM25) over search keys, vectors as blobs.

Every public write happens inside `transaction()`; one add() is one transaction. Deletion purges
content from the items row, its versions, the FTS index (secure-delete) and the vector blobs, with
`secure_delete` on so freed pages are zeroed, and a WAL checkpoint afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .._errors import (CubeNotFoundError, MissingExtraError, SchemaVersionError, StoreCorruptError,
                       StoreError)
from .._models import AuditEntry, Cube, Item, Version
from .._time import from_epoch
from .access import AccessRows
from .counts import CountRows
from .base import CubeRow, ItemField, Order, Ranked, content_hash
from .kvblocks import KVBlockRows
from .shards import ShardRows
from .schema import MIGRATIONS, SCHEMA_VERSION
from .selection import Selection
from .sqlwhere import where as _where
from .sqlite_vectors import CubeIndexes, IndexChanges, candidates

ITEM_COLUMNS = ("id", "kind", "content", "content_hash", "role", "speaker", "user_id", "agent_id",
                "session_id", "parent_id", "metadata", "tags", "observed_at", "valid_from",
                "valid_to", "recorded_at", "updated_at", "status", "version", "superseded_by",
                "source_ids", "producer", "access_count", "last_accessed", "importance",
                "kv_blocks", "shards")
_JSON_COLUMNS = {"metadata", "tags", "source_ids", "kv_blocks", "shards"}
_TIME_COLUMNS = {"observed_at", "valid_from", "valid_to", "recorded_at", "updated_at",
                 "last_accessed"}
_ORDER = {"rowid": "i.rowid", "rowid_desc": "i.rowid DESC", "observed": "i.observed_at, i.rowid"}
# a session is its whole scope: two users' sessions with the same id are two sessions
_FIELDS = {"speaker": "speaker", "role": "role", "observed_at": "observed_at",
           "directive": "json_extract(metadata, '$.directive')",
           "resolved_dates": "json_extract(metadata, '$.resolved_dates')",
           "session": "CASE WHEN session_id IS NULL THEN NULL "
                      "ELSE json_array(cube_id, user_id, agent_id, session_id) END"}
_SELECT = "SELECT i.rowid, c.name, " + ", ".join(f"i.{c}" for c in ITEM_COLUMNS) + \
          " FROM items i JOIN cubes c ON c.id = i.cube_id"


def _driver():
    import sqlite3

    if sqlite3.sqlite_version_info >= (3, 44, 0):
        return sqlite3
    try:
        from pysqlite3 import dbapi2
    except ImportError as exc:
        raise MissingExtraError(
            f"memstack needs SQLite >= 3.44 (FTS5 secure-delete); this Python has "
            f"{sqlite3.sqlite_version}. Install pysqlite3-binary or a newer Python.") from exc
    return dbapi2


class Rows:
    """The rows of one statement, read while the connection was held, and its lastrowid."""

    def __init__(self, rows: list[Any], lastrowid: int | None) -> None:
        self._rows, self.lastrowid = rows, lastrowid

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


class LockedConnection:
    """One SQLite connection shared by threads (the server's workers): every statement runs
    under the store's re-entrant lock and is read to the end before the lock is released. A
    transaction holds the same lock from BEGIN to COMMIT, so no thread ever reads another's
    uncommitted writes through the shared connection."""

    def __init__(self, conn: Any, lock: threading.RLock) -> None:
        self._conn, self._lock = conn, lock

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Rows:
        with self._lock:
            cursor = self._conn.execute(sql, params)
            return Rows(cursor.fetchall(), cursor.lastrowid)

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._lock:
            self._conn.executemany(sql, rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SQLiteStore(AccessRows, CountRows, KVBlockRows, ShardRows):
    """The source of truth. Thread-safe: one connection guarded by a re-entrant lock
    (LockedConnection); transactions hold the lock from BEGIN to COMMIT."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = _driver()
        self.lock = threading.RLock()
        self._on_commit: list[Callable[[], None]] = []
        self._changes: dict[int, IndexChanges] = {}  # this transaction's, per cube
        self._scrub = False  # a purge: save the vector indexes at commit
        self._rebuild: set[int] = set()  # cubes whose vector index is rebuilt at commit
        self.indexes = CubeIndexes(Path(f"{self.path}.vec"), self.lock, self._cube_shape,
                                   self.live_keys, self.vectors)
        try:
            self.conn = LockedConnection(self.db.connect(str(self.path), isolation_level=None,
                                                         check_same_thread=False, timeout=30.0),
                                         self.lock)
            self._configure()
            self._migrate()
        except self.db.DatabaseError as exc:
            raise StoreCorruptError(f"{self.path} is not a usable memstack database: {exc}. "
                                    "Point --db at another file or restore a backup.") from exc

    def _configure(self) -> None:
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                       "secure_delete=ON", "busy_timeout=30000"):
            self.conn.execute(f"PRAGMA {pragma}")

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} has schema version {version}, newer than this memstack understands "
                f"({SCHEMA_VERSION}). Upgrade memstack: pip install -U memstack")
        if version == 0 and self.conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]:
            raise StoreCorruptError(f"{self.path} is an SQLite database but not a memstack one; "
                                    "choose another --db path")
        while version < SCHEMA_VERSION:
            with self.transaction():
                for statement in _split(MIGRATIONS[version]):
                    self.conn.execute(statement)
                version += 1
                self.conn.execute(f"PRAGMA user_version = {version}")

    def close(self) -> None:
        """Save the vector indexes, checkpoint the WAL and close."""
        self.indexes.close()
        with self.lock:
            with contextlib.suppress(self.db.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except self.db.OperationalError as exc:
                raise StoreError(f"cannot start a write on {self.path}: {exc}") from exc
            try:
                yield
            except BaseException:
                self._on_commit.clear()
                self._changes, self._scrub, self._rebuild = {}, False, set()
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")
                self._committed()

    def _committed(self) -> None:
        changes, scrub, self._changes, self._scrub = self._changes, self._scrub, {}, False
        rebuild, self._rebuild = self._rebuild, set()
        for cube_id, change in changes.items():
            if cube_id not in rebuild:
                self.indexes.apply(cube_id, change, save=scrub)
        for cube_id in rebuild:
            self.indexes.drop(cube_id)
            self.indexes.get(cube_id).save()
        done, self._on_commit = self._on_commit, []
        for action in done:
            action()

    def flush(self) -> None:
        """Save the vector indexes now (otherwise when writes pause, and at close)."""
        with self.lock:
            self.indexes.save_all()

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run `action` once the current transaction commits (never if it rolls back); outside
        a transaction, now. For side effects outside the database, such as unlinking files."""
        if self.conn.in_transaction:
            self._on_commit.append(action)
        else:
            action()

    def checkpoint(self) -> None:
        with self.lock:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # cubes -----------------------------------------------------------------------------------
    def cube(self, name: str) -> CubeRow:
        row = self.conn.execute("SELECT id, name, owner, created_at, embed_model, embed_dim, "
                                "generation FROM cubes WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise CubeNotFoundError(f"no cube named {name!r}; list cubes with `memstack stats`")
        return CubeRow(*row)

    def create_cube(self, name: str, owner: str | None, embed_model: str, dim: int) -> CubeRow:
        # OR IGNORE: two writers creating the same cube at once both get the one row
        self.conn.execute("INSERT OR IGNORE INTO cubes (name, owner, created_at, embed_model, "
                          "embed_dim) VALUES (?, ?, ?, ?, ?)",
                          (name, owner, time.time(), embed_model, dim))
        return self.cube(name)

    def cubes(self) -> list[Cube]:
        rows = self.conn.execute(
            "SELECT c.name, c.owner, c.created_at, c.embed_model, c.embed_dim, "
            "(SELECT count(*) FROM items i WHERE i.cube_id = c.id AND i.status != 'deleted') "
            "FROM cubes c ORDER BY c.name").fetchall()
        return [Cube(r[0], r[1], from_epoch(r[2]), r[3], r[4], r[5]) for r in rows]

    def cube_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM cubes").fetchone()[0]

    def bump_generation(self, cube_id: int) -> int:
        """Count a write to a cube (every write does, once): vector indexes compare it with
        theirs to see writes of other processes."""
        self.conn.execute("UPDATE cubes SET generation = generation + 1 WHERE id = ?", (cube_id,))
        generation = self.conn.execute("SELECT generation FROM cubes WHERE id = ?",
                                       (cube_id,)).fetchone()[0]
        self._changes.setdefault(cube_id, IndexChanges()).generation = generation
        return generation

    def _cube_shape(self, cube_id: int) -> tuple[int, int]:
        """(embedding dimensions, generation) of a cube."""
        return tuple(self.conn.execute("SELECT embed_dim, generation FROM cubes WHERE id = ?",
                                       (cube_id,)).fetchone())

    def set_cube_model(self, cube_id: int, model: str, dim: int) -> None:
        self.conn.execute("UPDATE cubes SET embed_model = ?, embed_dim = ? WHERE id = ?",
                          (model, dim, cube_id))

    # items -----------------------------------------------------------------------------------
    def insert_item(self, cube_id: int, fields: dict[str, Any]) -> int:
        row = _encode(fields)
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cur = self.conn.execute(f"INSERT INTO items (cube_id, {names}) VALUES (?, {marks})",
                                (cube_id, *row.values()))
        return int(cur.lastrowid)

    def update_item(self, rowid: int, fields: dict[str, Any]) -> None:
        if "content" in fields or "status" in fields:  # derived tiers no longer match the text
            self.drop_blocks_of_items([rowid])
            self.mark_shards_stale([rowid])
        row = _encode(fields)
        sets = ", ".join(f"{name} = ?" for name in row)
        self.conn.execute(f"UPDATE items SET {sets} WHERE rowid = ?", (*row.values(), rowid))

    def insert_keys(self, item_rowid: int, texts: Sequence[str], roles: Sequence[str],
                    vectors: np.ndarray | None) -> list[int]:
        """Insert keys; with `vectors` None they are text-only (FTS, no vector)."""
        keys = []
        row = self.conn.execute("SELECT cube_id, user_id, agent_id, session_id FROM items "
                                "WHERE rowid = ?", (item_rowid,)).fetchone()
        scope = " ".join(scope_tokens(*row))
        for n, (text, role) in enumerate(zip(texts, roles)):
            blob = None if vectors is None else np.asarray(vectors[n], np.float32).tobytes()
            cur = self.conn.execute("INSERT INTO keys (item_rowid, role, vec) VALUES (?, ?, ?)",
                                    (item_rowid, role, blob))
            keys.append(int(cur.lastrowid))
            self.conn.execute("INSERT INTO keys_fts (rowid, text, scope) VALUES (?, ?, ?)",
                              (cur.lastrowid, text, scope))
        if vectors is not None and keys:
            self._changes.setdefault(row[0], IndexChanges()).added.append(
                (np.asarray(keys, dtype=np.int64), np.asarray(vectors[:len(keys)], np.float32)))
        return keys

    def delete_keys(self, item_rowid: int, role: str | None = None) -> list[int]:
        """Delete an item's keys (or only those of one role) from the keys table and FTS."""
        where = "item_rowid = ?" + (" AND role = ?" if role else "")
        params = (item_rowid, role) if role else (item_rowid,)
        keys = [r[0] for r in self.conn.execute(f"SELECT rowid FROM keys WHERE {where}", params)]
        self.conn.executemany("DELETE FROM keys_fts WHERE rowid = ?", [(k,) for k in keys])
        self.conn.executemany("DELETE FROM keys WHERE rowid = ?", [(k,) for k in keys])
        if keys:
            cube_id = self.conn.execute("SELECT cube_id FROM items WHERE rowid = ?",
                                        (item_rowid,)).fetchone()[0]
            self._changes.setdefault(cube_id, IndexChanges()).removed.extend(keys)
        return keys

    def compact_indexes(self) -> None:
        """Make this transaction's deletions physical in every index: merge FTS5 segments
        (secure-delete drops a deleted row's postings, but a term whose postings all went stays
        in its segment's term list until a merge rewrites it) and save the vector indexes at
        commit, so no file keeps a removed vector."""
        self.conn.execute("INSERT INTO keys_fts (keys_fts) VALUES ('optimize')")
        self._scrub = True

    def rebuild_vector_index(self, cube_id: int) -> None:
        """Rebuild a cube's vector index from the database when this transaction commits (its
        keys were all rewritten, perhaps by another model)."""
        self._rebuild.add(cube_id)

    def vector_candidates(self, qvec: np.ndarray, sel: Selection, limit: int) -> Ranked:
        """Best cosine similarity per selected item, best first, own keys (False) and context
        keys (True) apart."""
        with self.lock:
            return candidates(self.indexes, self, qvec, sel, limit)

    def item_by_id(self, item_id: str) -> tuple[int, Item] | None:
        row = self.conn.execute(_SELECT + " WHERE i.id = ?", (item_id,)).fetchone()
        return (row[0], _decode(row)) if row else None

    def items_by_rowid(self, rowids: Iterable[int]) -> dict[int, Item]:
        return {rowid: item for rowid, item in self._items_in("i.rowid", list(rowids))}

    def items_by_id(self, ids: Iterable[str]) -> dict[str, Item]:
        return {item.id: item for _, item in self._items_in("i.id", list(ids))}

    def _items_in(self, column: str, keys: list[Any]) -> Iterator[tuple[int, Item]]:
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            marks = ",".join("?" * len(part))
            for row in self.conn.execute(_SELECT + f" WHERE {column} IN ({marks})", part):
                yield row[0], _decode(row)

    def select_items(self, sel: Selection, *, order: Order = "rowid", limit: int | None = None,
                     offset: int = 0) -> list[tuple[int, Item]]:
        where, params = _where(sel)
        sql = _SELECT + f" WHERE {where} ORDER BY {_ORDER[order]}"
        if limit is not None:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        return [(row[0], _decode(row)) for row in self.conn.execute(sql, params)]

    def session_item(self, cube_id: int, scope: dict[str, str | None]) -> tuple[int, Item] | None:
        """The session item of a whole scope: cube, user, agent and session id (two users who
        pick the same session id have two sessions; `IS` matches a missing user or agent)."""
        row = self.conn.execute(
            _SELECT + " WHERE i.cube_id = ? AND i.session_id = ? AND i.user_id IS ? AND "
            "i.agent_id IS ? AND i.kind = 'session' AND i.status != 'deleted' "
            "ORDER BY i.rowid LIMIT 1",
            (cube_id, scope["session_id"], scope["user_id"], scope["agent_id"])).fetchone()
        return (row[0], _decode(row)) if row else None

    def derived_from(self, cube_id: int, item_ids: Sequence[str]) -> list[str]:
        """Ids of the live items of a cube whose source_ids name any of `item_ids`."""
        if not item_ids:
            return []
        wanted = json.dumps(list(item_ids))
        rows = self.conn.execute(
            "SELECT i.id FROM items i WHERE i.cube_id = ? AND i.source_ids != '[]' AND "
            "i.status != 'deleted' AND EXISTS (SELECT 1 FROM json_each(i.source_ids) s "
            "WHERE s.value IN (SELECT value FROM json_each(?)))", (cube_id, wanted))
        return [r[0] for r in rows]

    # repairs: data migrations that need more than SQL (schema.py, v6) ---------------------------
    def pending_repairs(self) -> list[str]:
        return [name for (name,) in self.conn.execute(
            "SELECT name FROM repairs WHERE state = 'pending' ORDER BY name")]

    def finish_repair(self, name: str, detail: dict[str, Any]) -> None:
        self.conn.execute("UPDATE repairs SET state = 'done', done_at = ?, detail = ? "
                          "WHERE name = ?", (time.time(), json.dumps(detail), name))

    def repairs(self) -> list[dict[str, Any]]:
        return [{"name": n, "state": s, "done_at": t, "detail": json.loads(d)}
                for n, s, t, d in self.conn.execute(
                    "SELECT name, state, done_at, detail FROM repairs ORDER BY name")]

    def mixed_sessions(self) -> list[tuple[int, Item]]:
        """Session items whose live turns belong to another user or agent (written before a
        session was its whole scope)."""
        rowids = [r for (r,) in self.conn.execute(
            "SELECT DISTINCT s.rowid FROM items s JOIN items t ON t.parent_id = s.id "
            "WHERE s.kind = 'session' AND t.kind = 'turn' AND t.status != 'deleted' AND "
            "(t.user_id IS NOT s.user_id OR t.agent_id IS NOT s.agent_id) ORDER BY s.rowid")]
        return sorted(self.items_by_rowid(rowids).items())

    def touch(self, uses: dict[str, tuple[int, float]]) -> None:
        """Record use: {item id: (times used, last time)}. Access statistics feed the tier
        scheduler."""
        if not uses:
            return
        with self.transaction():
            self.conn.executemany("UPDATE items SET access_count = access_count + ?, "
                                  "last_accessed = max(coalesce(last_accessed, 0), ?) "
                                  "WHERE id = ?", [(n, t, i) for i, (n, t) in uses.items()])

    # search keys ------------------------------------------------------------------------------
    def fts(self, terms: str, sel: Selection, limit: int) -> Ranked:
        """Best BM25 score per item for FTS5 `terms` among the selected items, separately for an
        item's own keys (False) and its context keys (True), best first. The scope column
        weighs nothing in BM25; it pre-selects the keys of the scope (scope_match)."""
        where, params = _where(sel)
        scope = scope_match(sel.cube_ids, sel.scope,
                            other_cubes=not sel.cube_ids or self.cube_count() > len(sel.cube_ids))
        match = f"text : ({terms})" + (f" AND {scope}" if scope else "")
        # materialise the matches first: joined directly, SQLite re-runs MATCH once per item
        sql = ("WITH m AS MATERIALIZED (SELECT rowid, bm25(keys_fts, 1.0, 0.0) AS rank "
               "FROM keys_fts WHERE keys_fts MATCH ?) "
               "SELECT k.item_rowid, k.role = 'context' AS ctx, min(m.rank) AS score FROM m "
               f"JOIN keys k ON k.rowid = m.rowid JOIN items i ON i.rowid = k.item_rowid "
               f"WHERE {where} GROUP BY k.item_rowid, ctx ORDER BY score LIMIT ?")
        try:
            rows = self.conn.execute(sql, (match, *params, 2 * limit)).fetchall()
        except self.db.OperationalError as exc:
            raise StoreError(f"full-text search failed: {exc}") from exc
        out: dict[bool, list[tuple[int, float]]] = {False: [], True: []}
        for rowid, ctx, score in rows:
            if len(out[bool(ctx)]) < limit:
                out[bool(ctx)].append((int(rowid), -float(score)))
        return out

    def item_fields(self, rowids: Sequence[int], name: ItemField) -> dict[int, Any]:
        """rowid -> one field of the items, for ranking: speaker, role, directive (the flag),
        session (the whole scope of the item's session, or None), observed_at (epoch seconds),
        resolved_dates (a list of {start, end})."""
        out: dict[int, Any] = {}
        rowids = list(rowids)
        for start in range(0, len(rowids), 500):
            part = rowids[start:start + 500]
            marks = ",".join("?" * len(part))
            out.update(self.conn.execute(f"SELECT rowid, {_FIELDS[name]} FROM items "
                                         f"WHERE rowid IN ({marks})", part).fetchall())
        if name == "session":
            return {r: tuple(json.loads(v)) if v else None for r, v in out.items()}
        if name == "resolved_dates":
            return {r: json.loads(v) if v else [] for r, v in out.items()}
        return out

    def allowed(self, rowids: Sequence[int], sel: Selection) -> set[int]:
        """The items among `rowids` that the selection sees."""
        where, params = _where(sel)
        out: set[int] = set()
        rowids = sorted(set(rowids))
        for start in range(0, len(rowids), 500):
            part = rowids[start:start + 500]
            marks = ", ".join("?" * len(part))
            out.update(r for (r,) in self.conn.execute(
                f"SELECT i.rowid FROM items i WHERE i.rowid IN ({marks}) AND {where}",
                (*part, *params)))
        return out

    def key_items(self, keys: Sequence[int]) -> dict[int, tuple[int, bool]]:
        """key -> (item rowid, is a context key)."""
        out: dict[int, tuple[int, bool]] = {}
        for start in range(0, len(keys), 500):
            part = list(keys[start:start + 500])
            marks = ",".join("?" * len(part))
            for key, item, ctx in self.conn.execute(
                    f"SELECT rowid, item_rowid, role = 'context' FROM keys WHERE rowid IN ({marks})",
                    part):
                out[key] = (item, bool(ctx))
        return out

    def scoped_keys(self, sel: Selection) -> set[int]:
        where, params = _where(sel)
        rows = self.conn.execute("SELECT k.rowid FROM keys k JOIN items i ON i.rowid = k.item_rowid "
                                 f"WHERE k.vec IS NOT NULL AND {where}", params)
        return {r[0] for r in rows}

    def scoped_vectors(self, sel: Selection, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(keys, vectors) of the selected items' keys, or None when there are more than `limit`."""
        where, params = _where(sel)
        rows = self.conn.execute("SELECT k.rowid, k.vec FROM keys k JOIN items i ON "
                                 f"i.rowid = k.item_rowid WHERE k.vec IS NOT NULL AND {where} "
                                 f"LIMIT {int(limit) + 1}", params).fetchall()
        if len(rows) > limit:
            return None
        keys = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return keys, np.zeros((0, 0), np.float32)
        buffer = bytearray(b"".join(r[1] for r in rows))  # writable, so torch can wrap it
        return keys, np.frombuffer(buffer, dtype=np.float32).reshape(len(rows), -1)

    def live_keys(self, cube_id: int) -> set[int]:
        rows = self.conn.execute("SELECT k.rowid FROM keys k JOIN items i ON i.rowid = k.item_rowid"
                                 " WHERE i.cube_id = ? AND k.vec IS NOT NULL", (cube_id,))
        return {r[0] for r in rows}

    def vectors(self, cube_id: int, keys: list[int] | None, batch: int = 4096
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if keys is None:
            keys = sorted(self.live_keys(cube_id))
        for start in range(0, len(keys), batch):
            part = keys[start:start + batch]
            marks = ",".join("?" * len(part))
            rows = self.conn.execute(f"SELECT rowid, vec FROM keys WHERE rowid IN ({marks})",
                                     part).fetchall()
            ids = np.asarray([r[0] for r in rows], dtype=np.int64)
            vecs = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]) if rows else \
                np.zeros((0, 0), np.float32)
            yield ids, vecs

    # versions and audit -----------------------------------------------------------------------
    def add_version(self, item_rowid: int, item: Item, reason: str, actor: str,
                    source_ids: Sequence[str] = ()) -> None:
        """Record an item as it is now; `source_ids` are the items (turns) that caused it."""
        self.conn.execute(
            "INSERT INTO versions (item_rowid, version, content, metadata, status, valid_from, "
            "valid_to, changed_at, reason, actor, superseded_by, source_ids) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (item_rowid, item.version, item.content, json.dumps(item.metadata), item.status,
             _epoch(item.valid_from), _epoch(item.valid_to), time.time(), reason, actor,
             item.superseded_by, json.dumps(list(source_ids or item.source_ids))))

    def purge_versions(self, item_rowid: int) -> None:
        self.conn.execute("UPDATE versions SET content = NULL, metadata = '{}' "
                          "WHERE item_rowid = ?", (item_rowid,))

    def versions(self, item_rowid: int, item_id: str) -> list[Version]:
        rows = self.conn.execute(
            "SELECT version, content, metadata, status, valid_from, valid_to, changed_at, reason, "
            "actor, superseded_by, source_ids FROM versions WHERE item_rowid = ? "
            "ORDER BY version, changed_at", (item_rowid,))
        return [Version(item_id, r[0], r[1], json.loads(r[2]), r[3], from_epoch(r[4]),
                        from_epoch(r[5]), from_epoch(r[6]), r[7], r[8], r[9], json.loads(r[10]))
                for r in rows]

    def audit(self, actor: str, action: str, cube: str | None, item_ids: Sequence[str],
              detail: dict[str, Any] | None = None) -> None:
        self.conn.execute("INSERT INTO audit (at, actor, action, cube, item_ids, detail) "
                          "VALUES (?, ?, ?, ?, ?, ?)",
                          (time.time(), actor, action, cube, json.dumps(list(item_ids)),
                           json.dumps(detail or {})))

    def audit_log(self, limit: int = 100, since_seq: int = 0) -> list[AuditEntry]:
        rows = self.conn.execute("SELECT seq, at, actor, action, cube, item_ids, detail FROM audit "
                                 "WHERE seq > ? ORDER BY seq LIMIT ?", (since_seq, limit))
        return [AuditEntry(r[0], from_epoch(r[1]), r[2], r[3], r[4], json.loads(r[5]),
                           json.loads(r[6])) for r in rows]

    def stats(self) -> dict[str, Any]:
        kinds = dict(self.conn.execute(
            "SELECT kind || ':' || status, count(*) FROM items GROUP BY kind, status").fetchall())
        return {"path": str(self.path), "schema_version": SCHEMA_VERSION,
                "items": kinds, "keys": self.conn.execute("SELECT count(*) FROM keys").fetchone()[0],
                "audit_entries": self.conn.execute("SELECT count(*) FROM audit").fetchone()[0],
                "size_bytes": sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*")
                                  if p.is_file())}


def _token(prefix: str, value: str) -> str:
    return prefix + hashlib.sha1(value.encode("utf-8")).hexdigest()[:16]


def scope_tokens(cube_id: int, user_id: str | None, agent_id: str | None,
                 session_id: str | None) -> list[str]:
    """FTS tokens naming a key's scope (hashed, so any id is a plain token)."""
    tokens = [f"cube{cube_id}"]
    for prefix, value in (("u", user_id), ("a", agent_id), ("s", session_id)):
        if value is not None:
            tokens.append(_token(prefix, value))
    return tokens


def scope_match(cube_ids: Sequence[int], scope: dict[str, str | None], *,
                other_cubes: bool) -> str | None:
    """An FTS5 expression that pre-selects keys of this scope, or None when none helps.

    It only speeds the search up: `where` on the items decides. So it names the most selective
    tokens: the user, agent or session when given (a cube's token alone costs 40 ms per search at
    a million keys, measured), else the cubes, and those only if the store holds other cubes.
    """
    parts = [f'scope : "{_token(prefix, scope[name])}"'
             for prefix, name in (("u", "user_id"), ("a", "agent_id"), ("s", "session_id"))
             if scope.get(name) is not None]
    if not parts and other_cubes:
        parts.append("scope : (" + " OR ".join(f'"cube{c}"' for c in cube_ids) + ")")
    return " AND ".join(parts) or None


def _split(script: str) -> list[str]:
    """Statements of a migration script (triggers contain ';' inside BEGIN ... END)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        if line.startswith("--"):
            continue
        buf.append(line)
        joined = "\n".join(buf).strip()
        if joined.endswith(";") and (not joined.upper().startswith("CREATE TRIGGER")
                                     or joined.upper().endswith("END;")):
            out.append(joined)
            buf = []
    return out


def _epoch(value) -> float | None:
    return value.timestamp() if value is not None else None


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in fields.items():
        if name in _JSON_COLUMNS:
            value = json.dumps(value)
        elif name in _TIME_COLUMNS:
            value = _epoch(value)
        out[name] = value
    return out


def _decode(row: Sequence[Any]) -> Item:
    values = dict(zip(ITEM_COLUMNS, row[2:]))
    for name in _JSON_COLUMNS:
        values[name] = json.loads(values[name])
    for name in _TIME_COLUMNS:
        values[name] = from_epoch(values[name])
    return Item(cube=row[1], **values)
