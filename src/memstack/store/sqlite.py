"""The embedded store: one SQLite file in WAL mode, FTS5 (BM25) over search keys, vectors as blobs.

Every public write happens inside `transaction()`; one add() is one transaction. Deletion purges
content from the items row, its versions, the FTS index (secure-delete) and the vector blobs, with
`secure_delete` on so freed pages are zeroed, and a WAL checkpoint afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np

from .._errors import (MissingExtraError, SchemaVersionError, StoreCorruptError,
                       StoreError)
from .access import AccessRows
from .counts import CountRows
from .rows import ItemRows
from .base import ANCHOR, KeyGroup, Ranked, Rows
from .kvblocks import KVBlockRows
from .locks import LockRows
from .shards import ShardRows
from .schema import MIGRATIONS, SCHEMA_VERSION
from .selection import Selection
from .sqlite_vectors import CubeIndexes, IndexChanges, candidates

_ADD_COLUMN = re.compile(r"\s*ALTER TABLE (\w+) ADD COLUMN (\w+)", re.IGNORECASE)


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


class SQLiteStore(ItemRows, AccessRows, CountRows, KVBlockRows, ShardRows, LockRows):
    """The source of truth. Thread-safe: one connection guarded by a re-entrant lock
    (LockedConnection); transactions hold the lock from BEGIN to COMMIT."""

    dialect = "sqlite"
    now_sql = "unixepoch('subsec')"  # leases (store/locks.py)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)
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
                    if not self._column_exists(statement):
                        self.conn.execute(statement)
                if "writable_schema" in MIGRATIONS[version]:  # this connection reloads it
                    bumped = self.conn.execute("PRAGMA schema_version").fetchone()[0] + 1
                    self.conn.execute(f"PRAGMA schema_version = {bumped}")
                version += 1
                self.conn.execute(f"PRAGMA user_version = {version}")

    def _column_exists(self, statement: str) -> bool:
        """An ADD COLUMN whose column is there (SQLite has no IF NOT EXISTS for it): a store
        whose version was set back runs its migrations again."""
        found = _ADD_COLUMN.match(statement)
        return bool(found) and any(row[1] == found[2] for row in self.conn.execute(
            f"PRAGMA table_info({found[1]})"))

    def close(self) -> None:
        """Save the vector indexes, checkpoint the WAL and close. A write that another thread
        has begun (a request past a server's shutdown timeout) commits first."""
        self.indexes.saver.stop()  # before the lock: the saver's thread takes it
        with self.lock:
            self.indexes.close()
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

    def session(self) -> ContextManager[None]:
        """Nothing to hold: one connection serves every statement."""
        return contextlib.nullcontext()

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

    @contextlib.contextmanager
    def restricted(self, cube_ids: Iterable[int]) -> Iterator[None]:
        """No second wall in one file: the access checks are the wall (PostgresStore adds
        row-level security)."""
        yield

    def wall(self, cube_ids: Iterable[int] | None) -> None:
        """See restricted(): nothing to do in one file."""

    def widen(self, cube_id: int) -> None:
        """See restricted(): nothing to do in one file."""

    @staticmethod
    def _vector(value: Any) -> np.ndarray:
        return np.frombuffer(value, dtype=np.float32).copy()

    def sync_sequences(self) -> None:
        """Nothing to do: AUTOINCREMENT follows explicit rowids."""

    def scrub(self) -> dict[str, Any]:
        """Deleted text is already gone from the file (secure_delete zeroes freed pages, FTS5
        secure-delete, the index saved at the purge); this truncates the WAL that logged it."""
        self.checkpoint()
        return {"ran": ["PRAGMA wal_checkpoint(TRUNCATE)"], "complete": True}

    def checkpoint(self) -> None:
        with self.lock:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def copy_to(self, target: Path) -> None:
        """Copy the database into the new file `target` while it is in use (SQLite's online
        backup API, on a read connection of its own): the copy holds exactly what was
        committed when it began; writers go on meanwhile (WAL)."""
        source = _driver().connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        copy = _driver().connect(str(target))
        try:
            source.backup(copy)
        except self.db.Error as exc:
            raise StoreError(f"cannot copy {self.path} to {target}: {exc}") from exc
        finally:
            copy.close()
            source.close()

    def snapshot(self) -> ContextManager[None]:
        """Nothing here: the store's one connection serves this process's writers too, so a
        read transaction would hold them off. A cube export reads page by page (a backup uses
        copy_to, which is one moment)."""
        return contextlib.nullcontext()

    def integrity(self) -> dict[str, Any]:
        """SQLite's own checks of the file and of the full-text index, the consistency counts,
        and each cube's vector index against the vectors in the database."""
        with self.lock:
            pages = [r[0] for r in self.conn.execute("PRAGMA integrity_check")]
            try:
                self.conn.execute("INSERT INTO keys_fts (keys_fts) VALUES ('integrity-check')")
                fts = "ok"
            except self.db.Error as exc:
                fts = str(exc)
            vectors = {}
            for (cube_id,) in self.conn.execute("SELECT id FROM cubes ORDER BY id").fetchall():
                live, index = self.live_keys(cube_id), self.indexes.get(cube_id)
                vectors[cube_id] = {"keys": len(live), "indexed": len(index),
                                    "match": index.keys == live}
            return {"database": "ok" if pages == ["ok"] else "; ".join(pages[:5]),
                    "full_text": fts, **self.consistency(), "vector_index": vectors}

    # cubes -----------------------------------------------------------------------------------
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

    # items -----------------------------------------------------------------------------------
    def insert_keys(self, groups: Sequence[KeyGroup]) -> list[int]:
        """Insert items' keys; a group whose vectors are None is text-only (FTS, no vector)."""
        return [key for group in groups for key in self._insert_group(*group)]

    def _insert_group(self, item_rowid: int, texts: Sequence[str], roles: Sequence[str],
                      vectors: np.ndarray | None) -> list[int]:
        keys = []
        row = self.conn.execute("SELECT cube_id, user_id, agent_id, session_id FROM items "
                                "WHERE rowid = ?", (item_rowid,)).fetchone()
        scope = " ".join(scope_tokens(*row))
        for n, (text, role) in enumerate(zip(texts, roles)):
            blob = None if vectors is None else np.asarray(vectors[n], np.float32).tobytes()
            cur = self.conn.execute("INSERT INTO keys (item_rowid, role, vec) VALUES (?, ?, ?)",
                                    (item_rowid, role, blob))
            keys.append(int(cur.lastrowid))
            if role != ANCHOR:  # an anchor is a vector only: no words in anyone's BM25
                self.conn.execute("INSERT INTO keys_fts (rowid, text, scope) VALUES (?, ?, ?)",
                                  (cur.lastrowid, text, scope))
        if vectors is not None and keys:
            self._changes.setdefault(row[0], IndexChanges()).added.append(
                (np.asarray(keys, dtype=np.int64), np.asarray(vectors[:len(keys)], np.float32)))
        return keys

    def delete_keys(self, item_rowids: Sequence[int], role: str | None = None) -> list[int]:
        """Delete items' keys (or only those of one role) from the keys table and FTS."""
        return [key for rowid in item_rowids for key in self._delete_of(rowid, role)]

    def _delete_of(self, item_rowid: int, role: str | None) -> list[int]:
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
    # search keys ------------------------------------------------------------------------------
    def fts(self, words: Sequence[str], sel: Selection, limit: int) -> Ranked:
        """Best BM25 score per item for any of `words` among the selected items, separately for
        an item's own keys (False) and its context keys (True), best first. The scope column
        weighs nothing in BM25; it pre-selects the keys of the scope (scope_match)."""
        if not words:
            return {False: [], True: []}
        # every word quoted, so user text is never FTS5 syntax
        terms = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        where, params = self.where(sel)
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

    def scoped_keys(self, sel: Selection) -> set[int]:
        where, params = self.where(sel)
        rows = self.conn.execute("SELECT k.rowid FROM keys k JOIN items i ON i.rowid = k.item_rowid "
                                 f"WHERE k.vec IS NOT NULL AND {where}", params)
        return {r[0] for r in rows}

    def scoped_vectors(self, sel: Selection, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(keys, vectors) of the selected items' keys, or None when there are more than `limit`."""
        where, params = self.where(sel)
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
