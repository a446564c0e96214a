"""Drafts: items about to be written, made from messages (no store, no embedding)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .._models import Item
from .._validate import metadata as _metadata
from ..ingest.rules import Draft, Message, derived_metadata, item_keys
from ..store.base import CubeRow, content_hash


@dataclass
class Prepared:
    """An add() validated and drafted, waiting for its vectors and its transaction."""

    cube: CubeRow
    kind: str
    scope: dict[str, str | None]
    drafts: list[Draft]
    session_draft: Draft | None

    @property
    def all_drafts(self) -> list[Draft]:
        return ([self.session_draft] if self.session_draft else []) + self.drafts

    @property
    def key_count(self) -> int:
        return sum(len(d.key_texts) for d in self.all_drafts)


def message_draft(kind: str, msg: Message, scope: dict[str, str | None], when: datetime,
                  metadata: dict[str, Any], expires_at: datetime | None = None) -> Draft:
    """The draft of one message: its fields and search keys."""
    speaker = msg.name or msg.role
    observed = msg.timestamp or when
    texts, roles, resolved = item_keys(kind, speaker, msg.content, observed)
    meta = {**metadata, **_metadata(msg.metadata),
            **derived_metadata(kind, speaker, msg.content, resolved)}
    fields = {"id": uuid.uuid4().hex, "kind": kind, "content": msg.content,
              "content_hash": content_hash(msg.content), "role": msg.role,
              "speaker": speaker, **scope, "metadata": meta, "observed_at": observed,
              "valid_from": observed if kind != "turn" else None,
              "producer": "rules:v1", "status": "active", "expires_at": expires_at}
    return Draft(fields, texts, roles)


def session_draft(scope: dict[str, str | None], first: dict[str, Any]) -> Draft:
    """The session item for turns whose first has these fields (observed_at, speaker)."""
    header = (f"Conversation session {scope['session_id']} started "
              f"{first['observed_at']:%-d %B %Y} by {first['speaker']}")
    fields = {"id": uuid.uuid4().hex, "kind": "session", "content": header,
              "content_hash": content_hash(header), "role": None, "speaker": None, **scope,
              "metadata": {"turn_count": 0}, "observed_at": first["observed_at"],
              "producer": "rules:v1", "status": "active"}
    return Draft(fields, [header], ["body"])


def stored_keys(item: Item) -> tuple[list[str], list[str]]:
    """The key texts and roles of a stored item, as an add made them (rebuilt by reembed and
    migrate): a session's header as it is, any other item through the ingest rules."""
    if item.kind == "session":
        return [item.content or ""], ["body"]
    texts, roles, _ = item_keys(item.kind, item.speaker, item.content or "", item.observed_at)
    return texts, roles


def link(session: Item, drafts: list[Draft]) -> None:
    """Point turns at their session item and number them within it."""
    start = session.metadata.get("turn_count", 0)
    for n, draft in enumerate(drafts):
        draft.fields["parent_id"] = session.id
        draft.fields["metadata"] = {**draft.fields["metadata"], "turn_index": start + n}
