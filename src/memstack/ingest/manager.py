"""The LLM memory manager: turns already stored -> candidate facts -> ADD/UPDATE/DELETE/NOOP.

At most two LLM calls per add(), whatever the number of messages (plus one repair call when a
reply fails its schema): one proposes candidates, one decides against the nearest existing facts
of the same scope. The second is skipped when no existing fact is near, or when every candidate
repeats an existing fact word for word.

Turns are committed before any LLM call, so a failing or slow endpoint never loses them; the
operations are then applied in one transaction. UPDATE and DELETE supersede: the old fact keeps
its text and gets valid_to and superseded_by (the new fact, or for DELETE the turn that retracted
it), so as_of search still sees it and history() says what replaced it and which turns caused it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._errors import LLMError
from .._models import Extraction, FactOp, Item, utcnow
from ..llm import ChatModel, Completion
from ..llm.structured import ask, schema_of
from ..store.base import CubeRow, content_hash
from .extract import (MAX_FACTS, PROMPT_VERSION, Candidate, Decision, Line, decide_messages,
                      decisions_model, normalise_fact, proposal_model, propose_messages,
                      read_decisions, strip_echo, support, useful)
from .rules import Draft, item_keys

if TYPE_CHECKING:
    from ..retrieve.searcher import Searcher
    from ..write.writer import Writer

FACT_KINDS = ("fact", "procedure", "insight")
CONTEXT_ROLES = ("assistant", "system", "tool")
KIND_OF = {"fact": "fact", "preference": "fact", "procedure": "procedure"}


@dataclass(frozen=True)
class ExtractionSettings:
    """How the LLM memory manager reads and decides.

    prompt_chars: characters of new messages one extraction prompt reads (the newest first);
    neighbours: existing facts fetched per candidate; max_existing: existing facts shown to the
    decision call; context_turns: earlier turns of the session shown as context; min_support:
    the share of a fact's content words that must appear in what was said (0 turns the
    grounding check off)."""

    prompt_chars: int = 12_000
    neighbours: int = 5
    max_existing: int = 20
    context_turns: int = 4
    min_support: float = 0.3


@dataclass
class _Run:
    """Book-keeping of one extraction: the completions it took and when it started."""

    started: float = field(default_factory=time.monotonic)
    completions: list[Completion] = field(default_factory=list)
    repaired: bool = False
    unread: int = 0
    dropped: int = 0

    def result(self, operations: list[FactOp], error: str | None = None) -> Extraction:
        return Extraction(operations, len(self.completions),
                          sum(c.prompt_tokens for c in self.completions),
                          sum(c.completion_tokens for c in self.completions),
                          round(time.monotonic() - self.started, 3), self.repaired, error,
                          self.unread, self.dropped)


@dataclass
class _Plan:
    """One operation decided, before it is written."""

    event: str
    candidate: Candidate
    sources: list[str]
    text: str
    target: tuple[int, Item] | None = None


class FactManager:
    """Extracts and maintains facts for a Memory through an LLM (see the module docstring)."""

    def __init__(self, writer: "Writer", searcher: "Searcher", llm: ChatModel,
                 settings: ExtractionSettings | None = None) -> None:
        self.writer, self.searcher, self.store, self.llm = writer, searcher, writer.store, llm
        self.settings = settings or ExtractionSettings()

    @property
    def producer(self) -> str:
        return f"llm:{self.llm.name}:{PROMPT_VERSION}"

    def process(self, cube: CubeRow, turns: list[Item]) -> Extraction:
        """Extract from stored turns and apply the operations. Never raises an LLMError: a
        failure comes back in Extraction.error and is written to the audit log."""
        run = _Run()
        try:
            candidates, read = self._propose(turns, run)
            if not candidates:
                return run.result([])
            scope = fact_scope(turns[0])
            existing = self._nearest(cube, scope, candidates)
            plans = self._decide(candidates, existing, read, run)
            return run.result(self._apply(cube, scope, plans, turns))
        except LLMError as exc:
            run.completions += exc.completions
            error = f"{type(exc).__name__}: {exc}"
            with self.store.transaction():
                self.store.audit(self.writer.actor, "extract_failed", cube.name,
                                        [t.id for t in turns], {"error": error[:2000],
                                                                "llm": self.llm.name})
            return run.result([], error)

    # call 1 -----------------------------------------------------------------------------------
    def _propose(self, turns: list[Item], run: _Run) -> tuple[list[Candidate], list[Item]]:
        """Candidates from the people's messages (the assistant's replies are context, as in
        mem0; an add of only assistant messages, agent memory, is read as it is)."""
        readable = [t for t in turns if t.role not in CONTEXT_ROLES] or turns
        before = self._earlier(turns[0])
        context = sorted(before + [t for t in turns if t not in readable],
                         key=lambda t: t.metadata.get("turn_index", 0))
        new = [Line(n, t.observed_at, _speaker(t), t.content or "") for n, t in
               enumerate(readable, 1)]
        earlier = [Line(0, t.observed_at, _speaker(t), t.content or "") for t in context]
        model = proposal_model(len(new))
        messages, run.unread = propose_messages(new, earlier, json.dumps(schema_of(model)),
                                                self.settings.prompt_chars)
        reply = ask(self.llm, messages, model, max_tokens=80 * MAX_FACTS)
        run.completions += reply.completions
        run.repaired |= reply.repaired
        # grounded in what the people said now or earlier, not in this add's assistant replies
        evidence = _evidence(readable + before)
        seen, out = set(), []
        for fact in reply.value.facts:  # the same fact twice in one reply is one fact
            fact = fact.model_copy(update={"text": strip_echo(fact.text)})
            key = normalise_fact(fact.text)
            if key in seen or not useful(fact):
                continue
            seen.add(key)
            if support(fact.text, evidence) < self.settings.min_support:
                run.dropped += 1
                continue
            out.append(fact)
        return out, readable

    def _earlier(self, first: Item) -> list[Item]:
        """The turns just before this add in its session: context for pronouns and replies."""
        if not first.parent_id or not self.settings.context_turns:
            return []
        turns = self.writer.session_turns(first.parent_id)
        ids = [item.id for _, item in turns]
        end = ids.index(first.id) if first.id in ids else len(turns)
        return [item for _, item in turns[max(0, end - self.settings.context_turns):end]]

    # existing facts and call 2 ----------------------------------------------------------------
    def _nearest(self, cube: CubeRow, scope: dict[str, str | None],
                 candidates: list[Candidate]) -> list[tuple[int, Item]]:
        """The existing active facts nearest to any candidate, best first, at most max_existing."""
        best: dict[str, tuple[float, Item]] = {}
        for candidate in candidates:
            hits = self.searcher.find(candidate.text, cube=cube.name, kinds=FACT_KINDS,
                                     top_k=self.settings.neighbours,
                                     exact=("user_id", "agent_id"), feedback=False,
                                     **scope)
            for rank, hit in enumerate(hits):
                score = best.get(hit.item.id, (1e9, hit.item))[0]
                best[hit.item.id] = (min(score, rank), hit.item)
        ordered = sorted(best.values(), key=lambda pair: pair[0])[:self.settings.max_existing]
        found = [self.store.item_by_id(item.id) for _, item in ordered]
        return [row for row in found if row is not None]

    def _decide(self, candidates: list[Candidate], existing: list[tuple[int, Item]],
                turns: list[Item], run: _Run) -> list[_Plan]:
        ids = [t.id for t in turns]
        by_text = {normalise_fact(item.content or ""): (rowid, item) for rowid, item in existing}
        plans: dict[int, _Plan] = {}
        for n, c in enumerate(candidates, 1):  # a word-for-word repeat needs no LLM to decide
            same = by_text.get(normalise_fact(c.text))
            if same is not None:
                plans[n] = _Plan("NOOP", c, _sources(c, ids), c.text, same)
        open_ = [n for n in range(1, len(candidates) + 1) if n not in plans]
        if open_ and existing:
            shown = [candidates[n - 1] for n in open_]
            model = decisions_model(len(shown), len(existing))
            messages = decide_messages([(i.content or "", i.valid_from) for _, i in existing],
                                       shown, json.dumps(schema_of(model)))
            reply = ask(self.llm, messages, model, max_tokens=60 * 2 * MAX_FACTS)
            run.completions += reply.completions
            run.repaired |= reply.repaired
            for d in read_decisions(reply.value):
                n = open_[d.fact - 1]
                plans.setdefault(n, _plan(d, candidates[n - 1], existing, ids,
                                          self.settings.min_support))
        for n in open_:  # no decision (no existing facts, or the LLM skipped it): a new fact
            plans.setdefault(n, _Plan("ADD", candidates[n - 1], _sources(candidates[n - 1], ids),
                                      candidates[n - 1].text))
        return [plans[n] for n in sorted(plans)]

    # writes -----------------------------------------------------------------------------------
    def _apply(self, cube: CubeRow, scope: dict[str, str | None], plans: list[_Plan],
               turns: list[Item]) -> list[FactOp]:
        store = self.store
        when = max((t.observed_at for t in turns if t.observed_at), default=utcnow())
        writes = [p for p in plans if p.event in ("ADD", "UPDATE")]
        drafts = [self._draft(p, scope, when, turns[0]) for p in writes]
        vectors = self.writer.embed(drafts)
        with store.transaction():
            live = self._recheck(plans)  # writes stay writes, so drafts and vectors still line up
            written = iter(self.writer.insert(cube, drafts, vectors))
            ops = []
            for p in live:
                new = next(written) if p.event in ("ADD", "UPDATE") else None
                ops.append(self._write(p, new[1] if new else None, when))
            store.bump_generation(cube.id)
            store.audit(self.writer.actor, "extract", cube.name,
                        [op.id or op.previous_id for op in ops if op.event != "NOOP"],
                        {"llm": self.llm.name, "operations": [op.event for op in ops],
                         "source_ids": [t.id for t in turns]})
        return ops

    def _recheck(self, plans: list[_Plan]) -> list[_Plan]:
        """Inside the write transaction: a target superseded since the LLM saw it (or by an
        earlier plan of this batch) is left alone. An UPDATE of it becomes an ADD; a DELETE or
        NOOP of it is dropped."""
        retired: set[str] = set()
        live = []
        for p in plans:
            if p.target is not None:
                found = self.store.item_by_id(p.target[1].id)
                if not found or found[1].status != "active" or found[1].id in retired:
                    if p.event != "UPDATE":
                        continue
                    p.event, p.target = "ADD", None
                else:
                    p.target = found
                    if p.event in ("UPDATE", "DELETE"):
                        retired.add(found[1].id)
            live.append(p)
        return live

    def _draft(self, plan: _Plan, scope: dict[str, str | None], when: datetime,
               first: Item) -> Draft:
        kind = KIND_OF[plan.candidate.kind]
        texts, roles, resolved = item_keys(kind, None, plan.text, when)
        meta: dict[str, Any] = {"category": plan.candidate.kind}
        if first.session_id:
            meta["from_session"] = first.session_id
        if resolved:
            meta["resolved_dates"] = resolved
        fields = {"id": uuid.uuid4().hex, "kind": kind, "content": plan.text,
                  "content_hash": content_hash(plan.text), "role": None, "speaker": None,
                  **scope, "metadata": meta, "observed_at": when, "valid_from": when,
                  "producer": self.producer, "status": "active", "source_ids": plan.sources}
        return Draft(fields, texts, roles)

    def _write(self, plan: _Plan, new: Item | None, when: datetime) -> FactOp:
        kind = KIND_OF[plan.candidate.kind]
        if plan.event == "ADD":
            return FactOp("ADD", new.id, new.content, source_ids=plan.sources, kind=kind)
        rowid, old = plan.target
        if plan.event == "NOOP":
            return FactOp("NOOP", old.id, old.content, source_ids=plan.sources, kind=old.kind)
        by = new.id if new is not None else plan.sources[-1]
        reason = (f"superseded by {by}" if plan.event == "UPDATE" else
                  f"retracted by turn {by}") + f" ({self.producer})"
        self.writer.supersede(rowid, old, by, when, reason, plan.sources)
        return FactOp(plan.event, new.id if new else None, new.content if new else None,
                      old.id, old.content, plan.sources, old.kind)


def fact_scope(turn: Item) -> dict[str, str | None]:
    """Facts belong to the user and agent of their turns, across sessions; a conversation with
    neither keeps its facts in its session."""
    if turn.user_id or turn.agent_id:
        return {"user_id": turn.user_id, "agent_id": turn.agent_id, "session_id": None}
    return {"user_id": None, "agent_id": None, "session_id": turn.session_id}


def _speaker(turn: Item) -> str:
    if turn.speaker and turn.speaker != turn.role:
        return turn.speaker
    if turn.role == "user" and turn.user_id:
        return turn.user_id
    return turn.role or "unknown"


def _sources(candidate: Candidate, ids: list[str]) -> list[str]:
    cited = [ids[s - 1] for s in candidate.sources if 1 <= s <= len(ids)]
    return list(dict.fromkeys(cited)) or list(ids)


def _evidence(turns: list[Item]) -> str:
    """What was said, as a grounding check sees it: speakers, texts and resolved dates."""
    return " ".join(f"{t.speaker or ''} {t.user_id or ''} {t.content or ''} " + " ".join(
        d.get("label", "") for d in t.metadata.get("resolved_dates", [])) + (
        f" {t.observed_at:%-d %B %Y}" if t.observed_at else "") for t in turns)


def _plan(decision: Decision, candidate: Candidate, existing: list[tuple[int, Item]],
          ids: list[str], min_support: float) -> _Plan:
    sources = _sources(candidate, ids)
    if decision.event == "ADD":
        return _Plan("ADD", candidate, sources, candidate.text)
    target = existing[decision.target - 1]
    text = (decision.text or candidate.text).strip() or candidate.text
    if support(text, f"{candidate.text} {target[1].content}") < min_support:
        text = candidate.text  # the rewrite says what neither fact said: keep the new fact's words
    if decision.event == "UPDATE" and normalise_fact(text) == normalise_fact(target[1].content
                                                                                 or ""):
        return _Plan("NOOP", candidate, sources, text, target)  # an "update" that changes nothing
    return _Plan(decision.event, candidate, sources, text, target)
