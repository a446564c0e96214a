"""The conversation file format (docs/conversations.md): sessions of dated turns with ids.

{"id": "conv-1",
 "sessions": [{"id": "1", "date": "2023-05-08T13:56:00Z",
               "turns": [{"id": "D1:1", "speaker": "Caroline", "text": "Hi!"}, ...]}, ...],
 "questions": [{"id": "q1", "question": "...", "answer": "...", "evidence": ["D1:1"],
                "category": "single-hop"}, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._errors import InvalidInputError
from .._time import parse_time


@dataclass(frozen=True)
class Session:
    id: str
    date: Any
    messages: list[dict[str, Any]]
    turn_ids: list[str | None]
    metadata: dict[str, Any]


def sessions(data: Any) -> list[Session]:
    """Validate a conversation document and return its sessions, in order."""
    if not isinstance(data, dict) or not isinstance(data.get("sessions"), list):
        raise InvalidInputError("a conversation file is a JSON object with a 'sessions' list; "
                                "see docs/conversations.md")
    return [_session(raw, n) for n, raw in enumerate(data["sessions"])]


def _session(raw: Any, n: int) -> Session:
    if not isinstance(raw, dict) or not isinstance(raw.get("turns"), list) or not raw["turns"]:
        raise InvalidInputError(f"session {n} needs a non-empty 'turns' list")
    sid = str(raw.get("id", n + 1))
    date = parse_time(raw["date"], field=f"session {sid} date") if raw.get("date") else None
    messages, ids = [], []
    for t, turn in enumerate(raw["turns"]):
        if not isinstance(turn, dict) or "text" not in turn:
            raise InvalidInputError(f"session {sid} turn {t} needs 'text'")
        message = {"role": turn.get("role", "user"), "content": turn["text"]}
        if turn.get("speaker"):
            message["name"] = str(turn["speaker"])
        if turn.get("timestamp"):
            message["timestamp"] = turn["timestamp"]
        if turn.get("id") is not None:
            message["metadata"] = {"turn_id": str(turn["id"])}
        messages.append(message)
        ids.append(str(turn["id"]) if turn.get("id") is not None else None)
    return Session(sid, date, messages, ids, {"conversation_session": sid})
