"""The PostgreSQL store: psycopg 3 with a connection pool, pgvector for vectors, BM25 in SQL.

The same contract as SQLiteStore (store/base.py) and the same shared rows (store/rows.py).
Several processes can use one database: vectors live in the database (an HNSW index per
dimension), so a write is visible to every process's next search; there is no index file.

Full text: each key's `tsvector` (the `memstack` configuration: English Snowball stemming, no
stopwords) and its length in tokens; a search scores candidates with BM25 (k1 1.2, b 0.75, the
idf of FTS5) from term statistics over all keys, as FTS5's bm25() does, so rankings match the
SQLite store's (ts_rank_cd, measured, does not: docs/scaling.md). The database keeps those
statistics itself (triggers on keys fill term_stats and key_stats per cube).

Deleting: rows, versions' text, keys, their tsvectors and vectors leave every query in the
transaction; what MVCC leaves on disk (dead tuples, the WAL that logged the text) is removed by
`scrub()` (memstack scrub), measured byte by byte in tests/test_postgres.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import re
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .._errors import (MissingExtraError, ReadOnlyStoreError, SchemaVersionError,
                       StoreCorruptError, StoreError, StoreUnavailableError)
from .access import AccessRows
from .base import ANCHOR, KeyGroup, Ranked, Rows
from .counts import CountRows
from .kvblocks import KVBlockRows
from .locks import LockRows
from .pg_schema import MIGRATIONS, SCHEMA_VERSION, vector_index
from .rows import ItemRows
from .selection import Selection
from .shards import ShardRows

K1, B = 1.2, 0.75  # FTS5's bm25() defaults
# BM25's terms and statistics, as FTS5's bm25() has them: the query's lexemes; over every cube
# (FTS5's statistics are global) the keys' count and mean length; each lexeme's idf,
# log((N - n + 0.5) / (n + 0.5)) and at least 1e-6, from term_stats and key_stats (kept by the
# database as keys come and go, pg_schema.py version 3), each term's count one indexed read.
# `weights` is one row of arrays (lexemes, idf) and the query: a key's score looks its own
# lexemes up in them, no join per key. MATERIALIZED: computed once per query.
_BM25_TERMS = (
    "terms AS MATERIALIZED (SELECT lexeme, (SELECT coalesce(sum(t.keys), 0) FROM term_stats t "
    "  WHERE t.lexeme = q.lexeme)::float8 AS n FROM (SELECT DISTINCT lexeme FROM "
    "  unnest(to_tsvector('memstack', ?))) q), "
    "totals AS MATERIALIZED (SELECT coalesce(sum(keys), 0)::float8 AS n, greatest(1e-9, "
    "  coalesce(sum(length), 0)::float8 / greatest(coalesce(sum(keys), 0), 1)) AS mean "
    "  FROM key_stats), "
    "weights AS MATERIALIZED (SELECT array_agg(lexeme) AS lexemes, array_agg(CASE WHEN r > 0 "
    "  THEN greatest(1e-6, ln(r)) ELSE 1e-6 END) AS idf, (SELECT mean FROM totals) AS mean, "
    "  string_agg(quote_literal(lexeme), ' | ')::tsquery AS query FROM (SELECT lexeme, "
    "  ((SELECT n FROM totals) - n + 0.5) / (n + 0.5) AS r FROM terms) r)")
EXACT_LIMIT = 20_000  # as the SQLite store: fewer keys in scope are compared one by one
_TOKEN = re.compile(r"\w+", re.UNICODE)  # as FTS5's unicode61 tokenizer counts them
_MIGRATION_LOCK = 7_305_146_114  # pg_advisory_xact_lock key: one migrating process at a time
_AUDIT_LOCK = 7_305_146_115  # one transaction at a time appends to the audit chain
log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@functools.lru_cache(maxsize=1024)
def _pg(sql: str) -> str:
    """`?` parameters (the shared rows' style) as psycopg's `%s`."""
    return sql.replace("%", "%%").replace("?", "%s")


# which cubes this context's statements may see (row-level security, pg_schema.py): "*" for the
# library's own use; the server narrows it to the caller's cubes for each request
_VISIBLE: contextvars.ContextVar[str] = contextvars.ContextVar("memstack_cubes", default="*")


class PgConnection:
    """The `execute` the shared rows use, over a pool: inside `transaction()` every statement
    of the thread runs on the transaction's connection; outside, each borrows one. Before a
    connection runs a statement it carries the context's visible cubes (memstack.cubes) and,
    when the login is a superuser (whom row-level security does not bind), the role
    memstack_app."""

    def __init__(self, pool: Any, errors: Any,
                 used: weakref.WeakKeyDictionary[Any, float] | None = None) -> None:
        from psycopg_pool import PoolTimeout

        self.pool, self._errors = pool, errors
        self._used = weakref.WeakKeyDictionary() if used is None else used  # see _check()
        self._unreachable = (errors.OperationalError, PoolTimeout)
        self._local = threading.local()
        self._state: weakref.WeakKeyDictionary[Any, dict[str, str]] = \
            weakref.WeakKeyDictionary()

    @property
    def in_transaction(self) -> bool:
        return getattr(self._local, "transaction", False)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        with self._connection() as conn:
            cursor = self._run(conn, lambda c: c.execute(_pg(sql), params))
            return Rows(cursor.fetchall() if cursor.description else [], None)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], *, returning: bool = False
                    ) -> list[Any]:
        """One statement per row, sent together (libpq's pipeline: one round trip, not one per
        row); with `returning`, the first column each statement returned, in order."""
        rows = list(rows)
        if not rows:
            return []
        with self._connection() as conn:
            return self._run(conn, lambda c: _many(c.cursor(), _pg(sql), rows, returning))

    def _run(self, conn: Any, call: Callable[[Any], Any]) -> Any:
        try:
            result = call(conn)
            self._used[conn] = time.monotonic()
            return result
        except self._errors.Error as exc:  # everything the driver raises: one error tree
            if conn.closed or conn.broken:  # the pool replaces it; the next call reconnects
                raise StoreUnavailableError(f"lost the database connection: {exc}") from exc
            raise StoreError(f"the database failed a statement: {exc}") from exc

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        pinned = getattr(self._local, "conn", None)
        if pinned is not None:
            self._enter(pinned)  # the wall may have widened since the block began
            yield pinned
            return
        with self._borrowed() as conn:
            self._enter(conn)
            yield conn

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        """Every statement of this thread in the block on one connection, borrowed (and checked
        alive) once, each statement committed as it runs: a read of several statements costs
        one borrow, not one each. Nests; a transaction inside uses the same connection."""
        pinned = getattr(self._local, "conn", None)
        if pinned is not None:
            yield pinned
            return
        with self._borrowed() as conn:
            self._local.conn = conn
            try:
                yield conn
            finally:
                self._local.conn = None

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[Any]:
        """A connection from the pool (checked alive first); the database unreachable now, or a
        commit cut off, is a StoreUnavailableError."""
        try:
            with self.pool.connection(timeout=10.0) as conn:
                yield conn
        except self._unreachable as exc:
            raise StoreUnavailableError(f"cannot reach the database: {exc}") from exc

    def _enter(self, conn: Any) -> None:
        want = _VISIBLE.get()
        state = self._state.get(conn)
        if state is not None and state.get("memstack.cubes") == want:
            return
        if state is None and conn.execute(
                "SELECT rolsuper AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = "
                "'memstack_app') FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
            conn.execute("SET ROLE memstack_app")
        conn.execute("SELECT set_config('memstack.cubes', %s, false)", (want,))
        self._state.setdefault(conn, {})["memstack.cubes"] = want

    def setting(self, name: str, value: str) -> None:
        """Set a run-time parameter of the connection this thread holds (in session() or
        transaction()), unless it has that value already: no round trip per query."""
        conn = self._local.conn
        state = self._state.setdefault(conn, {})
        if state.get(name) != value:
            self._run(conn, lambda c: c.execute(
                "SELECT set_config(%s, %s, false)", (name, value)))
            state[name] = value

    def forget(self, conn: Any) -> None:
        """The connection's settings are unknown (a rollback undid them, or RESET ROLE)."""
        self._state.pop(conn, None)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        if self.in_transaction:
            raise StoreError("transactions do not nest")
        with self.session() as conn:
            self._local.transaction = True
            try:
                with conn.transaction():
                    self._enter(conn)
                    yield conn
            except BaseException:
                self.forget(conn)
                raise
            finally:
                self._local.transaction = False


class Statistics:
    """Keeps the planner's statistics of keys and items current while a store fills: after
    this process has written `share` of the keys counted at the last ANALYZE (and at least
    `least`), it runs one in a thread of its own. Autovacuum looks once a minute; a store that
    doubles within it is planned as the small one it was (see memstack_analyze in
    pg_schema.py)."""

    def __init__(self, conn: PgConnection, least: int = 1000, share: float = 0.2) -> None:
        self.conn, self.least, self.share = conn, least, share
        self.runs, self._grown, self._keys = 0, 0, 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def grew(self, keys: int) -> None:
        with self._lock:
            self._grown += keys
            busy = self._thread is not None and self._thread.is_alive()
            if busy or self._grown < max(self.least, self.share * self._keys):
                return
            self._grown = 0
            self._thread = threading.Thread(target=self._analyze, name="memstack-analyze",
                                            daemon=True)
            self._thread.start()

    def _analyze(self) -> None:
        try:
            self._keys = int(self.conn.execute("SELECT memstack_analyze()").fetchone()[0])
            self.runs += 1
        except StoreError as exc:  # the next write tries again; searches still work
            log.warning("could not refresh the planner's statistics: %s", exc)

    def wait(self, timeout: float = 30.0) -> None:
        """Let a running ANALYZE finish (before the pool closes under it)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


class PostgresStore(ItemRows, AccessRows, CountRows, KVBlockRows, ShardRows, LockRows):
    """A memstack store in a PostgreSQL database with pgvector. `files` is the folder for
    what lives beside the database (KV block and shard files of the tiers)."""

    dialect = "postgres"
    now_sql = "extract(epoch from clock_timestamp())::float8"  # leases, on the database's clock

    def __init__(self, url: str, *, files: str | Path | None = None, pool_size: int = 8,
                 read_only: bool = False) -> None:
        psycopg, pool_module, register_vector = _driver()
        self.url, self.location, self.read_only = url, redact(url), read_only
        self.path = Path(files) if files is not None else Path("memstack-files") / "store"
        self._after: dict[int, list[Callable[[], None]]] = {}
        self._counts: dict[tuple[int, ...], tuple[float, int]] = {}  # cubes -> (when, keys)
        used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._pool = pool_module.ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, name="memstack",
            check=functools.partial(_check, used, pool_module.ConnectionPool.check_connection),
            kwargs={"autocommit": True}, configure=functools.partial(_configure, register_vector))
        try:
            self._pool.open(wait=True, timeout=10.0)
            self.conn = PgConnection(self._pool, psycopg, used)
            self.statistics = Statistics(self.conn)
            self._check_schema() if read_only else self._migrate(psycopg)
        except (pool_module.PoolTimeout, psycopg.OperationalError) as exc:
            self._pool.close()
            raise StoreError(f"cannot connect to the database at {self.location}: "
                             f"{_reason(exc, url)}") from None
        except BaseException:  # a schema it cannot use: no pool left running
            self._pool.close()
            raise

    # lifecycle --------------------------------------------------------------------------------
    def _migrate(self, psycopg: Any) -> None:
        with self._pool.connection() as conn, conn.transaction():
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                raise ReadOnlyStoreError(f"{self.location} is a read replica: open it with "
                                         "read_only=True, and write through the primary")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            version = self._version(conn)
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.location} has memstack schema version {version}, newer than this "
                    f"memstack understands ({SCHEMA_VERSION}). Upgrade: pip install -U memstack")
            while version < SCHEMA_VERSION:
                conn.execute(MIGRATIONS[version])
                version += 1
                conn.execute("UPDATE memstack_schema SET version = %s", (version,))

    def _check_schema(self) -> None:
        """A read-only store (a replica) only reads the schema's version: it must be this
        code's (the primary creates and migrates it)."""
        with self._pool.connection() as conn:
            found = conn.execute("SELECT to_regclass('memstack_schema') IS NOT NULL").fetchone()[0]
            version = conn.execute("SELECT version FROM memstack_schema").fetchone()[0] \
                if found else None
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.location} has memstack schema version {version}, this memstack needs "
                f"{SCHEMA_VERSION}; a read-only store does not migrate: open the primary with "
                "this version first (or run the version that matches)")

    def _version(self, conn: Any) -> int:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = "
            "current_schema()").fetchall()}
        if "memstack_schema" in tables:
            return conn.execute("SELECT version FROM memstack_schema").fetchone()[0]
        if "items" in tables or "cubes" in tables:
            raise StoreCorruptError(f"{self.location} has tables but is not a memstack "
                                    "database; use another database or schema")
        conn.execute("CREATE TABLE memstack_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO memstack_schema VALUES (0)")
        return 0

    def close(self) -> None:
        self.statistics.wait()
        self._pool.close()

    @contextlib.contextmanager
    def restricted(self, cube_ids: Iterable[int]) -> Iterator[None]:
        """Within this block (this thread or task) the database shows only these cubes' rows,
        whatever a query asks: row-level security, a wall behind the access checks."""
        token = _VISIBLE.set(_visible(cube_ids))
        try:
            yield
        finally:
            _VISIBLE.reset(token)

    def wall(self, cube_ids: Iterable[int] | None) -> None:
        """From now on in this context (a request), only these cubes' rows (None: all)."""
        _VISIBLE.set("*" if cube_ids is None else _visible(cube_ids))

    def widen(self, cube_id: int) -> None:
        """Add a cube to this context's wall (one the caller just created)."""
        current = _VISIBLE.get()
        if current != "*" and str(int(cube_id)) not in current.split(","):
            _VISIBLE.set(_visible([*filter(None, current.split(",")), cube_id]))

    def flush(self) -> None:
        """Nothing to save: every index lives in the database."""

    def session(self) -> ContextManager[Any]:
        """The statements of this thread in the block share one pooled connection."""
        return self.conn.session()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self.read_only:
            raise ReadOnlyStoreError(f"{self.location} was opened read-only (a replica): "
                                     "write through the primary's URL")
        key = threading.get_ident()
        self._after[key] = []
        try:
            with self.conn.transaction():
                yield
        except BaseException:
            self._after.pop(key, None)
            raise
        for action in self._after.pop(key, []):
            action()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads of this thread in the block see one moment of the database (a repeatable-read,
        read-only transaction on one connection), whatever other writers commit meanwhile."""
        with self.conn.session() as conn:
            self.conn.execute("SELECT 1")  # the connection's wall, before the transaction
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield

    def integrity(self) -> dict[str, Any]:
        """The consistency counts (pages and indexes are PostgreSQL's to check: data checksums,
        amcheck), and keys whose vector has another dimension than their cube's."""
        with self.snapshot():
            out: dict[str, Any] = {"database": "ok", **self.consistency()}
            out["vectors_of_another_dimension"] = self.conn.execute(
                "SELECT count(*) FROM keys k JOIN cubes c ON c.id = k.cube_id WHERE k.vec IS "
                "NOT NULL AND vector_dims(k.vec) <> c.embed_dim").fetchone()[0]
        return out

    def _audit_turn(self) -> None:
        # the chain's tail is read and extended by one transaction at a time, across
        # processes: held until commit, so entries chain in the order they become visible
        self.conn.execute("SELECT pg_advisory_xact_lock(?)", (_AUDIT_LOCK,))

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run `action` once the current transaction commits (never if it rolls back)."""
        pending = self._after.get(threading.get_ident())
        if pending is None or not self.conn.in_transaction:
            action()
        else:
            pending.append(action)

    def checkpoint(self) -> None:
        """Nothing to do after each purge: autovacuum reclaims dead tuples in its time, and
        `scrub()` removes their bytes when it must be now."""

    def scrub(self) -> dict[str, Any]:
        """Remove from the data directory what MVCC keeps of deleted text and vectors: rewrite
        the tables that held them (VACUUM FULL: dead tuples and their index entries are not
        copied), then switch WAL segments and CHECKPOINT twice, so the segments that logged
        the text are no longer needed. With the server's `wal_recycle = off` they are deleted
        (recycled segments would keep their old bytes until overwritten). Takes an exclusive
        lock on each table while it is rewritten; needs superuser or the pg_checkpoint role
        and EXECUTE on pg_switch_wal. Returns what ran."""
        ran = []
        with self._pool.connection() as conn:
            conn.execute("RESET ROLE")  # VACUUM FULL needs the tables' owner
            self.conn.forget(conn)
            for table in ("keys", "versions", "items", "term_stats"):
                conn.execute(f"VACUUM FULL {table}")
                ran.append(f"VACUUM FULL {table}")
            for _ in range(2):
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("CHECKPOINT")
                ran += ["SELECT pg_switch_wal()", "CHECKPOINT"]
            recycle = conn.execute("SHOW wal_recycle").fetchone()[0]
        return {"ran": ran, "wal_recycle": recycle,
                "complete": recycle == "off"}

    # cubes ------------------------------------------------------------------------------------
    def create_cube(self, name: str, owner: str | None, embed_model: str, dim: int) -> Any:
        self.conn.execute(vector_index(dim))
        return super().create_cube(name, owner, embed_model, dim)

    def set_cube_model(self, cube_id: int, model: str, dim: int) -> None:
        self.conn.execute(vector_index(dim))
        super().set_cube_model(cube_id, model, dim)

    def bump_generation(self, cube_id: int) -> int:
        return self.conn.execute("UPDATE cubes SET generation = generation + 1 WHERE id = ? "
                                 "RETURNING generation", (cube_id,)).fetchone()[0]

    # keys -------------------------------------------------------------------------------------
    def returning(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[Any]:
        return self.conn.executemany(sql, rows, returning=True)

    def insert_keys(self, groups: Sequence[KeyGroup]) -> list[int]:
        """Insert items' keys; a group whose vectors are None is text-only (full text only)."""
        rows = [(rowid, role, text, 0 if role == ANCHOR else len(_TOKEN.findall(text)),
                 None if vectors is None else np.asarray(vectors[n], np.float32))
                for rowid, texts, roles, vectors in groups
                for n, (text, role) in enumerate(zip(texts, roles))]
        if not rows:
            return []
        # one statement for all of them: the statistics trigger runs once, not once a key
        rowids, roles, texts, lengths, vectors = (list(column) for column in zip(*rows))
        self.after_commit(functools.partial(self.statistics.grew, len(rows)))
        return [r[0] for r in self.conn.execute(
            "INSERT INTO keys (cube_id, item_rowid, role, tsv, length, vec) "
            "SELECT i.cube_id, k.item_rowid, k.role, CASE WHEN k.role = 'anchor' THEN "
            "''::tsvector ELSE to_tsvector('memstack', k.text) END, k.length, "
            "k.vec FROM unnest(?::bigint[], ?::text[], ?::text[], ?::integer[], ?::vector[]) "
            "WITH ORDINALITY AS k(item_rowid, role, text, length, vec, n) "
            "JOIN items i ON i.rowid = k.item_rowid ORDER BY k.n RETURNING rowid",
            (rowids, roles, texts, lengths, vectors))]

    def touch(self, uses: dict[str, tuple[int, float]]) -> None:
        """Record use, {item id: (times used, last time)}, in one statement."""
        if not uses:
            return
        ids = list(uses)
        with self.transaction():
            self.conn.execute(
                "UPDATE items i SET access_count = i.access_count + u.n, last_accessed = CASE "
                "WHEN i.last_accessed > u.t THEN i.last_accessed ELSE u.t END FROM "
                "unnest(?::text[], ?::bigint[], ?::float8[]) AS u(id, n, t) WHERE i.id = u.id",
                (ids, [uses[i][0] for i in ids], [uses[i][1] for i in ids]))

    def delete_keys(self, item_rowids: Sequence[int], role: str | None = None) -> list[int]:
        if not item_rowids:
            return []
        where = "item_rowid = ANY(?)" + (" AND role = ?" if role else "")
        params = (list(item_rowids), role) if role else (list(item_rowids),)
        rows = self.conn.execute(f"DELETE FROM keys WHERE {where} RETURNING rowid", params)
        return [r[0] for r in rows]

    def compact_indexes(self) -> None:
        """The deleted keys left the GIN and HNSW indexes with their rows (the indexes skip
        dead tuples); their bytes go at the next VACUUM, or now with scrub()."""

    def rebuild_vector_index(self, cube_id: int) -> None:
        """Nothing to rebuild: the HNSW index follows the table (set_cube_model made sure
        the new dimension has one)."""

    def derived_from(self, cube_id: int, item_ids: Sequence[str]) -> list[str]:
        """Ids of the live items of a cube whose source_ids name any of `item_ids`."""
        if not item_ids:
            return []
        rows = self.conn.execute(
            "SELECT i.id FROM items i WHERE i.cube_id = ? AND i.source_ids != '[]' AND "
            "i.status != 'deleted' AND EXISTS (SELECT 1 FROM "
            "jsonb_array_elements_text(i.source_ids::jsonb) s(v) WHERE s.v = ANY(?))",
            (cube_id, list(item_ids)))
        return [r[0] for r in rows]

    # candidates -------------------------------------------------------------------------------
    def fts(self, words: Sequence[str], sel: Selection, limit: int) -> Ranked:
        """Best BM25 score per selected item for any of `words`, own keys (False) and context
        keys (True) apart, best first. One statement: the words' lexemes, their statistics
        and the scores (three round trips cost more than the scoring under load)."""
        if not words:
            return {False: [], True: []}
        where, params = self.where(sel)
        cubes, cube_ids = _key_cubes(sel)
        rows = self.conn.execute(
            f"WITH {_BM25_TERMS} SELECT k.item_rowid, k.role = 'context' AS ctx, max((SELECT "
            "  sum(w.idf[array_position(w.lexemes, t.lexeme)] * (array_length(t.positions, 1) "
            "  * ?) / (array_length(t.positions, 1) + ? * (1 - ? + ? * k.length / w.mean))) "
            "  FROM unnest(k.tsv) t WHERE t.lexeme = ANY(w.lexemes))) AS score "
            "FROM weights w, keys k JOIN items i ON i.rowid = k.item_rowid "
            f"WHERE k.tsv @@ w.query AND {cubes} AND {where} GROUP BY k.item_rowid, ctx "
            "ORDER BY score DESC, k.item_rowid LIMIT ?",
            (" ".join(words), K1 + 1, K1, B, B, *cube_ids, *params, 2 * limit))
        out: Ranked = {False: [], True: []}
        for rowid, ctx, score in rows:
            if len(out[bool(ctx)]) < limit:
                out[bool(ctx)].append((int(rowid), float(score or 0.0)))
        return out

    def vector_candidates(self, qvec: np.ndarray, sel: Selection, limit: int) -> Ranked:
        """Best cosine similarity per selected item, best first, own keys (False) and context
        keys (True) apart: the HNSW index for a selection as wide as its cubes, an exact scan
        within a narrower one (or when the index could not fill the list)."""
        q = np.asarray(qvec, np.float32)
        rows: list[Any] = []
        if not sel.narrow and self._vector_keys(sel.cube_ids) > EXACT_LIMIT:
            rows = self._ann(q, sel, 2 * limit)
        if len({r[0] for r in rows}) < limit:
            where, params = self.where(sel)
            cubes, cube_ids = _key_cubes(sel)
            rows = self.conn.execute(
                "SELECT k.item_rowid, k.role = 'context', 1 - (k.vec <=> ?) AS sim FROM keys k "
                "JOIN items i ON i.rowid = k.item_rowid WHERE k.vec IS NOT NULL AND "
                f"{cubes} AND {where} ORDER BY k.vec <=> ? LIMIT ?",
                (q, *cube_ids, *params, q, 2 * limit)).fetchall()
        out: Ranked = {}
        for ctx in (False, True):
            best: dict[int, float] = {}
            for rowid, is_ctx, sim in rows:
                if bool(is_ctx) == ctx:
                    best[rowid] = max(float(sim), best.get(rowid, -1.0))
            out[ctx] = sorted(best.items(), key=lambda kv: -kv[1])[:limit]
        return out

    def _vector_keys(self, cube_ids: Sequence[int], ttl: float = 30.0) -> int:
        """Keys with a vector in these cubes (counted at most every `ttl` seconds per cube set):
        below EXACT_LIMIT an exact scan is cheaper than the graph and misses nothing."""
        key, now = tuple(sorted(cube_ids)), time.monotonic()
        cached = self._counts.get(key)
        if cached is None or now - cached[0] > ttl:
            cubes, cube_ids = _key_cubes(Selection(cube_ids=key))
            n = self.conn.execute(f"SELECT count(*) FROM keys k WHERE k.vec IS NOT NULL AND "
                                  f"{cubes}", cube_ids).fetchone()[0]
            cached = self._counts[key] = (now, int(n))
        return cached[1]

    def _ann(self, q: np.ndarray, sel: Selection, k: int) -> list[Any]:
        """Keys nearest by the HNSW index of q's dimension, then the selection applied."""
        dim = len(q)
        where, params = self.where(sel)
        with self.conn.session():
            self.conn.setting("hnsw.ef_search", str(max(40, min(1000, 2 * k))))
            return self.conn.execute(
                f"SELECT k.item_rowid, k.role = 'context', 1 - (k.vec::vector({dim}) <=> ?) "
                f"FROM (SELECT * FROM keys k WHERE vector_dims(k.vec) = {dim} "
                f"ORDER BY k.vec::vector({dim}) <=> ? LIMIT ?) k "
                f"JOIN items i ON i.rowid = k.item_rowid WHERE {where}",
                (q, q, 2 * k, *params)).fetchall()

    # the server's rate limits ------------------------------------------------------------------
    shared_rate_limits = True  # every process of a deployment sees the same buckets

    def take_token(self, key: str, rate: float, burst: float) -> float:
        """Take one request from `key`'s token bucket, atomically for every process: 0.0 when
        it may go, else the seconds until it may."""
        tokens, allowed = self.conn.execute(
            "INSERT INTO rate_buckets AS b (key, tokens, updated, allowed) "
            "VALUES (?, ? - 1, extract(epoch from clock_timestamp()), true) "
            "ON CONFLICT (key) DO UPDATE SET "
            "allowed = least(?, b.tokens + (extract(epoch from clock_timestamp()) - b.updated) "
            "  * ?) >= 1, "
            "tokens = least(?, b.tokens + (extract(epoch from clock_timestamp()) - b.updated) "
            "  * ?) - CASE WHEN least(?, b.tokens + (extract(epoch from clock_timestamp()) "
            "  - b.updated) * ?) >= 1 THEN 1 ELSE 0 END, "
            "updated = extract(epoch from clock_timestamp()) RETURNING tokens, allowed",
            (key, burst, burst, rate, burst, rate, burst, rate)).fetchone()
        return 0.0 if allowed else (1 - tokens) / rate

    # whole-store copies ---------------------------------------------------------------------------
    @staticmethod
    def _vector(value: Any) -> np.ndarray:
        return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, np.float32)

    def sync_sequences(self) -> None:
        """After rows were copied with their ids: each sequence continues after the largest."""
        for table, column in (("cubes", "id"), ("items", "rowid"), ("keys", "rowid"),
                              ("audit", "seq")):
            self.conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                              f"coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)")

    # inspection -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        kinds = {f"{k}:{s}": n for k, s, n in self.conn.execute(
            "SELECT kind, status, count(*) FROM items GROUP BY kind, status")}
        return {"path": self.location, "schema_version": SCHEMA_VERSION, "items": kinds,
                "keys": self.conn.execute("SELECT count(*) FROM keys").fetchone()[0],
                "audit_entries": self.conn.execute("SELECT count(*) FROM audit").fetchone()[0],
                "size_bytes": self.conn.execute(
                    "SELECT pg_database_size(current_database())").fetchone()[0]}


