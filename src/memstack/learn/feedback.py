"""Feedback on memories, answers and generations (issue 18): stored as items, undone by deleting.

A feedback item (kind `feedback`) belongs to the cube of the memories it names, in the scope of
the user who gave it. Its content, and so its search key, is the query it was given for; its
metadata holds the signal, the memories it names (`item_ids`), the answer or generation it was
given on, and the correction it made. Searches of the same user in the same cube read it back for
similar queries (retrieve/feedback.py); nobody else's results change. Deleting it removes its
effect and, through the usual cascade (its id is the correction's source), its correction.

A correction is a memory of its own. Without an LLM it is a fact in the corrected memory's scope
whose metadata `corrects` names it, and search puts it just ahead of it; with an LLM it is said
to the fact manager as the user's turn, which decides ADD / UPDATE (superseding the wrong fact) /
NOOP as for anything said, and the turn links to the corrected memory the same way.
Answers and generations are remembered (`answers` table: the question and the memory ids, no
text of the memories) for ANSWER_DAYS so feedback can name them; older ones are forgotten as new
ones are recorded.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .._errors import ContentTooLargeError, InvalidInputError, ItemNotFoundError
from .._models import AddResult, FeedbackResult, Item, utcnow
from ..embed import Embedder
from ..embed.base import embed_query
from ..ingest.rules import Draft, clean_text, item_keys
from ..retrieve.feedback import SIGNALS
from ..store.base import CubeRow, Store, content_hash
from ..write.writer import Writer

MAX_QUERY_CHARS = 4_000
MAX_CORRECTION_CHARS = 10_000
ANSWER_DAYS = 30  # answers and generations older than this are forgotten (maintenance)
PRODUCER = "feedback:v1"


@dataclass(frozen=True)
class Target:
    """What feedback names: memories of one cube, and the answer or generation, if any."""

    cube: CubeRow
    item_ids: list[str]
    query: str | None
    answer_id: str | None
    corrected: Item | None  # the memory a correction corrects (feedback on one memory)
    user_id: str | None = None  # whose memory or answer it was
    agent_id: str | None = None


class Feedback:
    """Records feedback. `add_turn(text, scope, cube)` says a correction to the fact manager
    (None without an LLM: corrections become linked facts)."""

    def __init__(self, store: Store, writer: Writer, embedder: Embedder, actor: str,
                 add_turn: Callable[[str, dict[str, Any], str], AddResult] | None = None
                 ) -> None:
        self.store, self.writer, self.embedder, self.actor = store, writer, embedder, actor
        self.add_turn = add_turn

    def give(self, targets: list[Target], signal: str, query: str | None,
             correction: str | None, scope: dict[str, Any]) -> FeedbackResult:
        """Store feedback on each target (one per cube); the first carries the correction."""
        signal, query, correction = check(signal, query, correction)
        results = [self._one(t, signal, query or t.query, correction if n == 0 else None, scope)
                   for n, t in enumerate(targets)]
        first = results[0]
        return FeedbackResult(first.id, signal, [i for r in results for i in r.item_ids],
                              first.query, first.correction_id, first.operations)

    def _one(self, target: Target, signal: str, query: str | None, correction: str | None,
             scope: dict[str, Any]) -> FeedbackResult:
        fb_id = uuid.uuid4().hex
        said = self._said(correction, scope, target, fb_id) \
            if correction and self.add_turn else None
        ops = said.extraction.operations if said and said.extraction else []
        meta = {"signal": signal, "item_ids": target.item_ids, "query": query,
                "answer_id": target.answer_id,
                "correction_id": said.items[0].id if said else None,
                "superseded": [op.previous_id for op in ops  # restored if it is deleted
                               if op.event in ("UPDATE", "DELETE") and op.previous_id]}
        draft = _draft(fb_id, query or correction or f"{signal} feedback", scope, meta)
        vectors = np.stack([embed_query(self.embedder, t) for t in draft.key_texts]) \
            if query else self.writer.embed([draft])
        with self.store.transaction():
            cube = self.writer.cubes.get(target.cube.name)
            ids = [fb_id]
            if correction and said is None:
                fact = _correction_draft(correction, scope, target, fb_id)
                meta["correction_id"] = fact.fields["id"]
                ids.append(fact.fields["id"])
                self.writer.insert(cube, [draft, fact],
                                   _stack(vectors, self.writer.embed([fact])))
            else:
                self.writer.insert(cube, [draft], vectors)
            if said is not None:
                self._link(said, fb_id, target)
            self.store.audit(self.actor, "feedback", cube.name, ids, {
                "signal": signal, "item_ids": target.item_ids, "answer_id": target.answer_id,
                "correction_id": meta["correction_id"]})
        return FeedbackResult(fb_id, signal, target.item_ids, query, meta["correction_id"], ops)

    def _said(self, correction: str, scope: dict[str, Any], target: Target, fb_id: str
              ) -> AddResult:
        """The correction said to the fact manager as the giver's turn (its own transaction,
        kept whatever the LLM does, as add() keeps turns), in the feedback's scope: one user's
        correction never enters another user's memories."""
        assert self.add_turn is not None
        return self.add_turn(correction, {"user_id": scope.get("user_id"),
                                          "agent_id": scope.get("agent_id"),
                                          "session_id": f"feedback-{fb_id[:12]}"},
                             target.cube.name)

    def _link(self, said: AddResult, fb_id: str, target: Target) -> None:
        """The correction's turn names its feedback as source (deleting the feedback deletes
        it) and the memory it corrects."""
        turn = said.items[0]
        found = self.store.item_by_id(turn.id)
        if found is None:
            return
        meta = {**found[1].metadata, "feedback_id": fb_id}
        if target.corrected is not None:
            meta["corrects"] = target.corrected.id
        self.store.update_item(found[0], {"source_ids": [fb_id], "metadata": meta})


