"""The write path: drafts in, items, keys, versions and audit entries out, one transaction each.

A Writer is what the facade, the fact manager and the repairs share to change the text tier:
it embeds drafts, inserts them with their first versions, keeps each turn's context keys (the
turn with its neighbours) current on add, update and delete, and purges text on delete. The
store applies committed key changes to its vector indexes itself.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from .._errors import EmbeddingMismatchError, ItemNotFoundError
from .._models import Item, utcnow
from .._time import parse_time
from ..embed import Embedder
from ..ingest.rules import Draft, context_key
from ..store.base import CubeRow, Store, content_hash
from ..store.cubes import Cubes
from ..store.selection import Selection
from .drafts import Prepared, link, session_draft

Written = tuple[int, Item]


class Writer:
    def __init__(self, store: Store, cubes: Cubes, embedder: Embedder, actor: str, *,
                 context_window: tuple[int, int] | None = (2, 1),
                 context_vectors: bool = False) -> None:
        self.store, self.cubes, self.embedder, self.actor = store, cubes, embedder, actor
        self.context_window, self.context_vectors = context_window, context_vectors

    # adds -------------------------------------------------------------------------------------
    def embed(self, drafts: Sequence[Draft]) -> np.ndarray:
        texts = [t for d in drafts for t in d.key_texts]
        if not texts:
            return np.zeros((0, self.embedder.dim), np.float32)
        vectors = self.embedder.embed(texts)
        if vectors.shape != (len(texts), self.embedder.dim):
            raise EmbeddingMismatchError(f"the embedder returned {vectors.shape}, expected "
                                         f"({len(texts)}, {self.embedder.dim})")
        return vectors

    def commit(self, prepared: Prepared, vectors: np.ndarray
               ) -> tuple[list[Item], Item | None]:
        """Write a prepared add in one transaction: (the items, their session)."""
        drafts, kind, scope = prepared.drafts, prepared.kind, prepared.scope
        with self.store.transaction():
            cube = self.cubes.get(prepared.cube.name, create=True)
            session = self.store.session_item(cube.id, scope) \
                if kind == "turn" and scope["session_id"] else None
            new_session = False
            if prepared.session_draft is not None:
                n = len(prepared.session_draft.key_texts)
                if session is None:  # (another add may have created it since prepare)
                    [session] = self.insert(cube, [prepared.session_draft], vectors[:n])
                    new_session = True
                vectors = vectors[n:]
            if session is not None:
                link(session[1], drafts)
            written = self.insert(cube, drafts, vectors)
            if session is not None:
                session = self._count_turns(session, [i for _, i in written])
                new = [rowid for rowid, _ in written]
                self.refresh_context(session[1].id, self.neighbours(session[1].id, new[0]) + new)
            self.store.bump_generation(cube.id)
            ids = [i.id for _, i in written] + ([session[1].id] if new_session else [])
            self.store.audit(self.actor, "add", cube.name, ids,
                             {"kind": kind, "messages": len(drafts)})
        return [i for _, i in written], session[1] if session else None

    def insert(self, cube: CubeRow, drafts: Sequence[Draft], vectors: np.ndarray
               ) -> list[Written]:
        """Insert drafts with their keys and first versions, inside the caller's transaction."""
        now = utcnow()
        rowids = self.store.insert_items(
            cube.id, [{**d.fields, "recorded_at": now, "updated_at": now} for d in drafts])
        starts = np.cumsum([0] + [len(d.key_texts) for d in drafts])
        spans = zip(rowids, drafts, starts, starts[1:])
        self.store.insert_keys([(rowid, d.key_texts, d.key_roles, vectors[start:end])
                                for rowid, d, start, end in spans])
        items = self.store.items_by_rowid(rowids)
        written = [(rowid, items[rowid]) for rowid in rowids]
        self.store.add_versions(written, "add", self.actor)
        return written

    def new_session(self, cube: CubeRow, scope: dict[str, str | None], first: dict[str, Any]
                    ) -> Written:
        """A session item for a scope, inside the caller's transaction (the repairs)."""
        draft = session_draft(scope, first)
        [written] = self.insert(cube, [draft], self.embed([draft]))
        return written

    def _count_turns(self, session: Written, turns: list[Item]) -> Written:
        rowid, item = session
        times = [t.observed_at for t in turns if t.observed_at]
        last = item.metadata.get("last_observed_at")
        if last:
            times.append(parse_time(last))
        meta = {**item.metadata, "turn_count": item.metadata.get("turn_count", 0) + len(turns),
                "last_observed_at": max(times).isoformat() if times else None}
        self.store.update_item(rowid, {"metadata": meta, "updated_at": utcnow()})
        return rowid, self.store.items_by_rowid([rowid])[rowid]

    # context keys -----------------------------------------------------------------------------
    def session_turns(self, session_item_id: str, status: str = "active") -> list[Written]:
        return self.store.select_items(self._turns(session_item_id, status))

    def _turn_rowids(self, session_item_id: str, status: str = "active") -> list[int]:
        return self.store.select_rowids(self._turns(session_item_id, status))

    @staticmethod
    def _turns(session_item_id: str, status: str) -> Selection:
        return Selection(status=status, kinds=("turn",), parent_id=session_item_id)  # type: ignore

    def refresh_context(self, session_item_id: str | None, rowids: Iterable[int]) -> None:
        """Rebuild the context keys (a turn with its neighbours) of some turns of a session, from
        the session as it is now. Called inside the write transaction of add, update and delete,
        because a turn's neighbours' keys contain its text."""
        wanted = set(rowids)
        if not self.context_window or session_item_id is None or not wanted:
            return
        order = self._turn_rowids(session_item_id)
        before_n, after_n = self.context_window
        # a turn that left search (archived, expired, deleted) keeps no context key: it would
        # hold its neighbours' text, which may change or be deleted after it left
        self.store.delete_keys(sorted(wanted - set(order)), "context")
        # only the wanted turns' windows are read: an add to a long session reads a few turns
        spans = [(n, max(0, n - before_n), n + 1 + after_n)
                 for n, rowid in enumerate(order) if rowid in wanted]
        turns = self.store.items_by_rowid(sorted({order[k] for _, start, end in spans
                                                  for k in range(start, min(end, len(order)))}))
        pairs = {rowid: (t.speaker or "", t.content or "") for rowid, t in turns.items()}
        jobs = []
        for n, start, end in spans:
            rowid = order[n]
            before = [pairs[r] for r in order[start:n]]
            after = [pairs[r] for r in order[n + 1:end]]
            text = context_key(before, pairs[rowid], after, turns[rowid].observed_at) \
                if before or after else None
            jobs.append((rowid, text))
        self.store.delete_keys([rowid for rowid, _ in jobs], "context")
        jobs = [(rowid, text) for rowid, text in jobs if text]
        # text-only keys by default: BM25 sees the neighbours, no embedding
        vectors = self.embedder.embed([t for _, t in jobs]) if self.context_vectors and jobs \
            else None
        self.store.insert_keys([(rowid, [text], ["context"],
                                 None if vectors is None else vectors[n:n + 1])
                                for n, (rowid, text) in enumerate(jobs)])

    def neighbours(self, session_item_id: str | None, rowid: int) -> list[int]:
        """Rowids of the turns whose context keys may hold this turn's text (itself
        included): its window among the active turns with it counted in (the keys of active
        turns are built over active turns), and among every turn not deleted (an archived or
        expired turn's own key may still hold it until rebuilt)."""
        if not self.context_window or session_item_id is None:
            return []
        live = self._turn_rowids(session_item_id, status="live")
        if rowid not in live:
            return []
        active = self._turn_rowids(session_item_id)
        if rowid not in active:
            active = sorted([*active, rowid])  # turns are in rowid order
        before_n, after_n = self.context_window
        out: set[int] = set()
        for order in (live, active):
            n = order.index(rowid)
            out.update(order[max(0, n - after_n):n + before_n + 1])
        return sorted(out)

    # changes ----------------------------------------------------------------------------------
    def live(self, memory_id: str) -> Written:
        found = self.store.item_by_id(memory_id)
        if found is None or found[1].status == "deleted":
            state = "was deleted" if found else "does not exist"
            raise ItemNotFoundError(f"memory {memory_id!r} {state}; list ids with `memstack list`")
        return found

    def rewrite(self, memory_id: str, text: str, keys: tuple[list[str], list[str]],
                meta: dict[str, Any], reason: str) -> Item:
        """A new version of an item's text with its new keys, in one transaction."""
        vectors = self.embed([Draft({}, keys[0], keys[1])])
        with self.store.transaction():
            rowid, item = self.live(memory_id)
            cube = self.cubes.get(item.cube)
            self.store.delete_keys([rowid])
            self.store.insert_keys([(rowid, keys[0], keys[1], vectors)])
            self.store.update_item(rowid, {"content": text, "content_hash": content_hash(text),
                                           "metadata": meta, "version": item.version + 1,
                                           "updated_at": utcnow()})
            updated = self.store.items_by_rowid([rowid])[rowid]
            self.store.add_version(rowid, updated, reason, self.actor)
            if item.kind == "turn":
                self.refresh_context(item.parent_id, self.neighbours(item.parent_id, rowid))
            self.store.bump_generation(cube.id)
            self.store.audit(self.actor, "update", cube.name, [memory_id], {"reason": reason})
        return updated

    def supersede(self, rowid: int, old: Item, by: str, when: Any, reason: str,
                  sources: list[str]) -> None:
        """Close an item's validity (a newer one replaces or retracts it), inside the caller's
        transaction; the old text stays, as history."""
        valid_to = max(when, old.valid_from) if old.valid_from else when
        self.store.update_item(rowid, {"status": "superseded", "valid_to": valid_to,
                                       "superseded_by": by, "version": old.version + 1,
                                       "updated_at": utcnow()})
        self.store.add_version(rowid, self.store.items_by_rowid([rowid])[rowid], reason,
                               self.actor, sources)

    # deletion ---------------------------------------------------------------------------------
    def purge(self, cube: CubeRow, ids: list[str], reason: str, action: str,
              cascade: bool = True, into: list[str] | None = None) -> int:
        """Delete items (a tombstone stays; their text leaves rows, versions and indexes), their
        sessions' turns and, with `cascade`, what was derived from them. Returns how many;
        `into` gets every id purged."""
        neighbours: dict[str, set[int]] = {}
        purged: list[str] = []
        with self.store.transaction():
            pending = list(ids)
            while pending:  # rounds: the items, then facts derived from them, and so on
                start = len(purged)
                self._tombstone_all(pending, purged, neighbours, reason)
                pending = self.store.derived_from(cube.id, purged[start:]) if cascade else []
            for session_item_id, rowids in neighbours.items():  # their context keys held the text
                self.refresh_context(session_item_id, rowids)
            self.store.forget_answer_items(cube.id, purged)
            self.store.compact_indexes()
            self.store.bump_generation(cube.id)
            self.store.audit(self.actor, action, cube.name, purged, {"reason": reason})
        self.store.checkpoint()
        if into is not None:
            into.extend(purged)
        return len(purged)

    def forget_context(self, turns: list[tuple[int, Item]]) -> None:
        """Rebuild the context keys of the neighbours of turns that left search (archived or
        expired), inside the caller's transaction: their keys held those turns' text."""
        by_session: dict[str, set[int]] = {}
        for rowid, turn in turns:
            if turn.kind == "turn" and turn.parent_id:
                by_session.setdefault(turn.parent_id, set()).update(
                    self.neighbours(turn.parent_id, rowid))
        for session_item_id, rowids in by_session.items():
            self.refresh_context(session_item_id, rowids)

    def _tombstone_all(self, ids: list[str], purged: list[str],
                       neighbours: dict[str, set[int]], reason: str) -> None:
        """Purge the text of items (and of a session's turns), inside the caller's transaction."""
        done = set(purged)
        for item_id in ids:  # grows while it runs: a session's turns join it
            found = self.store.item_by_id(item_id)
            if found is None or found[1].status == "deleted" or item_id in done:
                continue
            rowid, item = found
            if item.kind == "session":
                ids.extend(i.id for _, i in self.store.select_items(
                    Selection(status="live", parent_id=item.id)))
            elif item.kind == "turn" and item.parent_id:
                neighbours.setdefault(item.parent_id, set()).update(
                    self.neighbours(item.parent_id, rowid))
            self.store.delete_keys([rowid])
            self.store.purge_versions(rowid)
            self.store.update_item(rowid, {"content": None, "content_hash": None,
                                           "metadata": {}, "tags": [], "status": "deleted",
                                           "updated_at": utcnow(), "version": item.version + 1})
            tomb = self.store.items_by_rowid([rowid])[rowid]
            self.store.add_version(rowid, tomb, reason, self.actor)
            purged.append(item_id)
            done.add(item_id)