def _many(cursor: Any, sql: str, rows: list[Sequence[Any]], returning: bool) -> list[Any]:
    cursor.executemany(sql, rows, returning=returning)
    out = []
    while returning:
        out.append(cursor.fetchone()[0])
        if not cursor.nextset():
            break
    return out


def _key_cubes(sel: Selection) -> tuple[str, list[Any]]:
    """The selection's cubes as a condition on keys k (their own cube column: the primary key
    index narrows the keys before they are joined to items), and its parameters: one text
    for any cubes, so each connection prepares it once."""
    if not sel.cube_ids:
        return "true", []
    return "k.cube_id = ANY(?)", [[int(c) for c in sel.cube_ids]]


def _visible(cube_ids: Iterable[Any]) -> str:
    return ",".join(str(int(c)) for c in cube_ids)


def _driver() -> tuple[Any, Any, Any]:
    try:
        import psycopg
        import psycopg_pool
        from pgvector.psycopg import register_vector
    except ImportError as exc:
        raise MissingExtraError("the PostgreSQL store needs the postgres extra: "
                                "pip install 'memstack[postgres]'") from exc
    return psycopg, psycopg_pool, register_vector


def _check(used: weakref.WeakKeyDictionary[Any, float], check: Callable[[Any], None],
           conn: Any, fresh: float = 1.0) -> None:
    """Before the pool lends a connection: one that served a statement within `fresh` seconds
    is taken as alive (under load a round trip per borrow costs more than the statement); an
    older one is checked, so after a restart of the database the next call reconnects. A
    restart within that second fails the call that meets it (StoreUnavailableError), once."""
    if not conn.closed and time.monotonic() - used.get(conn, -fresh) < fresh:
        return
    check(conn)


def _configure(register_vector: Callable[[Any], None], conn: Any) -> None:
    """Each pooled connection passes numpy arrays as pgvector values."""
    try:
        register_vector(conn)
    except Exception:  # a new database: the extension comes first (the schema creates it too)
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)


def _reason(exc: BaseException, url: str) -> str:
    """The driver's message without the password, whatever it quotes."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text
