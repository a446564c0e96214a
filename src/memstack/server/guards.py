"""What the server does with a request that abuses it, before any of its work starts
(docs/server.md, "Errors"):

- `BodyGuard` (plain ASGI: BaseHTTPMiddleware's per-request cost showed in profiles) reads a
  request body in full before the app sees it, in the event loop (no worker thread waits for
  a slow client): over the size limit it answers 413 `too_large` (by Content-Length before
  reading, or as soon as a chunked body passes it); slower than `BodyTimeout` it answers 408
  `timeout` and closes the connection; a client that hangs up half-way is logged as 499
  `client_closed` (nginx's code; nobody receives it). The app then reads the body from
  memory, so nothing that happens to the connection reaches FastAPI's body parser, which
  answers any error there with a 400, as if the client had sent a bad body.
- `JSONRoute` refuses, with `UnsupportedMediaType` (415), a body that is not JSON on a route
  that takes JSON: application/json, with or without parameters, and application/*+json pass.
- `raise_open_files()`: every connection, even an idle one, holds a file descriptor, and a
  soft limit of 1,024 is reached by 1,000 idle clients; `memstack serve` raises it first.
"""

from __future__ import annotations

import email.message
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import anyio
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from .._errors import InvalidInputError

__all__ = ["BodyGuard", "BodyTimeout", "JSONRoute", "UnsupportedMediaType", "raise_open_files"]

Refuse = Callable[..., Response]  # (status, code, message, headers=...) -> a JSON error


@dataclass(frozen=True)
class BodyTimeout:
    """How long a client may take to send a request body: `total` seconds for all of it, and
    `gap` seconds between two of its pieces (a client sending a byte a second passes every
    gap, not the total). Idle keep-alive connections are uvicorn's (`timeout_keep_alive`)."""

    total: float = 30.0
    gap: float = 10.0

    def __post_init__(self) -> None:
        if not (self.total > 0 and self.gap > 0):
            raise InvalidInputError(f"a body timeout is over 0 seconds; got total {self.total}, "
                                    f"gap {self.gap}")

    @classmethod
    def of(cls, value: "float | BodyTimeout") -> "BodyTimeout":
        """A BodyTimeout from itself or from a total in seconds (the gap then at most 10 s)."""
        if isinstance(value, BodyTimeout):
            return value
        return cls(total=float(value), gap=min(cls.gap, float(value)))


class _Refused(Exception):
    pass


class _TooLarge(_Refused):
    pass


class _TooSlow(_Refused):
    pass


class _Gone(_Refused):
    """The client disconnected before its body was complete."""


class BodyGuard:
    """Reads a request's body before the app runs; answers 413, 408 (or 499) itself."""

    def __init__(self, app: Any, *, limit: int, timeout: BodyTimeout, refuse: Refuse) -> None:
        self.app, self.limit, self.timeout, self.refuse = app, limit, timeout, refuse

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not has_body(scope):
            return await self.app(scope, receive, send)
        try:
            messages = await self._read(scope, receive)
        except _Refused as refused:
            return await self._refusal(refused)(scope, receive, send)
        await self.app(scope, _replay(messages, receive), send)

    async def _read(self, scope: dict, receive: Any) -> list[dict]:
        """The body's messages, read within the size and time limits."""
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            raise _TooLarge()  # before reading any of it
        messages, size = [], 0
        deadline = time.monotonic() + self.timeout.total
        while True:
            wait = min(self.timeout.gap, deadline - time.monotonic())
            with anyio.move_on_after(max(wait, 0)) as waiting:
                message = await receive()
            if waiting.cancelled_caught:
                raise _TooSlow()
            if message["type"] == "http.disconnect":
                raise _Gone()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                raise _TooLarge()
            if not message.get("more_body"):
                return messages

    def _refusal(self, refused: _Refused) -> Response:
        if isinstance(refused, _TooLarge):
            return self.refuse(413, "too_large", f"the request body is over {self.limit:,} bytes")
        if isinstance(refused, _TooSlow):
            return self.refuse(408, "timeout", "the request body did not arrive in time (all of "
                               f"it within {self.timeout.total:g} s, each piece within "
                               f"{self.timeout.gap:g} s of the last)",
                               headers={"Connection": "close"})  # and stop reading it
        # nobody receives this one: the access log and the metrics count nginx's 499
        return self.refuse(499, "client_closed", "the client closed the connection before its "
                           "request body was complete")


def has_body(scope: dict) -> bool:
    """Whether an HTTP/1.1 request has a body: a Content-Length other than 0, or chunked."""
    length = _header(scope, b"content-length")
    return (length is not None and length.strip(b"0") != b"") or \
        _header(scope, b"transfer-encoding") is not None


def _header(scope: dict, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _replay(messages: list[dict], receive: Any) -> Any:
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()  # then: the disconnect

    return replayed


class UnsupportedMediaType(Exception):
    """A body that is not JSON sent to a route that takes JSON (415)."""


class JSONRoute(APIRoute):
    """A FastAPI route that checks the Content-Type of a JSON body before reading it. FastAPI
    alone reads any other type as bytes and answers 422, as if the JSON had wrong fields."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        if self.body_field is None or _is_form(self.body_field):
            return handler

        async def checked(request: Request) -> Response:
            if has_body(request.scope) and not is_json(request.headers.get("content-type")):
                raise UnsupportedMediaType(_media_message(request.headers.get("content-type")))
            return await handler(request)

        return checked


def is_json(content_type: str | None) -> bool:
    """application/json (any parameters) or application/<anything>+json."""
    if not content_type:
        return False
    parsed = email.message.Message()
    parsed["content-type"] = content_type
    subtype = parsed.get_content_subtype()
    return parsed.get_content_maintype() == "application" and \
        (subtype == "json" or subtype.endswith("+json"))


def _is_form(field: Any) -> bool:
    from fastapi import params

    return isinstance(field.field_info, params.Form)


def _media_message(content_type: str | None) -> str:
    got = f"got {content_type[:100]!r}" if content_type else "it has no Content-Type"
    return f"this route takes a JSON body: send Content-Type: application/json ({got})"


def raise_open_files(want: int = 65_536) -> tuple[int, int] | None:
    """Raise this process's soft limit on open files toward the hard limit (at most `want`),
    for a server holding many connections; its worker processes inherit it. Returns (before,
    after), e.g. (1024, 65536), or None where there is no such limit (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. macOS caps it below the reported hard limit
            return soft, soft
        return soft, target
    return soft, soft
