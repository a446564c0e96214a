"""Client and AsyncClient: Memory's methods over the REST API, so code moves between embedded and
remote by changing one line:

    m = Memory("memory.db")                                  # embedded
    m = Client("http://127.0.0.1:8000", api_key="msk_...")   # remote, same calls

Each method is written once, as a request and a parser (`_Api`); the sync and async clients only
send it. HTTP errors come back as the memstack exception the server raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Callable
from urllib.parse import quote

import httpx

from . import _errors as errors
from ._models import (AddResult, Answer, Cube, Extraction, FactOp, FeedbackResult, Generation,
                      Hit, Item, Version)


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    parse: Callable[[Any], Any]
    json: Any = None
    params: dict[str, Any] | None = None
    ndjson: bool = False  # the reply is JSON lines (export), not one JSON document


def _dates(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    out = {k: v for k, v in data.items() if k in names}
    for name, value in out.items():
        if isinstance(value, str) and name.endswith(("_at", "_from", "_to", "accessed")):
            out[name] = datetime.fromisoformat(value)
    return out


def item(data: dict[str, Any]) -> Item:
    return Item(**_dates(Item, data))


def _hit(data: dict[str, Any]) -> Hit:
    return Hit(item(data), data["score"], data["ranks"], data.get("scores", {}))


def _add(data: dict[str, Any]) -> AddResult:
    turns = [r for r in data["results"] if r.get("kind") == "turn" or "source_ids" not in r]
    items = [Item(id=r["id"], cube="", kind=r.get("kind", "turn"), content=r.get("memory"))
             for r in turns]
    ext = data.get("extraction")
    extraction = None
    if ext is not None:
        ops = [FactOp(r["event"], r["id"] if r["event"] in ("ADD", "UPDATE") else None,
                      r.get("memory"), r.get("previous_id"), r.get("previous_memory"),
                      r.get("source_ids", []), r.get("kind", "fact"))
               for r in data["results"] if r not in turns]
        extraction = Extraction(ops, **{k: v for k, v in ext.items() if k != "operations"})
    return AddResult(items, None, extraction)


def _scope(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class _Api:
    """The endpoints: each method returns the request to send and how to read the reply."""

    def add(self, messages: Any, *, user_id: str | None = None, agent_id: str | None = None,
            session_id: str | None = None, run_id: str | None = None, observed_at: Any = None,
            metadata: dict[str, Any] | None = None, cube: str | None = None,
            kind: str = "turn", infer: bool = True) -> _Request:
        body = _scope(messages=messages, user_id=user_id, agent_id=agent_id,
                      session_id=session_id or run_id, metadata=metadata, cube=cube,
                      observed_at=observed_at.isoformat() if isinstance(observed_at, datetime)
                      else observed_at, kind=kind, infer=infer)
        return _Request("POST", "/v1/memories", _add, body)

    def search(self, query: str, *, user_id: str | None = None, agent_id: str | None = None,
               session_id: str | None = None, run_id: str | None = None,
               cube: str | list[str] | None = None, kinds: list[str] | None = None,
               filters: dict[str, Any] | None = None, since: Any = None, until: Any = None,
               as_of: Any = None, top_k: int = 10, limit: int | None = None,
               threshold: float | None = None, feedback: bool = True) -> _Request:
        body = _scope(query=query, user_id=user_id, agent_id=agent_id,
                      session_id=session_id or run_id, cube=cube, kinds=kinds, filters=filters,
                      since=_iso(since), until=_iso(until), as_of=_iso(as_of),
                      top_k=limit or top_k, threshold=threshold)
        if not feedback:
            body["feedback"] = False
        return _Request("POST", "/v1/search", lambda d: [_hit(h) for h in d["results"]], body)

    def feedback(self, target: str, signal: str, *, query: str | None = None,
                 correction: str | None = None, user_id: str | None = None,
                 agent_id: str | None = None) -> _Request:
        body = _scope(target=target, signal=signal, query=query, correction=correction,
                      user_id=user_id, agent_id=agent_id)
        return _Request("POST", "/v1/feedback", _feedback_result, body)

    def get(self, memory_id: str) -> _Request:
        return _Request("GET", f"/v1/memories/{_safe(memory_id)}", item)

    def get_all(self, *, user_id: str | None = None, agent_id: str | None = None,
                session_id: str | None = None, run_id: str | None = None,
                cube: str | None = None, kinds: list[str] | None = None, limit: int = 100,
                offset: int = 0) -> _Request:
        params = _scope(user_id=user_id, agent_id=agent_id, session_id=session_id or run_id,
                        cube=cube, kind=kinds, limit=limit, offset=offset)
        return _Request("GET", "/v1/memories", lambda d: [item(i) for i in d["items"]],
                        params=params)

    def update(self, memory_id: str, data: str, *, metadata: dict[str, Any] | None = None,
               reason: str = "update") -> _Request:
        return _Request("PUT", f"/v1/memories/{_safe(memory_id)}", item,
                        _scope(data=data, metadata=metadata, reason=reason))

    def delete(self, memory_id: str, *, cascade: bool = True) -> _Request:
        return _Request("DELETE", f"/v1/memories/{_safe(memory_id)}",
                        lambda d: d["items_deleted"], params={"cascade": cascade})

    def history(self, memory_id: str) -> _Request:
        return _Request("GET", f"/v1/memories/{_safe(memory_id)}/history",
                        lambda d: [Version(**_dates(Version, v)) for v in d])

    def answer(self, question: str, *, user_id: str | None = None,
               agent_id: str | None = None, session_id: str | None = None,
               cube: str | list[str] | None = None, as_of: Any = None, top_k: int = 30,
               max_context_tokens: int = 2000) -> _Request:
        body = _scope(question=question, user_id=user_id, agent_id=agent_id,
                      session_id=session_id, cube=cube, as_of=_iso(as_of), top_k=top_k,
                      max_context_tokens=max_context_tokens)
        return _Request("POST", "/v1/answer", lambda d: Answer(**d), body)

    def generate(self, query: str, *, model: Any = None, user_id: str | None = None,
                 agent_id: str | None = None, session_id: str | None = None,
                 cube: str | list[str] | None = None, top_k: int = 10,
                 max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                 use_cache: bool = True) -> _Request:
        """The server's local model (`memstack serve --model`; `model` is accepted for
        Memory's signature and not sent) answers from the caller's memories: a Generation."""
        body = _scope(query=query, user_id=user_id, agent_id=agent_id, session_id=session_id,
                      cube=cube, top_k=top_k, max_new_tokens=max_new_tokens,
                      temperature=temperature, seed=seed, use_cache=use_cache, stream=False)
        return _Request("POST", "/v1/generate", lambda d: Generation(**d), body)

    def ask(self, question: str, *, model: Any = None, shard: str = "auto",
            user_id: str | None = None, agent_id: str | None = None,
            cube: str | list[str] | None = None, max_new_tokens: int = 64) -> _Request:
        """A LoRA shard of the server's model answers from its weights alone:
        {"shard", "text"} (`model` as for generate)."""
        body = _scope(question=question, shard=shard, user_id=user_id, agent_id=agent_id,
                      cube=cube, max_new_tokens=max_new_tokens)
        return _Request("POST", "/v1/ask", lambda d: d, body)

    def cubes(self) -> _Request:
        return _Request("GET", "/v1/cubes",
                        lambda d: [Cube(**_dates(Cube, c)) for c in d])

    def create_cube(self, name: str) -> _Request:
        return _Request("POST", "/v1/cubes", lambda d: Cube(**_dates(Cube, d)), {"name": name})

    def grant(self, cube: str, user: str, access: str) -> _Request:
        return _Request("PUT", f"/v1/cubes/{_safe(cube)}/grants", lambda d: d,
                        {"user": user, "access": access})

    def export(self, cube: str) -> _Request:
        return _Request("GET", f"/v1/cubes/{_safe(cube)}/export", lambda d: d, ndjson=True)


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _safe(part: str) -> str:
    if not isinstance(part, str) or not part:
        raise errors.InvalidInputError(f"an id is a non-empty string, got {part!r}")
    return quote(part, safe="")


_CODES: dict[int, type[errors.MemstackError]] = {
    400: errors.InvalidInputError, 401: errors.AuthenticationError,
    403: errors.PermissionDeniedError, 404: errors.NotFoundError, 413: errors.InvalidInputError,
    422: errors.InvalidInputError, 429: errors.RateLimitedError, 502: errors.LLMError}


def _result(request: _Request, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "http_error", "message": response.text[:300], "type": None}
        kind = getattr(errors, error.get("type") or "", None)
        if not (isinstance(kind, type) and issubclass(kind, errors.MemstackError)) or \
                kind is errors.RemoteError or kind is errors.LLMError:
            kind = _CODES.get(response.status_code)
        if kind is None or kind is errors.LLMError:
            raise errors.RemoteError(f"HTTP {response.status_code} {error.get('code')}: "
                                     f"{error.get('message')}", status=response.status_code,
                                     code=str(error.get("code")))
        raise kind(error.get("message", ""))
    if request.ndjson:
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]
    return request.parse(response.json())


class Client:
    """Memory's methods against a memstack server.

    >>> m = Client("http://127.0.0.1:8000", api_key="msk_...")
    >>> m.add("I adopted a cat", user_id="ann"); m.search("cat", user_id="ann")
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                  timeout=timeout, transport=transport)
        self._api = _Api()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __getattr__(self, name: str) -> Any:
        build = getattr(self._api, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            request = build(*args, **kwargs)
            try:
                response = self._http.request(request.method, request.path, json=request.json,
                                              params=request.params)
            except httpx.HTTPError as exc:
                raise errors.RemoteError(f"cannot reach the memstack server: {exc}") from exc
            return _result(request, response)

        call.__name__, call.__doc__ = name, build.__doc__
        return call


class AsyncClient:
    """Client's methods, awaitable (same requests, same parsing)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                       timeout=timeout, transport=transport)
        self._api = _Api()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    def __getattr__(self, name: str) -> Any:
        build = getattr(self._api, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            request = build(*args, **kwargs)
            try:
                response = await self._http.request(request.method, request.path,
                                                    json=request.json, params=request.params)
            except httpx.HTTPError as exc:
                raise errors.RemoteError(f"cannot reach the memstack server: {exc}") from exc
            return _result(request, response)

        call.__name__, call.__doc__ = name, build.__doc__
        return call


def _feedback_result(d: dict[str, Any]) -> FeedbackResult:
    ops = [FactOp(op["event"], op.get("id"), op.get("memory"), op.get("previous_id"),
                  op.get("previous_memory"), op.get("source_ids", []), op.get("kind", "fact"))
           for op in d.get("operations", [])]
    return FeedbackResult(d["id"], d["signal"], d["item_ids"], d["query"], d["correction_id"],
                          ops)
