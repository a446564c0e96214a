"""Memory and AsyncMemory: the public facade. The logic lives here once; AsyncMemory runs it in a
worker thread. Method and argument names follow mem0 where they make sense (run_id = session_id,
limit = top_k, data = new text), so mem0 users can switch.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ._errors import (InvalidInputError, InvalidLimitError, ItemNotFoundError,
                      UnknownKindError)
from ._models import (KINDS, UNADDABLE, AddResult, Answer, AuditEntry, Cube, Extraction, Hit, Item,
                      RetentionRule, Version, utcnow)
from ._time import parse_time
from ._validate import limit as _limit
from ._validate import login as _login
from ._validate import metadata as _metadata
from ._validate import name as _name
from ._validate import scope as _scope
from .embed import Embedder, LocalEmbedder
from .llm import ChatModel
from .ingest.manager import ExtractionSettings, FactManager
from .ingest.rules import (DERIVED_METADATA, clean_text, derived_metadata, item_keys,
                           normalise_messages)
from .retrieve.feedback import FeedbackSettings
from .retrieve.search import SearchSettings
from .retrieve.searcher import MAX_TOP_K, Searcher, selection
from .govern import archive, backup, chain, retention
from .govern import receipt as receipts
from .govern.chain import ChainReport
from .store.base import CubeRow
from .store.cubes import Cubes
from .store.selection import Selection
from .store import is_url, open_store
from .store.uses import UseCounter
from .write.drafts import Prepared, message_draft, session_draft, stored_keys
from .write.repair import run_pending
from .write.writer import Writer
from ._learn import LearnMixin
from ._tiers import TiersMixin

__all__ = ["Memory", "MAX_TOP_K"]


class Memory(TiersMixin, LearnMixin):
    """Memory in one SQLite file (a path) or a PostgreSQL database (a postgresql:// URL),
    searched by BM25 and vectors together.

    >>> with Memory("memory.db") as m:
    ...     m.add("I moved to Berlin last May", user_id="ann")
    ...     m.search("where does Ann live", user_id="ann")[0].item.content
    'I moved to Berlin last May'

    Options: `embedder` (default: local all-MiniLM-L6-v2), `cube` (default cube name), `actor`
    (recorded in the audit log), `track_access` (count gets and search hits),
    `context_window=(before, after)` (a turn is also indexed with that many neighbours; None turns
    it off) and `context_vectors` (embed those context keys too: better recall, about 4x slower
    ingest; see docs/benchmarks.md), `search_settings` (SearchSettings: fusion weights and
    boosts of search), `feedback_settings` (FeedbackSettings: how much feedback moves results,
    retrieve/feedback.py). `files`: where a PostgreSQL store keeps the tiers' files (KV blocks,
    shards); an SQLite store keeps them beside its file. `read_only` (a PostgreSQL read
    replica's URL): searches, gets and lists work, the schema is checked but never migrated,
    access statistics are not kept, and every write raises ReadOnlyStoreError.

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
                 search_settings: SearchSettings | None = None,
                 feedback_settings: FeedbackSettings | None = None,
                 files: str | Path | None = None, read_only: bool = False) -> None:
        self.url = path if is_url(path) else None  # with its password: for worker processes
        self.embedder: Embedder = embedder or LocalEmbedder()
        self.default_cube = _name(cube, "cube")
        self.actor = actor or f"local:{_login()}"
        self.track_access = track_access and not read_only
        self.llm = llm
        self.store = open_store(path, files=files, read_only=read_only)
        self.path = self.store.path
        self.location: str = self.store.location  # where the store is, without a password
        self._cubes = Cubes(self.store, self.embedder.name, self.embedder.dim, self.default_cube)
        self.writer = Writer(self.store, self._cubes, self.embedder, self.actor,
                             context_window=context_window, context_vectors=context_vectors)
        self.searcher = Searcher(self.store, self._cubes, self.embedder, search_settings,
                                 feedback_settings)
        self.facts = FactManager(self.writer, self.searcher, llm, extraction) if llm else None
        self._uses = UseCounter(self.store)  # access statistics, written once a second
        self._models: dict[str, Any] = {}  # local models and their tiers (_tiers.py)
        self._tiers: dict[str, Any] = {}
        # data repairs an older store needs (what each changed; the CLI and server print it)
        self.repaired: list[dict[str, Any]] = [] if read_only else \
            run_pending(self.store, self.writer)

    @property
    def search_settings(self) -> SearchSettings:
        return self.searcher.settings

    @property
    def context_window(self) -> tuple[int, int] | None:
        return self.writer.context_window

    # context and lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Save vector indexes and access statistics, and close the database."""
        self._uses.flush()
        self.store.close()

    def use_embedder(self, embedder: Embedder) -> None:
        """Swap in a wrapper of this Memory's embedder (a server's batching or query cache):
        it must be the same model, name and dimension, since the stored vectors are its."""
        if (embedder.name, embedder.dim) != (self.embedder.name, self.embedder.dim):
            raise InvalidInputError(f"the embedder {embedder.name} ({embedder.dim}) is not "
                                    f"{self.embedder.name} ({self.embedder.dim})")
        self.embedder = self.writer.embedder = self.searcher.embedder = embedder

    def flush(self) -> None:
        """Save vector indexes and access statistics now (otherwise at close, after deletes,
        and when writes pause, at most every two minutes; access statistics every second)."""
        self._uses.flush()
        self.store.flush()

    # cubes ------------------------------------------------------------------------------------
    def create_cube(self, name: str, *, owner: str | None = None, exist_ok: bool = False
                    ) -> Cube:
        """Create an empty cube recording this Memory's embedding model. With `exist_ok`, a
        cube of that name already there (made meanwhile by another process) is no error."""
        name = _name(name, "cube")
        if any(c.name == name for c in self.cubes()):
            if exist_ok:
                return next(c for c in self.cubes() if c.name == name)
            raise InvalidInputError(f"a cube named {name!r} exists already")
        with self.store.transaction():
            self.store.create_cube(name, owner, self.embedder.name, self.embedder.dim)
            self.store.audit(self.actor, "create_cube", name, [])
        return next(c for c in self.cubes() if c.name == name)

    def cubes(self) -> list[Cube]:
        return self.store.cubes()

    # writes -----------------------------------------------------------------------------------
    def add(self, messages: Any, *, user_id: str | None = None, agent_id: str | None = None,
            session_id: str | None = None, run_id: str | None = None,
            observed_at: Any = None, metadata: dict[str, Any] | None = None,
            cube: str | None = None, kind: str = "turn", infer: bool = True,
            expires_at: Any = None, ttl: Any = None) -> AddResult:
        """Store messages as turns of a session (or, with kind="fact" etc., as items of that kind).

        `messages` is a string, a message dict {role, content, name?, timestamp?, metadata?} or a
        list. The turns are one transaction. With an LLM configured and `infer` true, facts are
        then extracted from them (at most 2 LLM calls) and applied in a second transaction; the
        result's `extraction` reports the operations, the calls, and any failure (the turns are
        kept whatever the LLM does).

        `expires_at` (a time) or `ttl` (seconds, or a duration such as "30d"): the items leave
        search then, and `memstack maintain` archives them (and purges them when the cube has
        a purge_after rule for their kind, govern/retention.py); `as_of` searches before that
        time still see them.

        >>> m.add([{"role": "user", "name": "Ann", "content": "I adopted a cat yesterday"}],
        ...       user_id="ann", session_id="s1", observed_at="2024-05-08").ids
        ['...']
        """
        prepared = self._prepare(messages, user_id=user_id, agent_id=agent_id,
                                 session_id=session_id or run_id, observed_at=observed_at,
                                 metadata=metadata, cube=cube, kind=kind,
                                 expires_at=expires_at, ttl=ttl)
        return self._commit(prepared, self.writer.embed(prepared.all_drafts), infer)

    def _commit(self, prepared: Prepared, vectors: np.ndarray, infer: bool) -> AddResult:
        items, session = self.writer.commit(prepared, vectors)
        result = AddResult(items, session)
        if not infer or prepared.kind != "turn" or self.facts is None:
            return result
        extraction = self.facts.process(self._cubes.get(prepared.cube.name), items)
        return AddResult(items, session, extraction)

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
        return self.facts.process(self._cubes.get(turns[0].cube), turns)

    def add_many(self, requests: Iterable[dict[str, Any]], *, batch_texts: int = 512
                 ) -> list[AddResult]:
        """Several add() calls (each a dict of add's arguments) with embeddings batched across
        them: much faster for bulk loads. Each request is still its own transaction, so a crash
        keeps every request that completed.

        >>> m.add_many([{"messages": "hi", "user_id": "ann"}, {"messages": "yo", "user_id": "bob"}])
        """
        results: list[AddResult] = []
        batch: list[tuple[Prepared, bool]] = []
        for request in requests:
            request = dict(request)
            if "run_id" in request:
                request["session_id"] = request.pop("run_id")
            infer = request.pop("infer", True)
            batch.append((self._prepare(request.pop("messages"), **request), infer))
            if sum(p.key_count for p, _ in batch) >= batch_texts:
                results += self._commit_batch(batch)
                batch = []
        return results + self._commit_batch(batch)

    def _commit_batch(self, batch: list[tuple[Prepared, bool]]) -> list[AddResult]:
        vectors = self.writer.embed([d for p, _ in batch for d in p.all_drafts])
        out, offset = [], 0
        for prepared, infer in batch:
            count = prepared.key_count
            out.append(self._commit(prepared, vectors[offset:offset + count], infer))
            offset += count
        return out

    def _prepare(self, messages: Any, *, user_id: str | None = None,
                 agent_id: str | None = None, session_id: str | None = None,
                 observed_at: Any = None, metadata: dict[str, Any] | None = None,
                 cube: str | None = None, kind: str = "turn", expires_at: Any = None,
                 ttl: Any = None) -> Prepared:
        """Validate and draft an add (no writes)."""
        scope = _scope(user_id, agent_id, session_id)
        expiry = retention.expiry(expires_at, ttl)
        if kind not in KINDS or kind in UNADDABLE:
            raise UnknownKindError(f"kind {kind!r} cannot be added; use one of "
                                   f"{', '.join(k for k in KINDS if k not in UNADDABLE)}"
                                   + (" (feedback: Memory.feedback)" if kind == "feedback"
                                      else ""))
        msgs = normalise_messages(messages)
        metadata = _metadata(metadata)
        when = parse_time(observed_at, field="observed_at") if observed_at is not None else utcnow()
        cube_row = self._cubes.get(cube, create=True, owner=scope["user_id"] or scope["agent_id"])
        if kind == "turn" and scope["session_id"] is None:
            scope = {**scope, "session_id": f"auto-{uuid.uuid4().hex[:12]}"}
        drafts = [message_draft(kind, m, scope, when, metadata, expiry) for m in msgs]
        first = None
        if kind == "turn" and self.store.session_item(cube_row.id, scope) is None:
            first = session_draft(scope, drafts[0].fields)
        return Prepared(cube_row, kind, scope, drafts, first)

    def update(self, memory_id: str, data: Any, *, metadata: dict[str, Any] | None = None,
               reason: str = "update") -> Item:
        """Write a new version of an item's text (the old one stays in history()).

        >>> m.update(item_id, "Ann lives in Berlin").version
        2
        """
        text = clean_text(data, what="data")
        reason = clean_text(reason, what="reason")
        _, item = self._live(memory_id)
        self._cubes.get(item.cube)  # same embedder, or a clear error before any work
        texts, roles, resolved = item_keys(item.kind, item.speaker, text, item.observed_at)
        meta = {k: v for k, v in {**item.metadata, **_metadata(metadata)}.items()
                if k not in DERIVED_METADATA}
        meta.update(derived_metadata(item.kind, item.speaker, text, resolved))
        return self.writer.rewrite(memory_id, text, (texts, roles), meta, reason)

    def delete(self, memory_id: str, *, reason: str = "delete", cascade: bool = True,
               receipt: bool = False) -> Any:
        """Delete an item: a tombstone stays; its text leaves the database, indexes and history.

        Deleting a session item deletes its turns too. With `cascade` (the default), facts
        derived from a deleted item (it is in their source_ids) are deleted as well, since they
        carry what it said. Returns the number of items deleted; with `receipt`, a receipt
        (govern/receipt.py) of what was checked afterwards and found clean in every tier, and
        of the backups and archives written while it existed.

        >>> m.delete(item_id, receipt=True)["clean"]
        True"""
        _, item = self._live(memory_id)
        cube = self._cubes.get(item.cube, check_model=False)
        before = receipts.capture(self.store, cube.id, [memory_id], cascade) if receipt else None
        purged: list[str] = []
        count = self.writer.purge(cube, [memory_id], reason, "delete", cascade, into=purged)
        if item.kind == "feedback":
            self._undo_feedback(cube.name, item, purged)
        if before is None:
            return count
        out = receipts.check(self.store, cube.name, before)
        with self.store.transaction():
            self.store.audit(self.actor, "deletion_receipt", cube.name, out["deleted"], {
                "clean": out["clean"], "copies_still_holding": [
                    c["file"] for c in out["copies_still_holding"]]})
        return out

    def delete_all(self, *, user_id: str | None = None, agent_id: str | None = None,
                   session_id: str | None = None, run_id: str | None = None,
                   cube: str | None = None, cascade: bool = True) -> int:
        """Delete every item of a scope; at least one of user_id, agent_id, session_id is needed.
        With `cascade`, facts derived from those items go too (see delete())."""
        scope = _scope(user_id, agent_id, session_id or run_id)
        if not any(scope.values()):
            raise InvalidInputError("delete_all needs user_id, agent_id or session_id; "
                                    "use reset() to delete everything")
        cube_row = self._cubes.get(cube, check_model=False)
        sel = Selection.of(cube_ids=[cube_row.id], scope=scope)
        ids = [item.id for _, item in self.store.select_items(sel)]
        with self.store.transaction():  # the scope's questions, recorded for feedback
            self.store.drop_answers(cube_row.id, scope)
        return self.writer.purge(cube_row, ids, "delete_all", "delete_all", cascade) if ids else 0

    def reset(self) -> None:
        """Delete every item of every cube (the audit log keeps its record of what happened)."""
        for cube in self.cubes():
            row = self._cubes.get(cube.name, check_model=False)
            ids = [i.id for _, i in self.store.select_items(_everything(row))]
            with self.store.transaction():
                self.store.drop_answers(row.id, {})
            if ids:
                self.writer.purge(row, ids, "reset", "reset")

    # retention (govern/retention.py) ----------------------------------------------------------
    def retention(self, cube: str | None = None) -> list[RetentionRule]:
        """The retention rules of a cube (None: of every cube)."""
        return self._retainer().rules(self._cubes.get(cube, check_model=False)
                                      if cube is not None else None)

    def set_retention(self, cube: str | None = None, kind: str = "*", *,
                      expire_after: Any = None, archive_unused: Any = None,
                      purge_after: Any = None, confirm: bool = False,
                      actor: str | None = None) -> dict[str, Any]:
        """Set a cube's retention rule for a kind ("*": its kinds without a rule of their own);
        durations are seconds or text such as "30d"; all None removes the rule. A rule set
        that would take every item of the cube out of search needs `confirm`
        (ConfirmationRequiredError otherwise). Returns the rule and what the next run does.
        `actor`: who sets it, when not this Memory's actor (the server names the key's user).

        >>> m.set_retention("support", "turn", expire_after="90d", purge_after="30d")["rule"]
        """
        return self._retainer(actor).set(self._cubes.get(cube, check_model=False), kind,
                                    expire_after=expire_after, archive_unused=archive_unused,
                                    purge_after=purge_after, confirm=confirm)

    def apply_retention(self, *, cube: str | None = None, dry_run: bool = False,
                        now: Any = None) -> "retention.RetentionReport":
        """Expire, archive and purge what the rules and items' expiry say (maintain does this
        too); with `dry_run`, only report it. `now`: another time than now (a time)."""
        at = parse_time(now, field="now").timestamp() if now is not None else None
        cubes = [self._cubes.get(cube, check_model=False)] if cube is not None else None
        return self._retainer().apply(now=at, cubes=cubes, dry_run=dry_run)

    def _retainer(self, actor: str | None = None) -> "retention.Retention":
        self._uses.flush()  # reads not yet written keep an item from looking unused
        return retention.Retention(self.store, self.writer.purge, actor or self.actor,
                                   self.writer.forget_context)

    def reembed(self, cube: str | None = None, *, batch_size: int = 256) -> int:
        """Recompute every search key of a cube with this Memory's embedder, record the model,
        and rebuild the vector index. Returns the number of keys written."""
        row = self._cubes.get(cube, check_model=False)
        items = self.store.select_items(_everything(row))
        bodies = []
        for start in range(0, len(items), batch_size):
            part = items[start:start + batch_size]
            keyed = [(rowid, *stored_keys(i)) for rowid, i in part]
            vectors = iter(self.embedder.embed([t for _, texts, _ in keyed for t in texts]))
            bodies += [(rowid, texts, roles, np.stack([next(vectors) for _ in texts]))
                       for rowid, texts, roles in keyed]
        with self.store.transaction():
            self.store.delete_keys([rowid for rowid, *_ in bodies])
            self.store.insert_keys(bodies)
            for _, item in items:
                if item.kind == "session":
                    turns = self.store.select_items(Selection(status="any", parent_id=item.id))
                    self.writer.refresh_context(item.id, [r for r, _ in turns])
            self.store.set_cube_model(row.id, self.embedder.name, self.embedder.dim)
            self.store.bump_generation(row.id)
            count = len(self.store.live_keys(row.id))
            self.store.audit(self.actor, "reembed", row.name, [], {"model": self.embedder.name,
                                                                   "keys": count})
            self.store.rebuild_vector_index(row.id)
        return count

    def migrate(self, target: str | Path, *, files: str | Path | None = None,
                progress: Any = None) -> dict[str, int]:
        """Copy this whole store into an empty one at `target` (a postgresql:// URL or an
        SQLite path): items with their ids, versions, the audit log, embeddings, users, keys,
        grants, KV block and shard rows. Returns the rows copied per table.

        >>> Memory("memory.db").migrate("postgresql://localhost/memstack")
        {'cubes': 1, 'items': 42, ...}
        """
        counts = self._copy_into(target, files, progress)
        store = open_store(target, files=files)
        try:
            with store.transaction():
                store.audit(self.actor, "migrate", None, [], {"from": self.location,
                                                             "rows": counts})
            return counts
        finally:
            store.close()

    def _copy_into(self, target: str | Path, files: str | Path | None,
                   progress: Any = None) -> dict[str, int]:
        from .write.copy import copy_store

        store = open_store(target, files=files)
        try:
            writer = Writer(store, Cubes(store, self.embedder.name, self.embedder.dim,
                                         self.default_cube), self.embedder, self.actor,
                            context_window=self.context_window)
            return copy_store(self.store, store, writer, progress)
        finally:
            store.close()

    def export_cube(self, cube: str | None, file: str | Path, *, tiers: bool = False
                    ) -> dict[str, Any]:
        """Write the cube (every item and version, tombstones, provenance, its audit entries,
        its vectors with the model's identity, its retention rules; with `tiers`, its KV
        blocks and LoRA shards with their files) into the new archive `file`
        (govern/archive.py). Returns the archive's manifest.

        >>> m.export_cube("team", "team.memcube")["counts"]["items"]
        42"""
        row = self._cubes.get(cube, check_model=False)
        with self.store.snapshot():  # one moment of the cube, whatever writers do meanwhile
            manifest = archive.export(self.store, row, Path(file), tiers)
        with self.store.transaction():
            self.store.audit(self.actor, "export_cube", row.name, [], {
                "dest": str(Path(file).resolve()), "items": manifest["counts"]["items"]})
        return manifest

    def import_cube(self, file: str | Path, *, as_name: str | None = None,
                    owner: str | None = None, fresh_ids: bool = False) -> dict[str, Any]:
        """Import a cube archive as a new cube (its own name, or `as_name`), after checking
        every member against its manifest; ids kept (remapped on a clash, or all of them with
        `fresh_ids`; links followed), vectors kept when the embedding model matches, embedded
        again when not. With `fresh_ids` (an upload to the server) the archived audit entries
        are recorded as `imported:ACTION`, so they never pass for this store's own.

        >>> m.import_cube("team.memcube", as_name="team-copy")["items"]
        42"""
        with tempfile.TemporaryDirectory(prefix="memstack-import-") as scratch:
            opened = archive.open_archive(Path(file), Path(scratch))
            name = _name(as_name or opened.manifest["cube"]["name"], "cube")
            return archive.load(self.store, opened, name, self.embedder,
                                self.writer.refresh_context, self.actor,
                                str(Path(file).resolve()), owner, fresh_ids)

    def backup(self, dest: str | Path) -> dict[str, Any]:
        """Back the whole store up into the new folder `dest` while it is in use: every write
        committed before the backup began, KV blocks and shards too, with a manifest of sha256
        sums (govern/backup.py). Returns what was written and the copy's checks.

        >>> Memory("memory.db").backup("backups/2026-12-04")["audit_head"]["seq"]
        42"""
        report = backup.backup(self.store, Path(dest), self._copy_snapshot,
                               lambda path: open_store(path))
        if not getattr(self.store, "read_only", False):
            with self.store.transaction():
                self.store.audit(self.actor, "backup", None, [], {
                    "dest": str(Path(dest).resolve()), "audit_head": report["audit_head"],
                    "bytes": report["bytes"]})
        return report

    def _copy_snapshot(self, path: Path) -> None:
        """The store's rows into a new SQLite file, as of one moment (no entry is added to the
        copy's audit log: its chain ends where the store's did)."""
        with self.store.snapshot():
            self._copy_into(path, None)

    @classmethod
    def restore(cls, src: str | Path, target: str | Path, *, files: str | Path | None = None,
                embedder: Embedder | None = None) -> dict[str, Any]:
        """Restore the backup folder `src` into a new SQLite file or an empty PostgreSQL
        database `target`, after checking every file of it; then check the result (database,
        indexes, audit chain against the backup's head).

        >>> Memory.restore("backups/2026-12-04", "restored.db")["checks"]["ok"]
        True"""
        src, started = Path(src), time.perf_counter()
        manifest = backup.check_backup(src)
        embedder = embedder or LocalEmbedder()
        if is_url(target):
            _restore_rows(cls, src, manifest, target, files, embedder)
        else:
            backup.check_target_free(Path(target))
            backup.restore_files(src, manifest, Path(target), Path(target))
        with cls(target, embedder=embedder, files=files) as restored:
            checks = backup.verify_restored(restored.store, manifest)
            with restored.store.transaction():
                restored.store.audit(restored.actor, "restore", None, [], {
                    "from": str(src.resolve()), "backup_created_at": manifest["created_at"],
                    "ok": checks["ok"]})
            location = restored.location
        return {"target": location, "from": str(src), "created_at": manifest["created_at"],
                "checks": checks, "seconds": round(time.perf_counter() - started, 2)}

    def scrub(self) -> dict[str, Any]:
        """Remove from the store's files what is left of deleted memories (on PostgreSQL: the
        dead tuples and the WAL that held them; see docs/scaling.md). Returns what ran and
        whether it is complete."""
        report = self.store.scrub()
        with self.store.transaction():
            self.store.audit(self.actor, "scrub", None, [], report)
        return report

    # reads ------------------------------------------------------------------------------------
    def _live(self, memory_id: str) -> tuple[int, Item]:
        if not isinstance(memory_id, str) or not memory_id:
            raise InvalidInputError(f"a memory id is a non-empty string, got {memory_id!r}")
        return self.writer.live(memory_id)

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
        cube_rows = self._cubes.for_reading(cube)
        if not cube_rows:
            return []
        sel = selection(cube_rows, _scope(user_id, agent_id, session_id or run_id), kinds,
                        filters, None, None, None,
                        status="live" if include_inactive else "active")
        rows = self.store.select_items(sel, order="observed", limit=limit, offset=offset)
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
               threshold: float | None = None, feedback: bool = True) -> list[Hit]:
        """Hybrid search (BM25 + vectors, fused) within a scope; results never cross it.
        `feedback=False`: results as if this user had given no feedback (Memory.feedback).

        >>> [h.item.content for h in m.search("cat", user_id="ann", top_k=3)]
        ['I adopted a cat yesterday']
        """
        hits = self.searcher.find(query, user_id=user_id, agent_id=agent_id,
                                  session_id=session_id or run_id, cube=cube, kinds=kinds,
                                  filters=filters, since=since, until=until, as_of=as_of,
                                  top_k=limit if limit is not None else top_k,
                                  feedback=feedback)
        if threshold is not None:
            hits = [h for h in hits if h.score >= threshold]
        if self.track_access and hits:
            self._uses.touch([h.item.id for h in hits])
        return hits

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
        answer_id = self._remember("answer", question, _scope(user_id, agent_id, None), used,
                                   [c.name for c in self._cubes.for_reading(cube)])
        return Answer(reply.text.strip(), [h.item.id for h in used], tokens, reply.prompt_tokens,
                      reply.completion_tokens, round(reply.seconds, 3), used, answer_id)

    # export, import and inspection ----------------------------------------------------------------
    def export(self, cube: str | None = None, *, destination: str | None = None
               ) -> Iterator[dict[str, Any]]:
        """Every item of a cube that is not deleted, as dicts (JSONL-ready), oldest first. The
        audit log records the export and its `destination` (a file name, for deletion
        receipts: the copy holds what is deleted later)."""
        row = self._cubes.get(cube, check_model=False)
        if not getattr(self.store, "read_only", False):
            with self.store.transaction():
                self.store.audit(self.actor, "export", row.name, [],
                                 {"dest": destination or "(stream)"})
        for _, item in self.store.select_items(_everything(row)):
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

    def audit_head(self) -> dict[str, Any]:
        """The audit chain's head (last entry's seq and hash): keep it outside the store, and
        `verify_audit(head)` later also proves that no entry up to it was cut or rewritten.

        >>> m.audit_head()["seq"]
        42"""
        return chain.head(self.store)

    def verify_audit(self, head: dict[str, Any] | None = None) -> ChainReport:
        """Walk the audit log's hash chain; the report names the first entry where an edit,
        deletion, insertion or reordering broke it (and checks `head`, from `audit_head`).

        >>> m.verify_audit().ok
        True"""
        return chain.verify(self.store, head)

    def stats(self) -> dict[str, Any]:
        out = self.store.stats()
        out["cubes"] = [c.to_dict() for c in self.cubes()]
        out["embedder"] = {"name": self.embedder.name, "dim": self.embedder.dim}
        return out


def _restore_rows(cls: type[Memory], src: Path, manifest: dict[str, Any],
                  target: str | Path, files: str | Path | None, embedder: Embedder) -> None:
    """A backup into an empty PostgreSQL database: its rows copied through the Store (from a
    scratch copy of the backup's file: opening a store writes beside it), then its files."""
    store = open_store(target, files=files)
    try:
        backup.check_store_empty(store)
    finally:
        store.close()
    with tempfile.TemporaryDirectory(prefix="memstack-restore-") as scratch:
        copy = Path(scratch) / backup.DB
        shutil.copyfile(src / backup.DB, copy)
        with cls(copy, embedder=embedder) as source:
            source._copy_into(target, files)
    store = open_store(target, files=files)
    try:
        backup.restore_files(src, manifest, None, store.path)
    finally:
        store.close()


def _everything(cube: CubeRow) -> Selection:
    """Every item of a cube that is not deleted."""
    return Selection(cube_ids=(cube.id,), status="live")
