"""Memory and AsyncMemory: the public facade. The logic lives here once; AsyncMemory runs it in a
worker thread. Method and argument names follow mem0 where they make sense (run_id = session_id,
limit = top_k, data = new text), so mem0 users can switch.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ._errors import (CubeNotFoundError, EmbeddingMismatchError, InvalidInputError,
                      InvalidLimitError, ItemNotFoundError, UnknownKindError)
from ._models import (KINDS, AddResult, Answer, AuditEntry, Cube, Extraction, Hit, Item,
                      Version, utcnow)
from ._time import parse_time
from ._validate import limit as _limit
from ._validate import login as _login
from ._validate import metadata as _metadata
from ._validate import name as _name
from ._validate import scope as _scope
from .embed import Embedder, LocalEmbedder
from .embed.base import embed_query
from .index import HnswIndex
from .index.saver import IndexSaver
from .llm import ChatModel
from .ingest.manager import ExtractionSettings, FactManager
from .ingest.rules import (DERIVED_METADATA, Draft, Message, clean_text, context_key,
                           derived_metadata, item_keys, normalise_messages)
from .retrieve import search as _search
from .retrieve.filters import compile_filters
from .store.sqlite import CubeRow, SQLiteStore, content_hash, scope_match
from .store.uses import UseCounter
from ._repair import run_pending
from ._tiers import TiersMixin

MAX_TOP_K = 1000


class Memory(TiersMixin):
    """A memory store in one SQLite file, searched by BM25 and vectors together.

    >>> with Memory("memory.db") as m:
    ...     m.add("I moved to Berlin last May", user_id="ann")
    ...     m.search("where does Ann live", user_id="ann")[0].item.content
    'I moved to Berlin last May'

    Options: `embedder` (default: local all-MiniLM-L6-v2), `cube` (default cube name), `actor`
    (recorded in the audit log), `track_access` (count gets and search hits),
    `context_window=(before, after)` (a turn is also indexed with that many neighbours; None turns
    it off) and `context_vectors` (embed those context keys too: better recall, about 4x slower
    ingest; see docs/benchmarks.md), `search_settings` (SearchSettings: fusion weights and
    boosts of search).

    With `llm` (an OpenAIChat or any ChatModel), add() also extracts facts, preferences and
    procedures and keeps them current (ADD / UPDATE / DELETE / NOOP, superseding instead of
    overwriting), and answer() answers from memory. `extraction` (ExtractionSettings) tunes how.
    """

    def __init__(self, path: str | Path = "memstack.db", *, embedder: Embedder | None = None,
                 cube: str = "default", actor: str | None = None,
                 track_access: bool = True,
                 context_window: tuple[int, int] | None = (2, 1),
                 context_vectors: bool = False, llm: ChatModel | None = None,
                 extraction: ExtractionSettings | None = None,
                 search_settings: _search.SearchSettings | None = None) -> None:
        self.path = Path(path)
        self.embedder: Embedder = embedder or LocalEmbedder()
        self.default_cube = _name(cube, "cube")
        self.actor = actor or f"local:{_login()}"
        self.track_access = track_access
        self.context_window = context_window
        self.context_vectors = context_vectors
        self.search_settings = search_settings or _search.SearchSettings()
        self.llm = llm
        self.facts = FactManager(self, llm, extraction) if llm else None
        self.store = SQLiteStore(self.path)
        self._indexes: dict[int, HnswIndex] = {}
        # saved in the background when writes pause, not inside add() (index/saver.py)
        self._saver = IndexSaver(self.store.lock, lambda: list(self._indexes.values()))
        self._uses = UseCounter(self.store)  # access statistics, written once a second
        self._models: dict[str, Any] = {}  # local models and their tiers (_tiers.py)
        self._tiers: dict[str, Any] = {}
        # data repairs an older store needs (what each changed; the CLI and server print it)
        self.repaired: list[dict[str, Any]] = run_pending(self)

    # context and lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Save vector indexes and access statistics, and close the database."""
        self._saver.stop()
        self._uses.flush()
        for index in self._indexes.values():
            index.save()
        self.store.close()

    def flush(self) -> None:
        """Save vector indexes and access statistics now (otherwise at close, after deletes,
        and when writes pause, at most every two minutes; access statistics every second)."""
        self._uses.flush()
        with self.store.lock:
            for index in self._indexes.values():
                index.save()
            self._saver.saved()

    # cubes ------------------------------------------------------------------------------------
    def create_cube(self, name: str, *, owner: str | None = None) -> Cube:
        """Create an empty cube recording this Memory's embedding model."""
        name = _name(name, "cube")
        if any(c.name == name for c in self.cubes()):
            raise InvalidInputError(f"a cube named {name!r} exists already")
        with self.store.transaction():
            self.store.create_cube(name, owner, self.embedder.name, self.embedder.dim)
            self.store.audit(self.actor, "create_cube", name, [])
        return next(c for c in self.cubes() if c.name == name)

    def cubes(self) -> list[Cube]:
        return self.store.cubes()

    def _cube(self, name: str | None, *, create: bool = False, owner: str | None = None,
              check_model: bool = True) -> CubeRow:
        name = _name(name or self.default_cube, "cube")
        try:
            row = self.store.cube(name)
        except CubeNotFoundError:
            if not create:
                raise
            row = self.store.create_cube(name, owner, self.embedder.name, self.embedder.dim)
        if check_model and (row.embed_model, row.embed_dim) != (self.embedder.name,
                                                                self.embedder.dim):
            raise EmbeddingMismatchError(
                f"cube {name!r} was embedded with {row.embed_model} ({row.embed_dim} dims) but "
                f"this Memory uses {self.embedder.name} ({self.embedder.dim} dims). Open it with "
                f"the same embedder, or convert it: memstack --cube {name} reembed")
        return row

    def _index(self, cube: CubeRow) -> HnswIndex:
        index = self._indexes.get(cube.id)
        if index is None:
            index = HnswIndex(Path(f"{self.path}.vec") / f"cube-{cube.id}.hnsw", cube.embed_dim)
            index.open(self.store.live_keys(cube.id), cube.generation,
                       lambda keys: self.store.vectors(cube.id, keys))
            self._indexes[cube.id] = index
        elif index.generation != cube.generation:  # another process wrote: catch up
            index.sync(self.store.live_keys(cube.id), cube.generation,
                       lambda keys: self.store.vectors(cube.id, keys))
        return index

    def _after_write(self, cube: CubeRow, generation: int, added: Sequence[tuple[np.ndarray,
                     np.ndarray]] = (), removed: Iterable[int] = (), save: bool = False) -> None:
        """Apply a committed write to the in-memory vector index (the store already has it)."""
        with self.store.lock:
            self._apply_to_index(cube, generation, added, removed, save)

    def _apply_to_index(self, cube: CubeRow, generation: int,
                        added: Sequence[tuple[np.ndarray, np.ndarray]], removed: Iterable[int],
                        save: bool) -> None:
        index = self._indexes.get(cube.id)
        if index is None:
            return  # opened lazily later, from the store
        if index.generation != generation - 1:
            index.generation = -1  # someone else wrote in between: resync on next use
        try:
            index.remove(removed)
            for keys, vectors in added:
                index.add(keys, vectors)
        except Exception:
            index.generation = -1
            raise
        if index.generation != -1:
            index.generation = generation
        if not save:
            self._saver.wrote()  # saved later, off the write path
            return
        if index.generation == -1:
            index = self._index(self.store.cube(cube.name))
        index.save()

    # writes -----------------------------------------------------------------------------------
    def add(self, messages: Any, *, user_id: str | None = None, agent_id: str | None = None,
            session_id: str | None = None, run_id: str | None = None,
            observed_at: Any = None, metadata: dict[str, Any] | None = None,
            cube: str | None = None, kind: str = "turn", infer: bool = True) -> AddResult:
        """Store messages as turns of a session (or, with kind="fact" etc., as items of that kind).

        `messages` is a string, a message dict {role, content, name?, timestamp?, metadata?} or a
        list. The turns are one transaction. With an LLM configured and `infer` true, facts are
        then extracted from them (at most 2 LLM calls) and applied in a second transaction; the
        result's `extraction` reports the operations, the calls, and any failure (the turns are
        kept whatever the LLM does).

        >>> m.add([{"role": "user", "name": "Ann", "content": "I adopted a cat yesterday"}],
        ...       user_id="ann", session_id="s1", observed_at="2024-05-08").ids
        ['...']
        """
        prepared = self._prepare(messages, user_id=user_id, agent_id=agent_id,
                                 session_id=session_id or run_id, observed_at=observed_at,
                                 metadata=metadata, cube=cube, kind=kind)
        result = self._commit(prepared, self._embed_drafts(prepared.all_drafts))
        return self._infer(result, prepared.cube) if infer and kind == "turn" else result

    def _infer(self, result: AddResult, cube: CubeRow) -> AddResult:
        if self.facts is None:
            return result
        extraction = self.facts.process(self._cube(cube.name), result.items)
        return AddResult(result.items, result.session, extraction)

    def extract(self, memory_ids: Sequence[str]) -> Extraction:
        """Run fact extraction again on stored turns of one session (after a failure, or on
        turns added with infer=False). Needs an LLM.

        >>> m.extract(result.ids).operations
        """
        if self.facts is None:
            raise InvalidInputError("extract() needs an LLM: Memory(..., llm=OpenAIChat(...))")
        turns = [self._live(i)[1] for i in memory_ids]
        if not turns or any(t.kind != "turn" for t in turns) or \
                len({(t.cube, t.user_id, t.agent_id, t.session_id) for t in turns}) != 1:
            raise InvalidInputError("extract() takes the ids of turns of one session")
        return self.facts.process(self._cube(turns[0].cube), turns)

    def add_many(self, requests: Iterable[dict[str, Any]], *, batch_texts: int = 512
                 ) -> list[AddResult]:
        """Several add() calls (each a dict of add's arguments) with embeddings batched across
        them: much faster for bulk loads. Each request is still its own transaction, so a crash
        keeps every request that completed.

        >>> m.add_many([{"messages": "hi", "user_id": "ann"}, {"messages": "yo", "user_id": "bob"}])
        """
        results: list[AddResult] = []
        batch: list[_Prepared] = []
        for request in requests:
            request = dict(request)
            if "run_id" in request:
                request["session_id"] = request.pop("run_id")
            infer = request.pop("infer", True)
            batch.append((self._prepare(request.pop("messages"), **request), infer))
            if sum(len(d.key_texts) for p, _ in batch for d in p.all_drafts) >= batch_texts:
                results += self._commit_batch(batch)
                batch = []
        return results + self._commit_batch(batch)

    def _commit_batch(self, batch: list[tuple["_Prepared", bool]]) -> list[AddResult]:
        vectors = self._embed_drafts([d for p, _ in batch for d in p.all_drafts])
        out, offset = [], 0
        for prepared, infer in batch:
            count = sum(len(d.key_texts) for d in prepared.all_drafts)
            result = self._commit(prepared, vectors[offset:offset + count])
            infer = infer and prepared.kind == "turn"
            out.append(self._infer(result, prepared.cube) if infer else result)
            offset += count
        return out

    def _prepare(self, messages: Any, *, user_id: str | None = None,
                 agent_id: str | None = None, session_id: str | None = None,
                 observed_at: Any = None, metadata: dict[str, Any] | None = None,
                 cube: str | None = None, kind: str = "turn") -> "_Prepared":
        """Validate and draft an add (no writes)."""
        scope = _scope(user_id, agent_id, session_id)
        if kind not in KINDS or kind == "session":
            raise UnknownKindError(f"kind {kind!r} cannot be added; use one of "
                                   f"{', '.join(k for k in KINDS if k != 'session')}")
        msgs = normalise_messages(messages)
        metadata = _metadata(metadata)
        when = parse_time(observed_at, field="observed_at") if observed_at is not None else utcnow()
        cube_row = self._cube(cube, create=True, owner=scope["user_id"] or scope["agent_id"])
        if kind == "turn" and scope["session_id"] is None:
            scope = {**scope, "session_id": f"auto-{uuid.uuid4().hex[:12]}"}
        drafts = [self._draft(kind, m, scope, when, metadata) for m in msgs]
        session_draft = None
        if kind == "turn" and self._session(cube_row, scope) is None:
            session_draft = self._session_draft(scope, drafts[0].fields)
        return _Prepared(cube_row, kind, scope, drafts, session_draft)

    def _commit(self, prepared: "_Prepared", vectors: np.ndarray) -> AddResult:
        """Write a prepared add in one transaction, then update the vector index."""
        drafts, kind, scope = prepared.drafts, prepared.kind, prepared.scope
        with self.store.transaction():
            cube = self._cube(prepared.cube.name, create=True)
            session = self._session(cube, scope) if kind == "turn" else None
            session_added, new_session = [], False
            if prepared.session_draft is not None:
                n = len(prepared.session_draft.key_texts)
                if session is None:  # (another add may have created it since _prepare)
                    [(rowid, item, keys)] = self._insert_all(cube, [prepared.session_draft],
                                                             vectors[:n])
                    session, session_added, new_session = (rowid, item), [keys], True
                vectors = vectors[n:]
            if session is not None:
                self._link(session[1], drafts)
            written = self._insert_all(cube, drafts, vectors)
            removed: list[int] = []
            if session is not None:
                session = self._count_turns(session, [i for _, i, _ in written])
                new_rowids = [rowid for rowid, _, _ in written]
                stale = self._neighbours(session[1].id, new_rowids[0])
                removed, context = self._refresh_context(session[1].id, stale + new_rowids)
                session_added += context
            generation = self.store.bump_generation(cube.id)
            ids = [i.id for _, i, _ in written] + ([session[1].id] if new_session else [])
            self.store.audit(self.actor, "add", cube.name, ids,
                             {"kind": kind, "messages": len(drafts)})
        added = [a for _, _, a in written] + session_added
        self._after_write(cube, generation, added=added, removed=removed)
        return AddResult([i for _, i, _ in written], session[1] if session else None)

    def _draft(self, kind: str, msg: Message, scope: dict[str, str | None], when: datetime,
               metadata: dict[str, Any]) -> Draft:
        speaker = msg.name or msg.role
        observed = msg.timestamp or when
        texts, roles, resolved = item_keys(kind, speaker, msg.content, observed)
        meta = {**metadata, **_metadata(msg.metadata),
                **derived_metadata(kind, speaker, msg.content, resolved)}
        fields = {"id": uuid.uuid4().hex, "kind": kind, "content": msg.content,
                  "content_hash": content_hash(msg.content), "role": msg.role,
                  "speaker": speaker, **scope, "metadata": meta, "observed_at": observed,
                  "valid_from": observed if kind != "turn" else None,
                  "producer": "rules:v1", "status": "active"}
        return Draft(fields, texts, roles)

    def _refresh_context(self, session_item_id: str | None, rowids: Iterable[int]
                         ) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
        """Rebuild the context keys (a turn with its neighbours) of some turns of a session, from
        the session as it is now. Called inside the write transaction of add, update and delete,
        because a turn's neighbours' keys contain its text."""
        wanted = set(rowids)
        if not self.context_window or session_item_id is None or not wanted:
            return [], []
        turns = self.store.select_items("i.parent_id = ? AND i.kind = 'turn' AND "
                                        "i.status = 'active'", (session_item_id,))
        before_n, after_n = self.context_window
        pairs = [(t.speaker or "", t.content or "") for _, t in turns]
        jobs = []
        for n, (rowid, turn) in enumerate(turns):
            if rowid in wanted:
                before, after = pairs[max(0, n - before_n):n], pairs[n + 1:n + 1 + after_n]
                text = context_key(before, pairs[n], after, turn.observed_at) \
                    if before or after else None
                jobs.append((rowid, text))
        removed = [k for rowid, _ in jobs for k in self.store.delete_keys(rowid, "context")]
        jobs = [(rowid, text) for rowid, text in jobs if text]
        if not self.context_vectors:  # text-only keys: BM25 sees the neighbours, no embedding
            for rowid, text in jobs:
                self.store.insert_keys(rowid, [text], ["context"], None)
            return removed, []
        vectors = self.embedder.embed([text for _, text in jobs])
        added = [(np.asarray(self.store.insert_keys(rowid, [text], ["context"], vec[None]),
                             dtype=np.int64), vec[None])
                 for (rowid, text), vec in zip(jobs, vectors)]
        return removed, added

    def _neighbours(self, session_item_id: str | None, rowid: int) -> list[int]:
        """Rowids of the turns whose context window includes this turn (itself included)."""
        if not self.context_window or session_item_id is None:
            return []
        order = [r for r, _ in self.store.select_items(
            "i.parent_id = ? AND i.kind = 'turn' AND i.status = 'active'", (session_item_id,))]
        if rowid not in order:
            return []
        n, (before_n, after_n) = order.index(rowid), self.context_window
        return order[max(0, n - after_n):n + before_n + 1]

    def _session_draft(self, scope: dict[str, str | None], first: dict[str, Any]) -> Draft:
        """The session item for turns whose first has these fields (observed_at, speaker)."""
        header = (f"Conversation session {scope['session_id']} started "
                  f"{first['observed_at']:%-d %B %Y} by {first['speaker']}")
        fields = {"id": uuid.uuid4().hex, "kind": "session", "content": header,
                  "content_hash": content_hash(header), "role": None, "speaker": None, **scope,
                  "metadata": {"turn_count": 0}, "observed_at": first["observed_at"],
                  "producer": "rules:v1", "status": "active"}
        return Draft(fields, [header], ["body"])

    def _embed_drafts(self, drafts: list[Draft]) -> np.ndarray:
        texts = [t for d in drafts for t in d.key_texts]
        vectors = self.embedder.embed(texts)
        if vectors.shape != (len(texts), self.embedder.dim):
            raise EmbeddingMismatchError(f"the embedder returned {vectors.shape}, expected "
                                         f"({len(texts)}, {self.embedder.dim})")
        return vectors

    def _insert_all(self, cube: CubeRow, drafts: list[Draft], vectors: np.ndarray
                    ) -> list[tuple[int, Item, tuple[np.ndarray, np.ndarray]]]:
        """Insert drafts with their keys and first versions: (rowid, item, (keys, vectors))."""
        now, offset, out = utcnow(), 0, []
        for draft in drafts:
            fields = {**draft.fields, "recorded_at": now, "updated_at": now}
            rowid = self.store.insert_item(cube.id, fields)
            vecs = vectors[offset:offset + len(draft.key_texts)]
            keys = self.store.insert_keys(rowid, draft.key_texts, draft.key_roles, vecs)
            offset += len(draft.key_texts)
            item = self.store.items_by_rowid([rowid])[rowid]
            self.store.add_version(rowid, item, "add", self.actor)
            out.append((rowid, item, (np.asarray(keys, dtype=np.int64), vecs)))
        return out

    @staticmethod
    def _link(session: Item, drafts: list[Draft]) -> None:
        """Point turns at their session item and number them within it."""
        start = session.metadata.get("turn_count", 0)
        for n, draft in enumerate(drafts):
            draft.fields["parent_id"] = session.id
            draft.fields["metadata"] = {**draft.fields["metadata"], "turn_index": start + n}

    def _count_turns(self, session: tuple[int, Item], turns: list[Item]) -> tuple[int, Item]:
        rowid, item = session
        times = [t.observed_at for t in turns if t.observed_at]
        last = item.metadata.get("last_observed_at")
        if last:
            times.append(parse_time(last))
        meta = {**item.metadata, "turn_count": item.metadata.get("turn_count", 0) + len(turns),
                "last_observed_at": max(times).isoformat() if times else None}
        self.store.update_item(rowid, {"metadata": meta, "updated_at": utcnow()})
        return rowid, self.store.items_by_rowid([rowid])[rowid]

    def _session(self, cube: CubeRow, scope: dict[str, str | None]) -> tuple[int, Item] | None:
        """The session item of a whole scope: cube, user, agent and session id (two users who
        pick the same session id have two sessions; `IS` matches a missing user or agent)."""
        if scope["session_id"] is None:
            return None
        rows = self.store.select_items(
            "i.cube_id = ? AND i.session_id = ? AND i.user_id IS ? AND i.agent_id IS ? AND "
            "i.kind = 'session' AND i.status != 'deleted'",
            (cube.id, scope["session_id"], scope["user_id"], scope["agent_id"]), limit=1)
        return rows[0] if rows else None

    def _rowid(self, item_id: str) -> int:
        found = self.store.item_by_id(item_id)
        if found is None:
            raise ItemNotFoundError(f"no memory with id {item_id!r}")
        return found[0]

    def update(self, memory_id: str, data: Any, *, metadata: dict[str, Any] | None = None,
               reason: str = "update") -> Item:
        """Write a new version of an item's text (the old one stays in history()).

        >>> m.update(item_id, "Ann lives in Berlin").version
        2
        """
        text = clean_text(data, what="data")
        reason = clean_text(reason, what="reason")
        rowid, item = self._live(memory_id)
        cube = self._cube(item.cube)
        texts, roles, resolved = item_keys(item.kind, item.speaker, text, item.observed_at)
        vectors = self.embedder.embed(texts)
        meta = {k: v for k, v in {**item.metadata, **_metadata(metadata)}.items()
                if k not in DERIVED_METADATA}
        meta.update(derived_metadata(item.kind, item.speaker, text, resolved))
        with self.store.transaction():
            rowid, item = self._live(memory_id)
            removed = self.store.delete_keys(rowid)
            keys = self.store.insert_keys(rowid, texts, roles, vectors)
            self.store.update_item(rowid, {"content": text, "content_hash": content_hash(text),
                                           "metadata": meta, "version": item.version + 1,
                                           "updated_at": utcnow()})
            updated = self.store.items_by_rowid([rowid])[rowid]
            self.store.add_version(rowid, updated, reason, self.actor)
            gone, context = self._refresh_context(item.parent_id if item.kind == "turn" else None,
                                                  self._neighbours(item.parent_id, rowid))
            generation = self.store.bump_generation(cube.id)
            self.store.audit(self.actor, "update", cube.name, [memory_id], {"reason": reason})
        self._after_write(cube, generation, added=[(np.asarray(keys), vectors), *context],
                          removed=removed + gone)
        return updated

    def delete(self, memory_id: str, *, reason: str = "delete", cascade: bool = True) -> int:
        """Delete an item: a tombstone stays; its text leaves the database, indexes and history.

        Deleting a session item deletes its turns too. With `cascade` (the default), facts
        derived from a deleted item (it is in their source_ids) are deleted as well, since they
        carry what it said. Returns the number of items deleted.
        """
        rowid, item = self._live(memory_id)
        return self._purge(self._cube(item.cube, check_model=False), [memory_id], reason,
                           "delete", cascade)

    def delete_all(self, *, user_id: str | None = None, agent_id: str | None = None,
                   session_id: str | None = None, run_id: str | None = None,
                   cube: str | None = None, cascade: bool = True) -> int:
        """Delete every item of a scope; at least one of user_id, agent_id, session_id is needed.
        With `cascade`, facts derived from those items go too (see delete())."""
        scope = _scope(user_id, agent_id, session_id or run_id)
        if not any(scope.values()):
            raise InvalidInputError("delete_all needs user_id, agent_id or session_id; "
                                    "use reset() to delete everything")
        cube_row = self._cube(cube, check_model=False)
        where, params = self._where([cube_row], scope, None, None, None, None, None)
        ids = [item.id for _, item in self.store.select_items(where, params)]
        return self._purge(cube_row, ids, "delete_all", "delete_all", cascade) if ids else 0

    def _purge(self, cube: CubeRow, ids: list[str], reason: str, action: str,
               cascade: bool = True) -> int:
        neighbours: dict[str, set[int]] = {}
        removed: list[int] = []
        purged: list[str] = []
        added: list[tuple[np.ndarray, np.ndarray]] = []
        with self.store.transaction():
            pending = list(ids)
            while pending:  # rounds: the items, then facts derived from them, and so on
                start = len(purged)
                self._tombstone_all(pending, purged, removed, neighbours, reason)
                pending = self.store.derived_from(cube.id, purged[start:]) if cascade else []
            for session_item_id, rowids in neighbours.items():  # their context keys held the text
                gone, context = self._refresh_context(session_item_id, rowids)
                removed += gone
                added += context
            self.store.compact_text_index()
            generation = self.store.bump_generation(cube.id)
            self.store.audit(self.actor, action, cube.name, purged, {"reason": reason})
        if cube.id not in self._indexes:
            self._index(self.store.cube(cube.name))
        self._after_write(cube, generation, removed=removed, added=added, save=True)
        self.store.checkpoint()
        return len(purged)

    def _tombstone_all(self, ids: list[str], purged: list[str], removed: list[int],
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
                    "i.parent_id = ? AND i.status != 'deleted'", (item.id,)))
            elif item.kind == "turn" and item.parent_id:
                neighbours.setdefault(item.parent_id, set()).update(
                    self._neighbours(item.parent_id, rowid))
            removed += self.store.delete_keys(rowid)
            self.store.purge_versions(rowid)
            self.store.update_item(rowid, {"content": None, "content_hash": None,
                                           "metadata": {}, "tags": [], "status": "deleted",
                                           "updated_at": utcnow(), "version": item.version + 1})
            tomb = self.store.items_by_rowid([rowid])[rowid]
            self.store.add_version(rowid, tomb, reason, self.actor)
            purged.append(item_id)
            done.add(item_id)

    def reset(self) -> None:
        """Delete every item of every cube (the audit log keeps its record of what happened)."""
        for cube in self.cubes():
            row = self._cube(cube.name, check_model=False)
            ids = [i.id for _, i in self.store.select_items(
                "i.cube_id = ? AND i.status != 'deleted'", (row.id,))]
            if ids:
                self._purge(row, ids, "reset", "reset")

    def reembed(self, cube: str | None = None, *, batch_size: int = 256) -> int:
        """Recompute every search key of a cube with this Memory's embedder, record the model,
        and rebuild the vector index. Returns the number of keys written."""
        row = self._cube(cube, check_model=False)
        items = self.store.select_items("i.cube_id = ? AND i.status != 'deleted'", (row.id,))
        bodies = []
        for start in range(0, len(items), batch_size):
            part = items[start:start + batch_size]
            keyed = [(rowid, *item_keys(i.kind, i.speaker, i.content or "", i.observed_at)[:2])
                     for rowid, i in part]
            vectors = iter(self.embedder.embed([t for _, texts, _ in keyed for t in texts]))
            bodies += [(rowid, texts, roles, np.stack([next(vectors) for _ in texts]))
                       for rowid, texts, roles in keyed]
        with self.store.transaction():
            for rowid, texts, roles, vectors in bodies:
                self.store.delete_keys(rowid)
                self.store.insert_keys(rowid, texts, roles, vectors)
            for _, item in items:
                if item.kind == "session":
                    turns = self.store.select_items("i.parent_id = ?", (item.id,))
                    self._refresh_context(item.id, [r for r, _ in turns])
            self.store.set_cube_model(row.id, self.embedder.name, self.embedder.dim)
            self.store.bump_generation(row.id)
            count = len(self.store.live_keys(row.id))
            self.store.audit(self.actor, "reembed", row.name, [], {"model": self.embedder.name,
                                                                   "keys": count})
        self._indexes.pop(row.id, None)
        for suffix in (".hnsw", ".json"):
            Path(f"{self.path}.vec", f"cube-{row.id}{suffix}").unlink(missing_ok=True)
        self._index(self._cube(row.name)).save()
        return count

    # reads ------------------------------------------------------------------------------------
    def _live(self, memory_id: str) -> tuple[int, Item]:
        if not isinstance(memory_id, str) or not memory_id:
            raise InvalidInputError(f"a memory id is a non-empty string, got {memory_id!r}")
        found = self.store.item_by_id(memory_id)
        if found is None or found[1].status == "deleted":
            state = "was deleted" if found else "does not exist"
            raise ItemNotFoundError(f"memory {memory_id!r} {state}; list ids with `memstack list`")
        return found

    def get(self, memory_id: str) -> Item:
        """One item by id; deleted items raise ItemNotFoundError."""
        _, item = self._live(memory_id)
        if not self.track_access:
            return item
        self._uses.touch([memory_id])
        count, last = self._uses.pending(memory_id)  # counted even before they are written
        if count:
            item = dataclasses.replace(item, access_count=item.access_count + count,
                                       last_accessed=datetime.fromtimestamp(last, timezone.utc))
        return item

    def get_all(self, *, user_id: str | None = None, agent_id: str | None = None,
                session_id: str | None = None, run_id: str | None = None,
                cube: str | None = None, kinds: Sequence[str] | None = None,
                filters: dict[str, Any] | None = None, include_inactive: bool = False,
                limit: int = 100, offset: int = 0) -> list[Item]:
        """Items of a scope, oldest first (never deleted ones)."""
        limit = _limit(limit, "limit", maximum=100_000)
        if not isinstance(offset, int) or offset < 0:
            raise InvalidLimitError(f"offset must be a non-negative integer, got {offset!r}")
        cube_rows = self._cubes_for(cube)
        if not cube_rows:
            return []
        where, params = self._where(cube_rows, _scope(user_id, agent_id, session_id or run_id),
                                    kinds, filters, None, None, None)
        if include_inactive:
            where = where.replace("i.status = 'active'", "i.status != 'deleted'")
        rows = self.store.select_items(where, params, order="i.observed_at, i.rowid",
                                       limit=limit, offset=offset)
        return [item for _, item in rows]

    def history(self, memory_id: str) -> list[Version]:
        """Every version of an item with its time and reason, oldest first."""
        if not isinstance(memory_id, str) or not memory_id:
            raise InvalidInputError(f"a memory id is a non-empty string, got {memory_id!r}")
        found = self.store.item_by_id(memory_id)
        if found is None:
            raise ItemNotFoundError(f"no memory with id {memory_id!r}")
        return self.store.versions(found[0], memory_id)

    def search(self, query: str, *, user_id: str | None = None, agent_id: str | None = None,
               session_id: str | None = None, run_id: str | None = None,
               cube: str | Sequence[str] | None = None, kinds: Sequence[str] | None = None,
               filters: dict[str, Any] | None = None, since: Any = None, until: Any = None,
               as_of: Any = None, top_k: int = 10, limit: int | None = None,
               threshold: float | None = None) -> list[Hit]:
        """Hybrid search (BM25 + vectors, fused) within a scope; results never cross it.

        >>> [h.item.content for h in m.search("cat", user_id="ann", top_k=3)]
        ['I adopted a cat yesterday']
        """
        hits = self._find(query, user_id=user_id, agent_id=agent_id,
                          session_id=session_id or run_id, cube=cube, kinds=kinds,
                          filters=filters, since=since, until=until, as_of=as_of,
                          top_k=limit if limit is not None else top_k)
        if threshold is not None:
            hits = [h for h in hits if h.score >= threshold]
        if self.track_access and hits:
            self._uses.touch([h.item.id for h in hits])
        return hits

    def _find(self, query: str, *, user_id: str | None = None, agent_id: str | None = None,
              session_id: str | None = None, cube: str | Sequence[str] | None = None,
              kinds: Sequence[str] | None = None, filters: dict[str, Any] | None = None,
              since: Any = None, until: Any = None, as_of: Any = None, top_k: int = 10,
              exact: Sequence[str] = ()) -> list[Hit]:
        """search() without access tracking: for memstack's own look-ups. Scope fields named in
        `exact` match a missing value too (None means "none", not "any")."""
        top_k = _limit(top_k, "top_k", maximum=MAX_TOP_K)
        as_of_t = parse_time(as_of, field="as_of") if as_of is not None else None
        query_obj = _search.analyse(query, now=as_of_t or utcnow())
        cube_rows = self._cubes_for(cube)
        if not cube_rows:
            return []
        if kinds is None:  # session headers are structure, not memories: only on request
            kinds = [k for k in KINDS if k != "session"]
        scope = _scope(user_id, agent_id, session_id)
        where, params = self._where(cube_rows, scope, kinds, filters, since, until, as_of_t,
                                    exact=exact)
        qvec = embed_query(self.embedder, query_obj.text)  # outside the lock: the slow part
        narrow = any(scope.values()) or bool(filters) or since is not None or until is not None
        with self.store.lock:  # one connection and index, shared by threads (the server)
            indexes = [self._index(c) for c in cube_rows]
            others = self.store.cube_count() > len(cube_rows)
            return _search.hybrid(self.store, indexes, query_obj, qvec, where, params, top_k,
                                  scope=scope_match([c.id for c in cube_rows], scope,
                                                    other_cubes=others), narrow=narrow,
                                  settings=self.search_settings)

    def answer(self, question: str, *, user_id: str | None = None,
               agent_id: str | None = None, session_id: str | None = None,
               run_id: str | None = None, cube: str | Sequence[str] | None = None,
               kinds: Sequence[str] | None = None, as_of: Any = None, top_k: int = 30,
               max_context_tokens: int = 2000, max_tokens: int = 200) -> Answer:
        """Answer a question from memory with the LLM: search the scope, put the best hits that
        fit `max_context_tokens` into the prompt, and return the answer with their ids.

        >>> m.answer("Where does Ann live?", user_id="ann").text
        'Berlin'
        """
        from .retrieve import answer as _answer

        if self.llm is None:
            raise InvalidInputError("answer() needs an LLM: Memory(..., llm=OpenAIChat(...))")
        question = clean_text(question, what="question")
        if not isinstance(max_context_tokens, int) or max_context_tokens < 50:
            raise InvalidLimitError("max_context_tokens must be an integer of at least 50")
        hits = self.search(question, user_id=user_id, agent_id=agent_id,
                           session_id=session_id or run_id, cube=cube, kinds=kinds,
                           as_of=as_of, top_k=top_k)
        used, context, tokens = _answer.pack(hits, max_context_tokens)
        now = parse_time(as_of, field="as_of") if as_of is not None else utcnow()
        reply = self.llm.complete(_answer.messages(question, context, now), max_tokens=max_tokens,
                                  stop=_answer.STOP)
        return Answer(reply.text.strip(), [h.item.id for h in used], tokens, reply.prompt_tokens,
                      reply.completion_tokens, round(reply.seconds, 3), used)

    def _cubes_for(self, cube: str | Sequence[str] | None) -> list[CubeRow]:
        if cube is None:
            try:
                return [self._cube(None)]
            except CubeNotFoundError:
                return []  # nothing stored yet
        names = [cube] if isinstance(cube, str) else list(cube)
        return [self._cube(n) for n in names]

    def _where(self, cubes: list[CubeRow], scope: dict[str, str | None],
               kinds: Sequence[str] | None, filters: dict[str, Any] | None, since: Any,
               until: Any, as_of: datetime | None, *, exact: Sequence[str] = ()
               ) -> tuple[str, list[Any]]:
        parts = [f"i.cube_id IN ({', '.join(str(c.id) for c in cubes)})"]
        params: list[Any] = []
        if as_of is None:
            parts.append("i.status = 'active'")
        else:
            t = as_of.timestamp()
            # valid time: what was true (or had been said) at `as_of`
            parts.append("i.status != 'deleted' AND "
                         "coalesce(i.valid_from, i.observed_at, i.recorded_at) <= ? AND "
                         "(i.valid_to IS NULL OR i.valid_to > ?)")
            params += [t, t]
        for name, value in scope.items():
            if value is not None:
                parts.append(f"i.{name} = ?")
                params.append(value)
            elif name in exact:
                parts.append(f"i.{name} IS NULL")
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else list(kinds)
            unknown = [k for k in kinds if k not in KINDS]
            if unknown or not kinds:
                raise UnknownKindError(f"unknown kinds {unknown or kinds}; use {', '.join(KINDS)}")
            parts.append(f"i.kind IN ({', '.join('?' * len(kinds))})")
            params += kinds
        for bound, op in ((since, ">="), (until, "<")):
            if bound is not None:
                parts.append(f"i.observed_at {op} ?")
                params.append(parse_time(bound, field="since/until").timestamp())
        sql, values = compile_filters(filters)
        parts.append(sql)
        return " AND ".join(parts), params + values

    # export, import and inspection ----------------------------------------------------------------
    def export(self, cube: str | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a cube that is not deleted, as dicts (JSONL-ready), oldest first."""
        row = self._cube(cube, check_model=False)
        for _, item in self.store.select_items("i.cube_id = ? AND i.status != 'deleted'",
                                               (row.id,)):
            yield item.to_dict()

    def import_conversation(self, data: dict[str, Any], *, user_id: str | None = None,
                            agent_id: str | None = None, cube: str | None = None,
                            infer: bool = False) -> dict[str, str]:
        """Import a conversation file ({"sessions": [{"id", "date", "turns": [...]}]}, see
        docs/conversations.md). Each session is one add() (with fact extraction when `infer`
        and an LLM is configured); returns {turn id: memory id}."""
        from .ingest.conversation import sessions

        mapping: dict[str, str] = {}
        parsed = sessions(data)
        results = self.add_many({"messages": s.messages, "user_id": user_id, "agent_id": agent_id,
                                 "session_id": s.id, "observed_at": s.date, "cube": cube,
                                 "metadata": s.metadata, "infer": infer} for s in parsed)
        for session, result in zip(parsed, results):
            for turn_id, item in zip(session.turn_ids, result.items):
                if turn_id is not None:
                    mapping[turn_id] = item.id
        return mapping

    def audit_log(self, *, limit: int = 100, since_seq: int = 0) -> list[AuditEntry]:
        return self.store.audit_log(_limit(limit, "limit", maximum=100_000), since_seq)

    def stats(self) -> dict[str, Any]:
        out = self.store.stats()
        out["cubes"] = [c.to_dict() for c in self.cubes()]
        out["embedder"] = {"name": self.embedder.name, "dim": self.embedder.dim}
        return out


@dataclass
class _Prepared:
    """An add() validated and drafted, waiting for its vectors and its transaction."""

    cube: CubeRow
    kind: str
    scope: dict[str, str | None]
    drafts: list[Draft]
    session_draft: Draft | None

    @property
    def all_drafts(self) -> list[Draft]:
        return ([self.session_draft] if self.session_draft else []) + self.drafts
