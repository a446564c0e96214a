"""Insights distilled by an LLM (`memstack reflect`): what a person prefers and what worked,
read from the turns of their newest sessions and their facts, stored as `insight` and
`procedure` items whose source_ids are the turns and facts they came from.

At most MAX_CALLS = 4 LLM calls per run, a repair included. The lines (turns, newest sessions
first, and up to `max_facts` facts) are cut into prompts of at most `prompt_chars` characters,
one call each; lines past MAX_CALLS prompts stay unread and are counted. A reply that fails its
schema is repaired once (as in add) when a call is left; the repair takes the call of a later
prompt, whose lines then stay unread. A call is one chat completion: the client's bounded
retries of a failed request (llm/client.py) are inside it.

Every proposal cites numbered lines; numbers that name no line are dropped, and a proposal
citing no valid line, or whose words its lines do not support, is dropped. A proposal that
repeats an existing active insight or procedure of the scope (same words, or a duplicate by the
rule of `memstack dedupe` among its nearest by search) is skipped, as is a repeat
within the run (its sources join the first). Writes are one transaction with an audit entry.

Nothing is lost on failure: an LLM error (HTTP, time-out, garbage twice) ends the calls and is
reported in Reflection.error; what earlier calls proposed is still written whole, and nothing
stored is changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from .._errors import LLMError, LLMOutputError
from .._models import Item, utcnow
from ..ingest.extract import FACT_CHARS, Line, normalise_fact, strip_echo, support
from ..ingest.rules import Draft, item_keys
from ..llm import ChatModel, Completion
from ..llm.structured import Structured, ask, parse_reply, schema_of
from ..store.base import CubeRow, content_hash
from ..store.selection import Selection
from .dedupe import DedupeSettings, duplicate

if TYPE_CHECKING:
    from ..retrieve.searcher import Searcher
    from ..write.writer import Writer

PROMPT_VERSION = "reflect-v1"
MAX_CALLS = 4  # LLM calls per run, a repair included
MAX_INSIGHTS = 8  # per reply
KINDS = ("insight", "procedure")
EXACT = ("user_id", "agent_id")  # a scope's None means "none", as for facts


@dataclass(frozen=True)
class ReflectSettings:
    """How reflect reads and deduplicates.

    prompt_chars: characters of lines per prompt; max_facts: the newest facts shown (in every
    prompt, within a quarter of it); neighbours: existing insights compared per proposal;
    duplicates: when a proposal repeats an insight (the rule of `memstack dedupe`,
    learn/dedupe.py: close embeddings and words, no negation or opposite between them);
    min_support: the share of a proposal's content words its cited lines must contain (lower
    than for facts: an insight generalises, in words of its own)."""

    prompt_chars: int = 8_000
    max_facts: int = 30
    neighbours: int = 5
    duplicates: DedupeSettings = field(default_factory=DedupeSettings)
    min_support: float = 0.2


@dataclass(frozen=True)
class Insight:
    """An insight or procedure proposed by the LLM: written (id), would be (dry run, no id),
    or skipped as a repeat of an existing one (duplicate_of)."""

    text: str
    kind: str
    source_ids: list[str]
    id: str | None = None
    duplicate_of: str | None = None


@dataclass(frozen=True)
class Reflection:
    """What one reflect run did: the insights written, the repeats skipped, the calls and
    their cost. `error` is set when an LLM call failed (what earlier calls found is written).

    >>> m.reflect(user_id="ann").written_ids
    ['3f2a...']
    """

    insights: list[Insight]
    duplicates: list[Insight]
    llm_calls: int
    sessions_read: int
    lines_read: int
    unread_lines: int = 0
    dropped: int = 0  # cited no valid line, or not supported by its lines
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def written_ids(self) -> list[str]:
        return [i.id for i in self.insights if i.id]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "written_ids": self.written_ids}


# the reply ------------------------------------------------------------------------------------
class Proposal(BaseModel):
    text: str = Field(min_length=3, max_length=FACT_CHARS)
    kind: Literal["insight", "procedure"]
    sources: list[int]  # checked here: a number that names no line is dropped


class Proposals(BaseModel):
    insights: list[Proposal] = Field(max_length=MAX_INSIGHTS)


SYSTEM = """You study an assistant's past conversations with a person to learn how to serve \
them better. From the SESSIONS and the FACTS, write down what lasts:
- "insight": a preference or pattern of the person (how they like answers, what they care \
about, what annoys them).
- "procedure": what worked, as a way to do it again ("When Ann asks for a recipe, list the \
ingredients first.").
Rules:
- Each is one short, self-contained sentence in the third person that names the person.
- Only what the lines show. No one-off events, no guesses, no repeats of the FACTS.
- sources lists the numbers of the lines it comes from; at least one.
- If there is nothing to learn, return {"insights": []}.
Example. SESSION s1:
[1] 2024-03-02 Sam: Too long. Just give me the command.
[2] 2024-03-02 assistant: git rebase -i HEAD~3
[3] 2024-03-02 Sam: Perfect, thanks.
Reply: {"insights": [{"text": "Sam prefers a bare command to a long explanation.", "kind": \
"insight", "sources": [1, 3]}]}
Reply with only a JSON object matching this schema:
"""


# prompts ---------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """The lines of one prompt: turns (grouped by session, in order), then facts. Line n is
    items[n - 1]."""

    turns: list[tuple[Item, Item]]  # (session, turn)
    facts: list[Item]
    line_chars: int  # a longer turn is cut

    @property
    def items(self) -> list[Item]:
        return [t for _, t in self.turns] + self.facts

    def messages(self) -> list[dict[str, str]]:
        parts, last = [], None
        for n, (session, turn) in enumerate(self.turns, 1):
            if session.id != last:
                parts.append(f"\nSESSION {session.session_id}:")
                last = session.id
            parts.append(Line(n, turn.observed_at, speaker(turn), turn.content or "")
                         .render(self.line_chars))
        if self.facts:
            parts.append("\nFACTS:")
            parts += [f"[{n}] {f.content}" for n, f in enumerate(self.facts,
                                                                  len(self.turns) + 1)]
        return [{"role": "system", "content": SYSTEM + json.dumps(schema_of(Proposals))},
                {"role": "user", "content": "\n".join(parts).strip()}]


def chunks(sessions: list[tuple[Item, list[Item]]], facts: list[Item], budget: int
           ) -> tuple[list[Chunk], int]:
    """At most MAX_CALLS prompts of `budget` characters, the newest turns first, and how many
    turns did not fit. `sessions` are newest first, each with its turns in order."""
    facts, used = _fit(facts, budget // 4, lambda f: len(f.content or "") + 6)
    per_turn = max(200, (budget - used) // 2)
    newest_first = [(s, t) for s, turns in sessions for t in reversed(turns)]
    out: list[Chunk] = []
    while newest_first and len(out) < MAX_CALLS:
        taken, _ = _fit(newest_first, budget - used,
                        lambda p: min(len(p[1].content or ""), per_turn) + 40)
        out.append(Chunk(taken[::-1], facts, per_turn))
        newest_first = newest_first[len(taken):]
    return out, len(newest_first)


def _fit(rows: list, budget: int, size: Any) -> tuple[list, int]:
    """The leading rows whose sizes fit the budget (at least one), and the size they take."""
    taken, used = [], 0
    for row in rows:
        if taken and used + size(row) > budget:
            break
        taken.append(row)
        used += size(row)
    return taken, used


def speaker(turn: Item) -> str:
    if turn.speaker:
        return turn.speaker
    return (turn.user_id if turn.role == "user" else None) or turn.role or "unknown"


# the service ----------------------------------------------------------------------------------
class _Metered:
    """The LLM, counting the calls made through it (failed ones too): the cap counts calls."""

    def __init__(self, llm: ChatModel) -> None:
        self.llm, self.name, self.calls = llm, llm.name, 0

    def complete(self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None = None,
                 max_tokens: int = 512, temperature: float = 0.0,
                 stop: list[str] | None = None) -> Completion:
        self.calls += 1
        return self.llm.complete(messages, schema=schema, max_tokens=max_tokens,
                                 temperature=temperature, stop=stop)


@dataclass
class _Found:
    """A proposal that cites real lines, before deduplication."""

    text: str
    kind: str
    sources: list[str]
    when: datetime
    vector: Any = None


@dataclass
class _Run:
    llm: _Metered
    started: float = field(default_factory=time.monotonic)
    completions: list[Completion] = field(default_factory=list)
    dropped: int = 0
    read: int = 0
    unread: int = 0
    error: str | None = None


class Reflector:
    """Distils insights and procedures of one scope with an LLM (see the module docstring)."""

    def __init__(self, writer: "Writer", searcher: "Searcher", llm: ChatModel,
                 settings: ReflectSettings | None = None) -> None:
        self.writer, self.searcher, self.store, self.llm = writer, searcher, writer.store, llm
        self.settings = settings or ReflectSettings()

    @property
    def producer(self) -> str:
        return f"llm:{self.llm.name}:{PROMPT_VERSION}"

    def run(self, cube: CubeRow, scope: dict[str, str | None], sessions: int,
            dry_run: bool = False) -> Reflection:
        """Read, ask, deduplicate, write. Never raises an LLMError: it comes back in
        Reflection.error (and the audit log)."""
        run = _Run(_Metered(self.llm))
        recent, facts = self._read(cube, scope, sessions)
        prompts, run.unread = chunks(recent, facts, self.settings.prompt_chars)
        found: list[_Found] = []
        for n, chunk in enumerate(prompts):
            found += self._ask(chunk, run)
            if run.error or run.llm.calls >= MAX_CALLS:  # a repair took a later prompt's call
                run.unread += sum(len(c.turns) for c in prompts[n + (not run.error):])
                break
        kept, duplicates = self._dedupe(cube, scope, found)
        insights = [Insight(f.text, f.kind, f.sources) for f in kept] if dry_run or \
            not run.llm.calls else self._write(cube, scope, kept, run, [s.id for s, _ in recent])
        return Reflection(insights, duplicates, run.llm.calls, len(recent),
                          run.read, run.unread,
                          run.dropped, sum(c.prompt_tokens for c in run.completions),
                          sum(c.completion_tokens for c in run.completions),
                          round(time.monotonic() - run.started, 3), dry_run, run.error)

    def _read(self, cube: CubeRow, scope: dict[str, str | None], sessions: int
              ) -> tuple[list[tuple[Item, list[Item]]], list[Item]]:
        """The newest sessions of the scope (last started first) with their active turns, and
        its newest active facts."""
        def newest(kind: str, limit: int) -> list[Item]:
            sel = Selection.of(cube_ids=[cube.id], scope=scope, kinds=[kind], exact=EXACT)
            return [i for _, i in self.store.select_items(sel, order="rowid_desc", limit=limit)]

        heads = newest("session", sessions)
        recent = [(h, [t for _, t in self.writer.session_turns(h.id)]) for h in heads]
        return [(h, turns) for h, turns in recent if turns], newest("fact",
                                                                    self.settings.max_facts)

    def _ask(self, chunk: Chunk, run: _Run) -> list[_Found]:
        messages = chunk.messages()
        try:
            if MAX_CALLS - run.llm.calls >= 2:
                reply = ask(run.llm, messages, Proposals, max_tokens=80 * MAX_INSIGHTS)
            else:
                reply = _ask_once(run.llm, messages)
        except LLMError as exc:
            run.completions += exc.completions
            run.error = f"{type(exc).__name__}: {exc}"
            return []
        run.completions += reply.completions
        run.read += len(chunk.turns)
        return [f for p in reply.value.insights if (f := self._ground(p, chunk, run))]

    def _ground(self, proposal: Proposal, chunk: Chunk, run: _Run) -> _Found | None:
        """The proposal with its cited items, or None when it cites no line or its lines do not
        support its words."""
        lines = chunk.items
        cited = list({lines[n - 1].id: lines[n - 1] for n in proposal.sources
                      if 1 <= n <= len(lines)}.values())
        text = strip_echo(proposal.text).strip()
        evidence = " ".join(f"{speaker(i) if i.kind == 'turn' else ''} {i.user_id or ''} "
                            f"{i.content or ''}" for i in cited)
        if not cited or sum(any(c.isalpha() for c in w) for w in text.split()) < 2 or \
                support(text, evidence) < self.settings.min_support:
            run.dropped += 1
            return None
        when = max((i.observed_at for i in cited if i.observed_at), default=utcnow())
        return _Found(text, proposal.kind, [i.id for i in cited], when)

    # deduplication ----------------------------------------------------------------------------
    def _dedupe(self, cube: CubeRow, scope: dict[str, str | None], found: list[_Found]
                ) -> tuple[list[_Found], list[Insight]]:
        """The proposals that repeat nothing, and those that repeat an existing insight."""
        if not found:
            return [], []
        for f, vector in zip(found, _unit(self.writer.embedder.embed([f.text for f in found]))):
            f.vector = vector
        kept: list[_Found] = []
        duplicates: list[Insight] = []
        for f in found:
            twin = next((k for k in kept if self._same(f.text, f.vector, k.text, k.vector)), None)
            if twin is not None:  # said twice in this run: one insight, with both sources
                twin.sources = list(dict.fromkeys(twin.sources + f.sources))
                continue
            existing = self._existing_twin(cube, scope, f)
            if existing is not None:
                duplicates.append(Insight(f.text, f.kind, f.sources, duplicate_of=existing.id))
            else:
                kept.append(f)
        return kept, duplicates

    def _existing_twin(self, cube: CubeRow, scope: dict[str, str | None], f: _Found
                       ) -> Item | None:
        hits = self.searcher.find(f.text, cube=cube.name, kinds=KINDS, exact=EXACT,
                                  top_k=self.settings.neighbours, feedback=False,
                                  user_id=scope["user_id"], agent_id=scope["agent_id"])
        if not hits:
            return None
        vectors = _unit(self.writer.embedder.embed([h.item.content or "" for h in hits]))
        return next((h.item for h, v in zip(hits, vectors)
                     if self._same(f.text, f.vector, h.item.content or "", v)), None)

    def _same(self, a: str, va: np.ndarray, b: str, vb: np.ndarray) -> bool:
        return normalise_fact(a) == normalise_fact(b) or \
            duplicate(a, b, float(va @ vb), self.settings.duplicates)

    # writes -----------------------------------------------------------------------------------
    def _write(self, cube: CubeRow, scope: dict[str, str | None], kept: list[_Found], run: _Run,
               sessions: list[str]) -> list[Insight]:
        drafts = [self._draft(f, scope) for f in kept]
        vectors = self.writer.embed(drafts)
        with self.store.transaction():
            live = self._recheck(cube, scope, drafts)
            if len(live) < len(drafts):  # another run wrote one of them meanwhile
                vectors = self.writer.embed(live)
            written = [i for _, i in self.writer.insert(cube, live, vectors)] if live else []
            if written:
                self.store.bump_generation(cube.id)
            self.store.audit(self.writer.actor, "reflect_failed" if run.error else "reflect",
                             cube.name, [i.id for i in written],
                             {"llm": self.llm.name, "llm_calls": run.llm.calls,
                              "sessions": sessions, **({"error": run.error[:2000]}
                                                       if run.error else {})})
        return [Insight(i.content or "", i.kind, i.source_ids, i.id) for i in written]

    def _recheck(self, cube: CubeRow, scope: dict[str, str | None], drafts: list[Draft]
                 ) -> list[Draft]:
        """Inside the write transaction: drafts whose words no active insight has now."""
        sel = Selection.of(cube_ids=[cube.id], scope=scope, kinds=KINDS, exact=EXACT)
        have = {normalise_fact(i.content or "") for _, i in self.store.select_items(sel)}
        return [d for d in drafts if normalise_fact(d.fields["content"]) not in have]

    def _draft(self, f: _Found, scope: dict[str, str | None]) -> Draft:
        texts, roles, resolved = item_keys(f.kind, None, f.text, f.when)
        meta: dict[str, Any] = {"resolved_dates": resolved} if resolved else {}
        fields = {"id": uuid.uuid4().hex, "kind": f.kind, "content": f.text,
                  "content_hash": content_hash(f.text), "role": None, "speaker": None,
                  "user_id": scope["user_id"], "agent_id": scope["agent_id"],
                  "session_id": None, "metadata": meta, "observed_at": f.when,
                  "valid_from": f.when, "producer": self.producer, "status": "active",
                  "source_ids": f.sources}
        return Draft(fields, texts, roles)


def _ask_once(llm: ChatModel, messages: list[dict[str, str]]) -> Structured[Proposals]:
    """The last call of a run: no call is left to repair a bad reply."""
    reply = llm.complete(messages, schema=schema_of(Proposals), max_tokens=80 * MAX_INSIGHTS)
    try:
        return Structured(parse_reply(reply.text, Proposals), [reply])
    except ValueError as exc:
        raise LLMOutputError(f"the LLM reply failed its schema ({exc}) and the run had no call "
                             f"left to repair it", completions=[reply]) from None


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)
