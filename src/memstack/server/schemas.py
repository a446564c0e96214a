"""Request and response bodies of the REST API (they make the OpenAPI spec)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Scalar = str | int | float | bool | None


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. not_found, forbidden")
    message: str
    type: str | None = None
    request_id: str | None = Field(default=None, description="the response's X-Request-ID")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant", "system", "tool"] = "user"
    content: str = Field(min_length=1, max_length=1_000_000)
    name: str | None = Field(default=None, max_length=200)
    timestamp: str | None = None
    metadata: dict[str, Any] | None = None


class AddRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: str | Message | list[Message] = Field(
        description="a string, a message, or a non-empty list of messages")
    cube: str | None = Field(default=None, max_length=200)
    user_id: str | None = Field(default=None, max_length=200)
    agent_id: str | None = Field(default=None, max_length=200)
    session_id: str | None = Field(default=None, max_length=200)
    observed_at: str | None = None
    metadata: dict[str, Any] | None = None
    kind: Literal["turn", "fact", "insight", "procedure", "core"] = "turn"
    infer: bool = True
    expires_at: str | None = Field(default=None, description="ISO 8601; the items leave search "
                                                                "then (instead of ttl)")
    ttl: float | str | None = Field(default=None, description="seconds, or '90m', '12h', "
                                                                "'30d', '2w'")


class ScopedQuery(BaseModel):
    """A query and the scope it reads (the cubes, or the key's own; user, agent, session)."""
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=4096)
    cube: str | list[str] | None = None
    user_id: str | None = Field(default=None, max_length=200)
    agent_id: str | None = Field(default=None, max_length=200)
    session_id: str | None = Field(default=None, max_length=200)


class SearchRequest(ScopedQuery):
    kinds: list[Literal["turn", "session", "fact", "insight", "procedure", "core",
                        "feedback"]] | None = None
    filters: dict[str, Any] | None = None
    since: str | None = None
    until: str | None = None
    as_of: str | None = None
    top_k: int = Field(default=10, ge=1, le=1000)
    threshold: float | None = None
    feedback: bool = Field(default=True, description="false: results as if this user had "
                                                     "given no feedback")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str = Field(min_length=1, max_length=200,
                        description="a memory id, or the id of an answer or generation")
    signal: Literal["positive", "negative"]
    query: str | None = Field(default=None, min_length=1, max_length=4000,
                              description="the query the memory was a hit for (an answer's "
                                          "own question by default); without one, rankings "
                                          "do not move")
    correction: str | None = Field(default=None, min_length=1, max_length=10_000,
                                   description="what is right instead: stored as a memory "
                                               "ranked ahead of the corrected one")
    user_id: str | None = Field(default=None, min_length=1, max_length=200)
    agent_id: str | None = Field(default=None, min_length=1, max_length=200)


class FeedbackOut(BaseModel):
    id: str = Field(description="the feedback item (delete it to undo the feedback)")
    signal: str
    item_ids: list[str]
    query: str | None
    correction_id: str | None
    operations: list[dict[str, Any]]


class UpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(min_length=1, max_length=1_000_000)
    metadata: dict[str, Any] | None = None
    reason: str = Field(default="update", max_length=1000)


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=4096)
    cube: str | list[str] | None = None
    user_id: str | None = Field(default=None, max_length=200)
    agent_id: str | None = Field(default=None, max_length=200)
    session_id: str | None = Field(default=None, max_length=200)
    as_of: str | None = None
    top_k: int = Field(default=30, ge=1, le=1000)
    max_context_tokens: int = Field(default=2000, ge=50, le=200_000)


class CubeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)


class GrantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=200)
    access: Literal["read", "write"]


class UserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "user"] = "user"


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "user"] | None = None
    cubes: list[str] | None = None
    label: str | None = Field(default=None, max_length=200)


# responses --------------------------------------------------------------------------------------
class ItemOut(BaseModel):
    id: str
    cube: str
    kind: str
    content: str | None
    memory: str | None
    role: str | None
    speaker: str | None
    user_id: str | None
    agent_id: str | None
    session_id: str | None
    parent_id: str | None
    metadata: dict[str, Any]
    tags: list[str]
    observed_at: str | None
    valid_from: str | None
    valid_to: str | None
    recorded_at: str | None
    updated_at: str | None
    status: str
    version: int
    superseded_by: str | None
    source_ids: list[str]
    producer: str
    content_hash: str | None
    access_count: int
    expires_at: str | None = None
    last_accessed: str | None
    importance: float
    kv_blocks: list[str]
    shards: list[str]


class HitOut(ItemOut):
    score: float
    ranks: dict[str, int]
    scores: dict[str, float]


