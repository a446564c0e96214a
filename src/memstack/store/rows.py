"""The rows every SQL store shares: cubes, items, versions, audit, repairs, access statistics.

The SQL here runs unchanged on SQLite (>= 3.44) and PostgreSQL: `?` parameters (the Postgres
connection turns them into its own), `RETURNING`, `IS NOT DISTINCT FROM`, `ON CONFLICT DO
NOTHING`. What differs (JSON access) comes from `dialect`. Full text, vectors, connections and
migrations are each store's own.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Iterator, Sequence

from .._errors import CubeNotFoundError, InvalidInputError
from .._models import AuditEntry, Cube, Item, RetentionRule, Version
from .._time import from_epoch
from . import chain
from .base import CubeRow, ItemField, Order, batches
from .selection import Selection
from .sqlwhere import where as _where

ITEM_COLUMNS = ("id", "kind", "content", "content_hash", "role", "speaker", "user_id", "agent_id",
                "session_id", "parent_id", "metadata", "tags", "observed_at", "valid_from",
                "valid_to", "recorded_at", "updated_at", "status", "version", "superseded_by",
                "source_ids", "producer", "access_count", "last_accessed", "importance",
                "kv_blocks", "shards", "expires_at")
_JSON_COLUMNS = {"metadata", "tags", "source_ids", "kv_blocks", "shards"}
_TIME_COLUMNS = {"observed_at", "valid_from", "valid_to", "recorded_at", "updated_at",
                 "last_accessed", "expires_at"}
_ORDER = {"rowid": "i.rowid", "rowid_desc": "i.rowid DESC", "observed": "i.observed_at, i.rowid"}
# a session is its whole scope: two users' sessions with the same id are two sessions
_SELECT = "SELECT i.rowid, c.name, " + ", ".join(f"i.{c}" for c in ITEM_COLUMNS) + \
          " FROM items i JOIN cubes c ON c.id = i.cube_id"

# retention_due: which items each rule reaches (status, the time compared with the cutoff)
_DUE = {"expires": ("active", "i.expires_at"), "recorded": ("active", "i.recorded_at"),
        "unused": ("active", "coalesce(i.last_accessed, i.recorded_at)"),
        "archived": ("archived", "i.updated_at")}

# JSON read per dialect, for ranking (item_fields)
_JSON_FIELD = {"sqlite": "json_extract(metadata, '$.{}')", "postgres": "(metadata::jsonb ->> '{}')"}
_SESSION = {"sqlite": "json_array(cube_id, user_id, agent_id, session_id)",
            "postgres": "json_build_array(cube_id, user_id, agent_id, session_id)::text"}


class ItemRows:
    """Mixed into the SQL stores (they provide `conn`, `dialect` and the key and tier tables)."""

    conn: Any
    dialect: str

    def where(self, sel: Selection) -> tuple[str, list[Any]]:
        return _where(sel, self.dialect)

    def cube(self, name: str) -> CubeRow:
        row = self.conn.execute("SELECT id, name, owner, created_at, embed_model, embed_dim, "
                                "generation FROM cubes WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise CubeNotFoundError(f"no cube named {name!r}; list cubes with `memstack stats`")
        return CubeRow(*row)

    def create_cube(self, name: str, owner: str | None, embed_model: str, dim: int) -> CubeRow:
        # two writers creating the same cube at once both get the one row
        self.conn.execute("INSERT INTO cubes (name, owner, created_at, embed_model, "
                          "embed_dim) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                          (name, owner, time.time(), embed_model, dim))
        return self.cube(name)

    def insert_cube(self, name: str, owner: str | None, embed_model: str, dim: int) -> CubeRow:
        """A new cube, or InvalidInputError if the name is taken (also by a writer whose
        transaction commits while this one waits for it)."""
        made = self.conn.execute("INSERT INTO cubes (name, owner, created_at, embed_model, "
                                 "embed_dim) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO "
                                 "NOTHING RETURNING id",
                                 (name, owner, time.time(), embed_model, dim)).fetchall()
        if not made:
            raise InvalidInputError(f"cube {name!r} exists; import the archive under another "
                                    "name (--as NAME)")
        return self.cube(name)

    def cubes(self) -> list[Cube]:
        rows = self.conn.execute(
            "SELECT c.name, c.owner, c.created_at, c.embed_model, c.embed_dim, "
            "(SELECT count(*) FROM items i WHERE i.cube_id = c.id AND i.status != 'deleted') "
            "FROM cubes c ORDER BY c.name").fetchall()
        return [Cube(r[0], r[1], from_epoch(r[2]), r[3], r[4], r[5]) for r in rows]

    def cube_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM cubes").fetchone()[0]

    def set_cube_model(self, cube_id: int, model: str, dim: int) -> None:
        self.conn.execute("UPDATE cubes SET embed_model = ?, embed_dim = ? WHERE id = ?",
                          (model, dim, cube_id))

    def insert_items(self, cube_id: int, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert items; their rowids in the order given."""
        out: list[int] = []
        for names, part in _runs([_encode(fields) for fields in rows]):
            marks = ", ".join("?" for _ in names)
            out += self.returning(f"INSERT INTO items (cube_id, {', '.join(names)}) VALUES "
                                  f"(?, {marks}) RETURNING rowid",
                                  [(cube_id, *row.values()) for row in part])
        return out

    def returning(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[Any]:
        """Run one statement per row; the first column each returned (a store with a faster
        way to send many statements overrides this)."""
        return [self.conn.execute(sql, row).fetchone()[0] for row in rows]

    def update_item(self, rowid: int, fields: dict[str, Any]) -> None:
        if "content" in fields or "status" in fields:  # derived tiers no longer match the text
            self.drop_blocks_of_items([rowid])
            self.mark_shards_stale([rowid])
        row = _encode(fields)
        sets = ", ".join(f"{name} = ?" for name in row)
        self.conn.execute(f"UPDATE items SET {sets} WHERE rowid = ?", (*row.values(), rowid))

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
                     offset: int = 0, after_rowid: int | None = None
                     ) -> list[tuple[int, Item]]:
        """Items of the selection; `after_rowid` (with order "rowid"): the next page after
        that item, found by the index, where an OFFSET would step over every earlier row."""
        where, params = self.where(sel)
        if after_rowid is not None:
            where, params = f"{where} AND i.rowid > ?", [*params, after_rowid]
        sql = _SELECT + f" WHERE {where} ORDER BY {_ORDER[order]}"
        if limit is not None:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        return [(row[0], _decode(row)) for row in self.conn.execute(sql, params)]

    def select_rowids(self, sel: Selection) -> list[int]:
        """The rowids of the selection in rowid order: no row decoded (a long session's
        window of turns is found from these, then only its few turns are read)."""
        where, params = self.where(sel)
        sql = f"SELECT i.rowid FROM items i JOIN cubes c ON c.id = i.cube_id WHERE {where} " \
              "ORDER BY i.rowid"
        return [row[0] for row in self.conn.execute(sql, params)]

    def session_item(self, cube_id: int, scope: dict[str, str | None]) -> tuple[int, Item] | None:
        """The session item of a whole scope: cube, user, agent and session id (two users who
        pick the same session id have two sessions; a missing user or agent matches a missing one)."""
        row = self.conn.execute(
            _SELECT + " WHERE i.cube_id = ? AND i.session_id = ? AND "
            "i.user_id IS NOT DISTINCT FROM ? AND i.agent_id IS NOT DISTINCT FROM ? AND "
            "i.kind = 'session' AND i.status != 'deleted' "
            "ORDER BY i.rowid LIMIT 1",
            (cube_id, scope["session_id"], scope["user_id"], scope["agent_id"])).fetchone()
        return (row[0], _decode(row)) if row else None

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
            "(t.user_id IS DISTINCT FROM s.user_id OR t.agent_id IS DISTINCT FROM s.agent_id) "
            "ORDER BY s.rowid")]
        return sorted(self.items_by_rowid(rowids).items())

    def touch(self, uses: dict[str, tuple[int, float]]) -> None:
        """Record use: {item id: (times used, last time)}. Access statistics feed the tier
        scheduler."""
        if not uses:
            return
        with self.transaction():
            self.conn.executemany("UPDATE items SET access_count = access_count + ?, "
                                  "last_accessed = CASE WHEN last_accessed > ? THEN last_accessed "
                                  "ELSE ? END WHERE id = ?",
                                  [(n, t, t, i) for i, (n, t) in uses.items()])

    def item_fields(self, rowids: Sequence[int], names: Sequence[ItemField]
                    ) -> dict[ItemField, dict[int, Any]]:
        """For ranking, in one query: name -> rowid -> that field of the items. Names: speaker,
        role, directive (the flag), session (the whole scope of the item's session, or None),
        observed_at (epoch seconds), resolved_dates (a list of {start, end})."""
        out: dict[ItemField, dict[int, Any]] = {name: {} for name in names}
        if not names:
            return out
        columns = ", ".join(self._field(name) for name in names)
        for part in batches(list(rowids)):
            for row in self.conn.execute(f"SELECT rowid, {columns} FROM items WHERE rowid IN "
                                         f"({','.join('?' * len(part))})", part):
                for name, value in zip(names, row[1:]):
                    out[name][row[0]] = _read_field(name, value)
        return out

    def _field(self, name: ItemField) -> str:
        if name in ("directive", "resolved_dates"):
            return _JSON_FIELD[self.dialect].format(name)
        if name == "session":  # a session is its whole scope: cube, user, agent, session id
            return f"CASE WHEN session_id IS NULL THEN NULL ELSE {_SESSION[self.dialect]} END"
        return name

    def allowed(self, rowids: Sequence[int], sel: Selection) -> set[int]:
        """The items among `rowids` that the selection sees."""
        where, params = self.where(sel)
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

    def live_keys(self, cube_id: int) -> set[int]:
        rows = self.conn.execute("SELECT k.rowid FROM keys k JOIN items i ON i.rowid = k.item_rowid"
                                 " WHERE i.cube_id = ? AND k.vec IS NOT NULL", (cube_id,))
        return {r[0] for r in rows}

    def consistency(self) -> dict[str, int]:
        """Counts that must be 0 in a sound store: search keys of no item, search keys left
        to a deleted item, versions of no item."""
        queries = {
            "orphan_keys": "SELECT count(*) FROM keys k LEFT JOIN items i ON i.rowid = "
                           "k.item_rowid WHERE i.rowid IS NULL",
            "keys_of_deleted_items": "SELECT count(*) FROM keys k JOIN items i ON i.rowid = "
                                     "k.item_rowid WHERE i.status = 'deleted'",
            "orphan_versions": "SELECT count(*) FROM versions v LEFT JOIN items i ON i.rowid = "
                               "v.item_rowid WHERE i.rowid IS NULL",
        }
        return {name: self.conn.execute(sql).fetchone()[0] for name, sql in queries.items()}

    def add_version(self, item_rowid: int, item: Item, reason: str, actor: str,
                    source_ids: Sequence[str] = ()) -> None:
        """Record an item as it is now; `source_ids` are the items (turns) that caused it."""
        self.add_versions([(item_rowid, item)], reason, actor, source_ids)

    def add_versions(self, rows: Sequence[tuple[int, Item]], reason: str, actor: str,
                     source_ids: Sequence[str] = ()) -> None:
        """Record several items as they are now, for one reason (`source_ids`, when given,
        instead of each item's own)."""
        now = time.time()
        self.conn.executemany(
            "INSERT INTO versions (item_rowid, version, content, metadata, status, valid_from, "
            "valid_to, changed_at, reason, actor, superseded_by, source_ids) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(rowid, item.version, item.content, json.dumps(item.metadata), item.status,
              _epoch(item.valid_from), _epoch(item.valid_to), now, reason, actor,
              item.superseded_by, json.dumps(list(source_ids or item.source_ids)))
             for rowid, item in rows])

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

    def versions_of(self, items: dict[int, str]) -> dict[int, list[Version]]:
        """The versions of many items ({rowid: item id}) in one statement per 500."""
        out: dict[int, list[Version]] = {rowid: [] for rowid in items}
        for part in batches(list(items)):
            rows = self.conn.execute(
                "SELECT item_rowid, version, content, metadata, status, valid_from, valid_to, "
                "changed_at, reason, actor, superseded_by, source_ids FROM versions WHERE "
                f"item_rowid IN ({', '.join('?' * len(part))}) "
                "ORDER BY item_rowid, version, changed_at", list(part))
            for r in rows:
                out[r[0]].append(Version(items[r[0]], r[1], r[2], json.loads(r[3]), r[4],
                                         from_epoch(r[5]), from_epoch(r[6]), from_epoch(r[7]),
                                         r[8], r[9], r[10], json.loads(r[11])))
        return out

    def key_vectors_of(self, rowids: Sequence[int]) -> dict[int, list[tuple[str, Any]]]:
        """(role, vector) of many items' keys that have one, in the order they were written."""
        out: dict[int, list[tuple[str, Any]]] = {rowid: [] for rowid in rowids}
        for part in batches(list(rowids)):
            for rowid, role, vec in self.conn.execute(
                    "SELECT item_rowid, role, vec FROM keys WHERE vec IS NOT NULL AND "
                    f"item_rowid IN ({', '.join('?' * len(part))}) ORDER BY rowid", list(part)):
                out[rowid].append((role, self._vector(vec)))
        return out

    def audit(self, actor: str, action: str, cube: str | None, item_ids: Sequence[str],
              detail: dict[str, Any] | None = None, at: float | None = None) -> None:
        """Append an entry, chained to the last one (store/chain.py). The store serialises
        appends (`_audit_turn`) so two writers never chain to the same entry. `at`: now, or
        the time of an entry brought by a cube archive."""
        self._audit_turn()
        values = (time.time() if at is None else float(at), actor, action, cube, json.dumps(list(item_ids)),
                  json.dumps(detail or {}))
        prev = self._audit_head()
        self.conn.execute("INSERT INTO audit (at, actor, action, cube, item_ids, detail, prev, "
                          "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                          (*values, prev, chain.link(prev, *values)))

    def _audit_turn(self) -> None:
        """Hold the audit log's tail until the transaction ends (each store says how)."""

    def _audit_head(self) -> str:
        last = self.audit_last()
        if last is None:
            return chain.GENESIS
        if last.hash is not None:
            return last.hash
        return chain.head_of(chain.walk(self.audit_rows))  # entries from before the chain

    def audit_last(self) -> chain.ChainRow | None:
        row = self.conn.execute("SELECT seq, at, actor, action, cube, item_ids, detail, prev, "
                                "hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return chain.as_row(row) if row is not None else None

    def audit_rows(self, after_seq: int, limit: int) -> list[chain.ChainRow]:
        """Audit rows as stored (with their links), in order, after `after_seq`."""
        return [chain.as_row(r) for r in self.conn.execute(
            "SELECT seq, at, actor, action, cube, item_ids, detail, prev, hash FROM audit "
            "WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))]

    def audit_log(self, limit: int = 100, since_seq: int = 0) -> list[AuditEntry]:
        return [AuditEntry(r.seq, from_epoch(r.at), r.actor, r.action, r.cube,
                           json.loads(r.item_ids), json.loads(r.detail), r.hash)
                for r in self.audit_rows(since_seq, limit)]


    # retention (govern/retention.py) -----------------------------------------------------------
    def retention_rules(self, cube_id: int | None = None) -> list[RetentionRule]:
        """The retention rules of one cube (None: of every cube), by cube and kind."""
        sql = ("SELECT c.name, r.kind, r.expire_after, r.archive_unused, r.purge_after, "
               "r.set_by, r.set_at FROM retention r JOIN cubes c ON c.id = r.cube_id")
        rows = self.conn.execute(sql + (" WHERE r.cube_id = ?" if cube_id is not None else "")
                                 + " ORDER BY c.name, r.kind",
                                 (cube_id,) if cube_id is not None else ())
        return [RetentionRule(*row[:6], set_at=from_epoch(row[6])) for row in rows]

    def set_retention(self, cube_id: int, kind: str, expire_after: float | None,
                      archive_unused: float | None, purge_after: float | None,
                      set_by: str) -> None:
        """Write a cube's rule for a kind (all three None: remove it)."""
        self.conn.execute("DELETE FROM retention WHERE cube_id = ? AND kind = ?",
                          (cube_id, kind))
        if (expire_after, archive_unused, purge_after) != (None, None, None):
            self.conn.execute(
                "INSERT INTO retention (cube_id, kind, expire_after, archive_unused, "
                "purge_after, set_by, set_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cube_id, kind, expire_after, archive_unused, purge_after, set_by, time.time()))

    def retention_due(self, cube_id: int, due: str, cutoff: float,
                      kinds: Sequence[str] | None = None, after_rowid: int = 0,
                      limit: int = 500) -> list[tuple[int, Item]]:
        """Items of a cube a retention rule reaches at `cutoff` (epoch seconds), by rowid after
        `after_rowid`: "expires" (active, expires_at <= cutoff), "recorded" (active, recorded
        at or before it), "unused" (active, last read, or else recorded, at or before it),
        "archived" (archived at or before it). `kinds`: only these (None: any)."""
        status, column = _DUE[due]
        sql = (_SELECT + f" WHERE i.cube_id = ? AND i.status = '{status}' AND {column} <= ? "
               "AND i.rowid > ?")
        params: list[Any] = [cube_id, cutoff, after_rowid]
        if kinds is not None:
            if not kinds:
                return []
            sql += f" AND i.kind IN ({', '.join('?' * len(kinds))})"
            params += list(kinds)
        rows = self.conn.execute(sql + " ORDER BY i.rowid LIMIT ?", (*params, limit))
        return [(row[0], _decode(row)) for row in rows]

    # answers and generations that feedback can name (learn/feedback.py) ------------------------
    def insert_answer(self, answer_id: str, kind: str, query: str, scope: dict[str, Any],
                      item_ids_by_cube: dict[int, list[str]]) -> None:
        """One row per cube whose memories the answer used (a cube wall sees its own)."""
        now = time.time()
        for cube_id, ids in item_ids_by_cube.items():
            self.conn.execute(
                "INSERT INTO answers (id, cube_id, kind, user_id, agent_id, query, item_ids, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (answer_id, cube_id, kind, scope.get("user_id"), scope.get("agent_id"), query,
                 json.dumps(ids), now))

    def answer_rows(self, answer_id: str) -> list[dict[str, Any]]:
        """The rows of an answer or generation by id, one per cube."""
        rows = self.conn.execute(
            "SELECT a.cube_id, c.name, a.kind, a.user_id, a.agent_id, a.query, a.item_ids, "
            "a.created_at FROM answers a JOIN cubes c ON c.id = a.cube_id WHERE a.id = ? "
            "ORDER BY a.cube_id", (answer_id,)).fetchall()
        return [{"cube_id": r[0], "cube": r[1], "kind": r[2], "user_id": r[3],
                 "agent_id": r[4], "query": r[5], "item_ids": json.loads(r[6]),
                 "created_at": r[7]} for r in rows]

    def forget_answer_items(self, cube_id: int, item_ids: Sequence[str]) -> None:
        """Deleted memories leave the answers that used them; an answer left with none goes
        (its question with it)."""
        gone = set(item_ids)
        if not gone:
            return
        rows = self.conn.execute("SELECT id, item_ids FROM answers WHERE cube_id = ?",
                                 (cube_id,)).fetchall()  # kept 30 days: one pass
        for answer_id, raw in rows:
            used = json.loads(raw)
            left = [i for i in used if i not in gone]
            if len(left) < len(used):
                if left:
                    self.conn.execute("UPDATE answers SET item_ids = ? WHERE id = ? AND "
                                      "cube_id = ?", (json.dumps(left), answer_id, cube_id))
                else:
                    self.conn.execute("DELETE FROM answers WHERE id = ? AND cube_id = ?",
                                      (answer_id, cube_id))

    def drop_answers(self, cube_id: int, scope: dict[str, Any]) -> None:
        """Forget the answers of a cube asked in a scope (user, agent; {}: all of them)."""
        sql, params = "DELETE FROM answers WHERE cube_id = ?", [cube_id]
        for name in ("user_id", "agent_id"):
            if scope.get(name) is not None:
                sql += f" AND {name} = ?"
                params.append(scope[name])
        self.conn.execute(sql, params)

    def prune_answers(self, before: float) -> int:
        """Forget answers older than `before` (epoch seconds): feedback names recent ones."""
        return len(self.conn.execute("DELETE FROM answers WHERE created_at < ? RETURNING id",
                                     (before,)).fetchall())

    # whole-store copies (store/migrate.py) ------------------------------------------------------
    def dump_rows(self, table: str, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """Every row of a table, these columns, in key order (names from migrate.TABLES)."""
        order = {"items": "rowid", "versions": "item_rowid, version", "audit": "seq",
                 "cubes": "id"}.get(table, columns[0])
        return [tuple(r) for r in self.conn.execute(
            f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")]

    def load_rows(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self.conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                  f"({', '.join('?' * len(columns))})", rows)

    def clear_repairs(self) -> None:
        """Forget pending data repairs (a copy brings the source's own record of them)."""
        self.conn.execute("DELETE FROM repairs")

    def key_vectors(self, item_rowid: int) -> list[tuple[str, Any]]:
        """(role, vector) of an item's keys that have one, in the order they were written."""
        return [(role, self._vector(vec)) for role, vec in self.conn.execute(
            "SELECT role, vec FROM keys WHERE item_rowid = ? AND vec IS NOT NULL ORDER BY rowid",
            (item_rowid,))]


def _read_field(name: str, value: Any) -> Any:
    if name == "session":
        return tuple(json.loads(value)) if value else None
    if name == "resolved_dates":
        return json.loads(value) if value else []
    if name == "directive":
        return value in (1, True, "true")
    return value


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


def _runs(rows: list[dict[str, Any]]) -> Iterator[tuple[tuple[str, ...], list[dict[str, Any]]]]:
    """Consecutive rows with the same columns, in order (one statement each)."""
    start = 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or tuple(rows[end]) != tuple(rows[start]):
            yield tuple(rows[start]), rows[start:end]
            start = end


def _decode(row: Sequence[Any]) -> Item:
    values = dict(zip(ITEM_COLUMNS, row[2:]))
    for name in _JSON_COLUMNS:
        values[name] = json.loads(values[name])
    for name in _TIME_COLUMNS:
        values[name] = from_epoch(values[name])
    return Item(cube=row[1], **values)