def check(signal: Any, query: Any, correction: Any) -> tuple[str, str | None, str | None]:
    """Validated signal, query and correction (nothing is written before this passes)."""
    if signal not in SIGNALS:
        raise InvalidInputError(f"signal is one of {', '.join(SIGNALS)}, got {signal!r}")
    if query is not None:
        query = clean_text(query, what="query")
        if len(query) > MAX_QUERY_CHARS:
            raise ContentTooLargeError(f"a feedback query is at most {MAX_QUERY_CHARS} "
                                       f"characters, got {len(query)}")
    if correction is not None:
        correction = clean_text(correction, what="correction")
        if len(correction) > MAX_CORRECTION_CHARS:
            raise ContentTooLargeError(f"a correction is at most {MAX_CORRECTION_CHARS} "
                                       f"characters, got {len(correction)}")
    return signal, query, correction


def item_target(cube: CubeRow, item: Item) -> Target:
    if item.kind in ("feedback", "session"):
        raise InvalidInputError(f"feedback names a memory, an answer or a generation; "
                                f"{item.id} is a {item.kind} item")
    return Target(cube, [item.id], None, None, item, item.user_id, item.agent_id)


def answer_targets(store: Store, answer_id: str, cube_ids: Sequence[int] | None
                   ) -> list[Target]:
    """The targets of an answer or generation, one per cube among `cube_ids` (None: any)."""
    out = []
    for row in store.answer_rows(answer_id):
        if row["item_ids"] and (cube_ids is None or row["cube_id"] in cube_ids):
            out.append(Target(store.cube(row["cube"]), row["item_ids"], row["query"],
                              answer_id, None, row["user_id"], row["agent_id"]))
    if not out:
        raise ItemNotFoundError(f"no memory, answer or generation with id {answer_id!r} (answers "
                                f"are kept {ANSWER_DAYS} days, while a memory they used is)")
    return out


def remember_answer(store: Store, kind: str, query: str, scope: dict[str, Any],
                    item_ids_by_cube: dict[int, list[str]]) -> str:
    """Record an answer or generation and the memories it used; returns its id."""
    answer_id = f"{kind[:3]}_{uuid.uuid4().hex}"
    with store.transaction():
        store.prune_answers(time.time() - ANSWER_DAYS * 86400)  # indexed: cheap
        store.insert_answer(answer_id, kind, query, scope, item_ids_by_cube)
    return answer_id


def _draft(fb_id: str, content: str, scope: dict[str, Any], meta: dict[str, Any]) -> Draft:
    fields = {"id": fb_id, "kind": "feedback", "content": content,
              "content_hash": content_hash(content), "role": None, "speaker": None,
              "user_id": scope.get("user_id"), "agent_id": scope.get("agent_id"),
              "session_id": None, "metadata": meta, "observed_at": None,
              "producer": PRODUCER, "status": "active"}
    texts, roles, _ = item_keys("feedback", None, content, None)  # as reembed makes them again
    return Draft(fields, texts, roles)


def _correction_draft(text: str, scope: dict[str, Any], target: Target, fb_id: str) -> Draft:
    """A correction without an LLM: a fact in the feedback's scope (the giver's, never the
    corrected memory's owner's), linked to what it corrects."""
    owner = target.corrected
    now = utcnow()
    texts, roles, _ = item_keys("fact", None, text, now)
    meta: dict[str, Any] = {"feedback_id": fb_id}
    if owner is not None:
        meta["corrects"] = owner.id
    fields = {"id": uuid.uuid4().hex, "kind": "fact", "content": text,
              "content_hash": content_hash(text), "role": "user", "speaker": None,
              "user_id": scope.get("user_id"), "agent_id": scope.get("agent_id"),
              "session_id": None,
              "metadata": meta, "observed_at": now, "valid_from": now, "source_ids": [fb_id],
              "producer": PRODUCER, "status": "active"}
    return Draft(fields, texts, roles)


def _stack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([a, b]) if len(b) else a


def restore_superseded(store: Store, actor: str, feedback: Item, purged: Sequence[str]) -> list[str]:
    """After a feedback item was deleted: the facts its correction superseded (through the
    fact manager) become current again when what superseded them went with it. Inside the
    caller's transaction; returns their ids."""
    gone, out = set(purged), []
    for item_id in feedback.metadata.get("superseded", []):
        found = store.item_by_id(item_id)
        if found is None or found[1].status != "superseded" or found[1].superseded_by not in gone:
            continue
        store.update_item(found[0], {"status": "active", "valid_to": None,
                                     "superseded_by": None, "updated_at": utcnow(),
                                     "version": found[1].version + 1})
        store.add_version(found[0], store.items_by_rowid([found[0]])[found[0]],
                          "restored: the feedback that corrected it was deleted", actor)
        out.append(item_id)
    return out
