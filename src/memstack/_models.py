"""Typed value objects: items, hits, cubes, versions, audit entries and results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

Kind = Literal["turn", "session", "fact", "insight", "procedure", "core", "feedback"]
Status = Literal["active", "archived", "superseded", "deleted"]
KINDS: tuple[str, ...] = ("turn", "session", "fact", "insight", "procedure", "core", "feedback")
# kinds that are structure or signals, not memories: search finds them only when asked by name
NOT_MEMORIES: tuple[str, ...] = ("session", "feedback")
UNADDABLE = NOT_MEMORIES  # sessions are made by add(), feedback by Memory.feedback
STATUSES: tuple[str, ...] = ("active", "archived", "superseded", "deleted")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class Scope:
    """Who a memory belongs to. Any field may be None; searches never cross a set field."""

    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class Item:
    """One memory record inside a cube (see DESIGN.md, "The unit")."""

    id: str
    cube: str
    kind: str
    content: str | None
    role: str | None = None
    speaker: str | None = None
    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None
    parent_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    observed_at: datetime | None = None
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    recorded_at: datetime | None = None
    updated_at: datetime | None = None
    status: str = "active"
    version: int = 1
    superseded_by: str | None = None
    source_ids: list[str] = field(default_factory=list)
    producer: str = "rules"
    content_hash: str | None = None
    access_count: int = 0
    last_accessed: datetime | None = None
    importance: float = 0.5
    kv_blocks: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    # when the item stops being valid and leaves search (add(expires_at=, ttl=) or a cube's
    # retention policy, govern/retention.py); None: never
    expires_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """The item as JSON-ready values (times in ISO 8601). Its lists and metadata are
        copied one level deep (asdict's deep copy was a sixth of a search's time in the
        server)."""
        out = {name: getattr(self, name) for name in _ITEM_FIELDS}
        for name in _ITEM_TIMES:
            out[name] = _iso(out[name])
        for name in _ITEM_CONTAINERS:
            out[name] = out[name].copy()
        out["memory"] = self.content  # the mem0 name for the text
        return out


_ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(Item))
_ITEM_TIMES = ("observed_at", "valid_from", "valid_to", "recorded_at", "updated_at",
               "last_accessed", "expires_at")
ITEM_TIMES = _ITEM_TIMES
_ITEM_CONTAINERS = ("metadata", "tags", "source_ids", "kv_blocks", "shards")


@dataclass(frozen=True)
class Hit:
    """A search result: the item, its fused score, and its rank in each retriever (1-based)."""

    item: Item
    score: float
    ranks: dict[str, int]
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "ranks": self.ranks, "scores": self.scores,
                **self.item.to_dict()}


@dataclass(frozen=True)
class Version:
    """One entry of an item's history."""

    item_id: str
    version: int
    content: str | None
    metadata: dict[str, Any]
    status: str
    valid_from: datetime | None
    valid_to: datetime | None
    changed_at: datetime
    reason: str
    actor: str
    superseded_by: str | None = None
    source_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("valid_from", "valid_to", "changed_at"):
            out[name] = _iso(out[name])
        return out


@dataclass(frozen=True)
class Cube:
    name: str
    owner: str | None
    created_at: datetime
    embed_model: str
    embed_dim: int
    item_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["created_at"] = _iso(self.created_at)
        return out


@dataclass(frozen=True)
class RetentionRule:
    """A cube's retention policy for one kind ("*": its kinds without a rule of their own).
    Durations in seconds; None turns that part off (govern/retention.py)."""

    cube: str
    kind: str
    expire_after: float | None = None  # an item expires this long after it was recorded
    archive_unused: float | None = None  # archived when nobody read it for this long
    purge_after: float | None = None  # an archived or expired item is purged after this grace
    set_by: str | None = None
    set_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["set_at"] = _iso(self.set_at)
        return out


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: datetime
    actor: str
    action: str
    cube: str | None
    item_ids: list[str]
    detail: dict[str, Any]
    hash: str | None = None  # its link in the audit chain (None: written before the chain)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["at"] = _iso(self.at)
        return out