class SearchOut(BaseModel):
    results: list[HitOut]


class ItemsOut(BaseModel):
    items: list[ItemOut]
    next_offset: int | None


class VersionOut(BaseModel):
    item_id: str
    version: int
    content: str | None
    metadata: dict[str, Any]
    status: str
    valid_from: str | None
    valid_to: str | None
    changed_at: str | None
    reason: str
    actor: str
    superseded_by: str | None
    source_ids: list[str]


class AddOut(BaseModel):
    results: list[dict[str, Any]]
    session_id: str | None
    extraction: dict[str, Any] | None = None


class AnswerOut(BaseModel):
    id: str = Field(description="name it in POST /v1/feedback (kept 30 days)")
    text: str
    memory_ids: list[str]
    context_tokens: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class CubeOut(BaseModel):
    name: str
    owner: str | None
    created_at: str | None
    embed_model: str
    embed_dim: int
    item_count: int
    access: Literal["read", "write"] | None = None


class GrantOut(BaseModel):
    user: str
    access: str
    granted_by: str
    granted_at: float


class KeyOut(BaseModel):
    id: str
    user: str
    cubes: list[str] | None
    label: str | None
    created_at: float
    last_used: float | None
    revoked: bool


class NewKeyOut(BaseModel):
    key_id: str
    token: str = Field(description="the API key; shown only this once")
    user: str
    role: str


class CubeImportOut(BaseModel):
    cube: str
    items: int
    keys: int
    remapped: int
    reembedded: bool
    audit_entries: int
    file: str
    kv_blocks: int | None = None  # an archive with its tiers
    shards: int | None = None


class AuditHeadOut(BaseModel):
    seq: int
    hash: str
    store: str | None = None
    exported_at: str | None = None


class AuditHead(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a head file also names its store and time
    seq: int = Field(ge=0)
    hash: str = Field(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")


class AuditVerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    head: AuditHead | None = None


class AuditVerifyOut(BaseModel):
    ok: bool
    entries: int
    head: AuditHead | None
    problem: str | None
    seq: int | None
    message: str


class UserOut(BaseModel):
    id: str
    role: str
    created_at: float


class MeOut(BaseModel):
    user: str
    role: str
    key_id: str | None
    cubes: list[str] | None
    default_cube: str
    llm: str | None


class DeletedOut(BaseModel):
    deleted: str
    items_deleted: int
    receipt: dict[str, Any] | None = None  # with ?receipt=true (govern/receipt.py)


class ImportOut(BaseModel):
    turns: int
    sessions: int


# the derived tiers (memstack serve --model) ------------------------------------------------------
class GenerateRequest(ScopedQuery):
    top_k: int = Field(default=10, ge=1, le=100)
    max_new_tokens: int = Field(default=128, ge=1, le=1024)
    temperature: float = Field(default=0.0, ge=0, le=5, description="0 decodes greedily")
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    use_cache: bool = Field(default=True, description="start from KV blocks of hot memories")
    stream: bool = Field(default=True, description="server-sent events; false: one JSON body")


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=4096)
    shard: str = Field(default="auto", min_length=1, max_length=200,
                       description="a shard id, or auto: routed among the cubes' shards")
    cube: str | list[str] | None = None
    user_id: str | None = Field(default=None, max_length=200)
    agent_id: str | None = Field(default=None, max_length=200)
    max_new_tokens: int = Field(default=64, ge=1, le=1024)


class GenerationOut(BaseModel):
    text: str
    token_ids: list[int]
    memory_ids: list[str] = Field(description="the memories the model was given")
    block_ids: list[str] = Field(description="the KV blocks it started from")
    cached_tokens: int
    prefilled_tokens: int
    ttft_seconds: float
    seconds: float
    finish_reason: Literal["stop", "length"]
    id: str = Field(default="", description="name it in POST /v1/feedback (kept 30 days)")


class AskOut(BaseModel):
    shard: str | None = Field(description="the shard that answered; null: the base model")
    text: str


class RetentionRuleOut(BaseModel):
    cube: str
    kind: str
    expire_after: float | None
    archive_unused: float | None
    purge_after: float | None
    set_by: str | None
    set_at: str | None


class RetentionRequest(BaseModel):
    """A cube's rule for one kind ("*": its kinds without their own); durations in seconds or
    such as '30d'; all three null removes the rule."""
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(default="*", max_length=20)
    expire_after: float | str | None = None
    archive_unused: float | str | None = None
    purge_after: float | str | None = None
    confirm: bool = Field(default=False, description="needed when the rules would take every "
                                                     "item of the cube out of search")


class RetentionOut(BaseModel):
    rule: RetentionRuleOut | None
    next_run: dict[str, Any]
