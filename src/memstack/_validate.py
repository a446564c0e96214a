"""Checks at the boundary of the public API: names, scopes, metadata and limits."""

from __future__ import annotations

import getpass
import json
from typing import Any

from ._errors import InvalidInputError, InvalidLimitError


def login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise InvalidInputError(f"{what} must be a non-empty string of at most 200 characters, "
                                f"got {value!r}")
    return value.strip()


def scope(user_id: Any, agent_id: Any, session_id: Any) -> dict[str, str | None]:
    scope = {"user_id": user_id, "agent_id": agent_id, "session_id": session_id}
    return {k: (name(v, k) if v is not None else None) for k, v in scope.items()}


def metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInputError("metadata must be a dict with string keys")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata must be JSON-serialisable: {exc}") from exc
    return dict(metadata)


def limit(value: Any, what: str, *, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise InvalidLimitError(f"{what} must be an integer from 1 to {maximum:,}, got {value!r}")
    return value
