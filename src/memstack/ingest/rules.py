"""Rule-based ingestion (no LLM): messages -> turns with speaker, session and time, plus keys.

A key is a piece of text that search indexes for an item: a turn gets one key, or one per chunk
when it is long. Relative dates in a turn are resolved against the turn's time and written into its
key text and metadata, so "yesterday" on 8 May 2023 is found by a search for 7 May 2023.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .._errors import (ContentTooLargeError, EmptyContentError, InvalidEncodingError,
                       InvalidInputError)
from .._time import find_time_spans, parse_time
from ..store.base import ANCHOR

MAX_CONTENT_BYTES = 1_000_000
CHUNK_CHARS = 1200
CHUNK_OVERLAP = 200
ROLES = ("user", "assistant", "system", "tool")
NOT_THE_USER = frozenset(ROLES) - {"user"}  # speakers whose words are not the user's own


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None
    timestamp: datetime | None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Draft:
    """An item about to be written, with the texts of its search keys."""

    fields: dict[str, Any]
    key_texts: list[str]
    key_roles: list[str] = field(default_factory=list)


def clean_text(value: object, *, what: str = "content") -> str:
    """Validate text at the boundary: UTF-8, not empty, within the size limit."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEncodingError(f"{what} is not valid UTF-8 (byte {exc.start}); "
                                       "decode it with the right encoding first") from exc
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidEncodingError(f"{what} contains a lone surrogate at {exc.start}; "
                                   "it is not valid Unicode text") from exc
    if size > MAX_CONTENT_BYTES:
        raise ContentTooLargeError(f"{what} is {size:,} bytes; the limit is {MAX_CONTENT_BYTES:,}. "
                                   "Split it into several messages or store a summary.")
    if not value.strip():
        raise EmptyContentError(f"{what} is empty or only whitespace; there is nothing to remember")
    return value.replace("\x00", "")


def normalise_messages(messages: object) -> list[Message]:
    """A string, a message dict {role, content, name?, timestamp?} or a list of them."""
    if isinstance(messages, (str, bytes, bytearray)):
        return [Message("user", clean_text(messages), None, None)]
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError("messages must be a string, a dict {'role', 'content'} or a "
                                "non-empty list of such dicts")
    return [_message(m, n) for n, m in enumerate(messages)]


def _message(raw: object, n: int) -> Message:
    if isinstance(raw, str):
        return Message("user", clean_text(raw, what=f"message {n}"), None, None)
    if not isinstance(raw, dict) or "content" not in raw:
        raise InvalidInputError(f"message {n} must be a dict with 'role' and 'content'")
    role = raw.get("role", "user")
    if role not in ROLES:
        raise InvalidInputError(f"message {n}: role {role!r} is not one of {', '.join(ROLES)}")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise InvalidInputError(f"message {n}: name must be a non-empty string")
    stamp = raw.get("timestamp")
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise InvalidInputError(f"message {n}: metadata must be a dict")
    return Message(role, clean_text(raw["content"], what=f"message {n} content"),
                   name.strip() if name else None,
                   parse_time(stamp, field=f"message {n} timestamp") if stamp is not None else None,
                   meta)


def chunks(text: str) -> list[str]:
    """Split long text on paragraph and sentence boundaries into overlapping windows."""
    if len(text) <= CHUNK_CHARS:
        return [text]
    pieces = re.split(r"(?<=[.!?\n])\s+", text)
    out, buf = [], ""
    for piece in pieces:
        while len(piece) > CHUNK_CHARS:  # a "sentence" longer than a chunk: cut it
            head, piece = piece[:CHUNK_CHARS], piece[CHUNK_CHARS - CHUNK_OVERLAP:]
            out.append((buf + " " + head).strip() if buf else head)
            buf = ""
        if len(buf) + len(piece) + 1 > CHUNK_CHARS and buf:
            out.append(buf)
            buf = buf[-CHUNK_OVERLAP:]
        buf = (buf + " " + piece).strip()
    if buf:
        out.append(buf)
    return out


# A standing preference or instruction: what a later question relies on without repeating it
# ("Always include a code example when I ask about async errors", "I prefer tabs").
DIRECTIVE = re.compile(
    r"\b(?:always|never|from now on|going forward|in (?:the )?future|every time|whenever (?:i|you)"
    r"|make sure (?:to|you|that)|remember (?:to|that)|(?:do not|don't) forget"
    r"|please (?:do not|don't|avoid|keep|use|include|stop)|(?:do not|don't) (?:ever|use|include)"
    r"|prefer(?:s|red|ring|ence|ences)?|(?:would|'d) rather|my favou?rite"
    r"|i (?:like|love|hate|dislike|want you|need you|avoid|stick)"
    r"|i(?:'m| am) (?:allergic|vegan|vegetarian))\b", re.IGNORECASE)