@dataclass(frozen=True)
class FactOp:
    """One operation the LLM memory manager applied: ADD, UPDATE, DELETE or NOOP.

    ADD and UPDATE name the fact written (`id`); UPDATE and DELETE name the fact superseded
    (`previous_id`), which keeps its text with valid_to and superseded_by set; NOOP names the
    existing fact that already said it. `source_ids` are the turns that caused the operation."""

    event: str
    id: str | None
    text: str | None
    previous_id: str | None = None
    previous_text: str | None = None
    source_ids: list[str] = field(default_factory=list)
    kind: str = "fact"

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id or self.previous_id, "memory": self.text, "event": self.event,
               "kind": self.kind, "source_ids": self.source_ids}
        if self.previous_id:
            out.update(previous_id=self.previous_id, previous_memory=self.previous_text)
        return out


@dataclass(frozen=True)
class Extraction:
    """What the LLM memory manager did for one add(): operations, calls and their cost.

    `error` is set when extraction failed (the turns are stored all the same); `unread_messages`
    counts messages that did not fit the prompt budget (the oldest of a very long add);
    `dropped_unsupported` counts candidate facts whose words the messages do not support."""

    operations: list[FactOp]
    llm_calls: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    repaired: bool = False
    error: str | None = None
    unread_messages: int = 0
    dropped_unsupported: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["operations"] = [op.to_dict() for op in self.operations]
        return out


@dataclass(frozen=True)
class AddResult:
    """What add() wrote. `results` follows mem0's shape: one entry per stored turn, then one
    per fact operation when an LLM is configured. `extraction` is None when none ran."""

    items: list[Item]
    session: Item | None
    extraction: Extraction | None = None

    @property
    def ids(self) -> list[str]:
        return [item.id for item in self.items]

    @property
    def facts(self) -> list[FactOp]:
        return self.extraction.operations if self.extraction else []

    def to_dict(self) -> dict[str, Any]:
        out = {"results": [{"id": i.id, "memory": i.content, "event": "ADD", "kind": i.kind}
                           for i in self.items] + [op.to_dict() for op in self.facts],
               "session_id": self.session.session_id if self.session else None}
        if self.extraction is not None:
            out["extraction"] = {k: v for k, v in self.extraction.to_dict().items()
                                 if k != "operations"}
        return out


@dataclass(frozen=True)
class Answer:
    """An answer from memory: the text, the memories put in the prompt, and the cost."""

    text: str
    memory_ids: list[str]
    context_tokens: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    hits: list[Hit] = field(default_factory=list)
    id: str = ""  # name it in Memory.feedback (kept 30 days: learn/feedback.py)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["hits"] = [h.to_dict() for h in self.hits]
        return out


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Generation:
    """A reply from a local model (Memory.generate): the text, what it was given, and how long
    it took. `cached_tokens` came from KV blocks; `prefilled_tokens` were read this time."""

    text: str
    token_ids: list[int]
    memory_ids: list[str]
    block_ids: list[str]
    cached_tokens: int
    prefilled_tokens: int
    ttft_seconds: float
    seconds: float
    finish_reason: str  # "stop" (an end token) or "length" (max_new_tokens)
    id: str = ""  # name it in Memory.feedback (kept 30 days: learn/feedback.py)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FeedbackResult:
    """Feedback stored (Memory.feedback): its item's id, the memories it names, the query it
    moves results for (None: it moves none), and the correction it made, if any (a memory of its
    own; with an LLM also the fact manager's operations on it)."""

    id: str
    signal: str
    item_ids: list[str]
    query: str | None
    correction_id: str | None = None
    operations: list[FactOp] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "operations": [op.to_dict() for op in self.operations]}