DIRECTIVE_CHARS = 400
MAX_DIRECTIVES = 3
CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.DOTALL)
PROSE_KEYS = True  # BEAM-8 +0.021 any@10, LoCoMo (no code) unchanged: docs/benchmarks.md


def prose(content: str) -> str | None:
    """A message's words with its fenced code blocks left out, when code is a good part of it:
    a question about what was said or decided should not have to match the code around it."""
    if "```" not in content:
        return None
    text = re.sub(r"[ \t]*\n\s*", "\n", CODE_BLOCK.sub(" ", content)).strip()
    return text if text and len(text) < 0.8 * len(content) else None


def directives(speaker: str | None, content: str) -> list[str]:
    """The sentences of a user's message that state a standing preference or instruction
    (at most MAX_DIRECTIVES); none for the assistant's, the system's or a tool's words."""
    if speaker is not None and speaker.lower() in NOT_THE_USER:
        return []
    sentences = (s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", content))
    found = [s for s in sentences if s and len(s) <= DIRECTIVE_CHARS and DIRECTIVE.search(s)]
    return found[:MAX_DIRECTIVES]


DERIVED_METADATA = ("resolved_dates", "directive")  # metadata computed from an item's text


def derived_metadata(kind: str, speaker: str | None, content: str,
                     resolved: list[dict[str, str]]) -> dict[str, Any]:
    """Metadata that follows from the text: the relative dates resolved in it (item_keys), and
    whether the user states a preference or instruction in it (search can favour those)."""
    out: dict[str, Any] = {"resolved_dates": resolved} if resolved else {}
    if kind == "turn" and directives(speaker, content):
        out["directive"] = True
    return out


def item_keys(kind: str, speaker: str | None, content: str, observed_at: datetime | None
              ) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """Key texts for an item, their roles, and the relative dates resolved in it.

    A turn of the user's that states a preference or instruction inside a longer message also
    gets each such sentence as a key of its own (role "directive:n"), so a later question on
    that topic finds it without the rest of the message diluting it; a turn that is largely
    fenced code also gets its words without the code (roles "prose:n").
    A pure function of the item, so keys can be rebuilt at any time (re-embedding, repair).
    """
    if kind == "feedback":  # its query, as a vector only (store/base.py ANCHOR)
        return [content], [ANCHOR], []
    spans = find_time_spans(content, observed_at) if observed_at and kind != "session" else []
    resolved = [{"text": s.text, "start": s.start.date().isoformat(),
                 "end": s.end.date().isoformat(), "label": s.label()} for s in spans]
    suffix = ""
    if observed_at is not None:
        suffix = f" [{observed_at:%-d %B %Y}" + "".join(
            f"; {r['text']} = {r['label']}" for r in resolved) + "]"
    parts = chunks(content)
    prefix = f"{speaker}: " if speaker and kind == "turn" else ""
    texts = [f"{prefix}{part}{suffix}" for part in parts]
    roles = ["body"] if len(parts) == 1 else [f"chunk:{n}" for n in range(len(parts))]
    # a sentence that is most of its message is found as the message already
    said = [s for s in (directives(speaker, content) if kind == "turn" else [])
            if len(s) < 0.8 * len(content.strip())]
    texts += [f"{prefix}{sentence}{suffix}" for sentence in said]
    roles += [f"directive:{n}" for n in range(len(said))]
    words = prose(content) if PROSE_KEYS and kind == "turn" else None
    if words:
        pieces = chunks(words)
        texts += [f"{prefix}{piece}{suffix}" for piece in pieces]
        roles += [f"prose:{n}" for n in range(len(pieces))]
    return texts, roles, resolved


CONTEXT_CHARS = 600


def context_key(before: list[tuple[str, str]], turn: tuple[str, str],
                after: list[tuple[str, str]], observed_at: datetime | None) -> str:
    """A key that indexes a turn together with its neighbours (speaker, text pairs), so a reply
    like "Yes, last year!" is found by the words of the question it answers."""
    def line(pair: tuple[str, str]) -> str:
        speaker, text = pair
        return f"{speaker}: {text[:CONTEXT_CHARS]}"

    body = " \n".join([*map(line, before), line(turn), *map(line, after)])
    return body + (f" [{observed_at:%-d %B %Y}]" if observed_at else "")
