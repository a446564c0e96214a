"""The derived tiers over the API (`memstack serve --model smollm2|FOLDER`):

    POST /v1/generate   a local model answers from the caller's memories, starting from the KV
                        blocks of hot ones; server-sent events, or one JSON body with "stream":
                        false (the fields of memstack.Generation)
    POST /v1/ask        a LoRA shard answers from its weights alone ({"shard", "text"})

One model per process, loaded when the app is built (each `--workers` process loads its own).
Both stay inside the cubes the caller's key can read: the search that picks the memories, and
so the KV blocks, runs over readable cubes only; routing ("shard": "auto") votes only among the
shards of those cubes; a shard named by id that holds anything the key cannot read answers 404
as if it did not exist. Without a model both answer 404 `model_not_loaded`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from .. import _errors as errors
from .._memory import Memory
from . import schemas as S
from .access import Gate
from .auth import Keys, Principal

if TYPE_CHECKING:
    from ..store.shards import ShardRow
    from ..tiers.activation import LocalModel, Stream

log = logging.getLogger("memstack.server")
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": S.ErrorBody} for status in (400, 401, 403, 404, 422, 429, 503)}
Body = TypeVar("Body", bound=BaseModel)


class Turn:
    """A lock on the model that a long holder hands over between its steps: background
    maintenance retraining a shard calls `pause()` after each optimizer step, so a request
    waiting for the model runs then instead of after the whole retrain."""

    def __init__(self) -> None:
        self._lock, self._count = threading.Lock(), threading.Lock()
        self.waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._count:
            self.waiting += 1
        try:
            return self._lock.acquire(blocking, timeout)
        finally:
            with self._count:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def pause(self, patience: float = 1.0) -> None:
        """Called by the holder: when someone waits, let them take the turn, then wait for it
        again (`patience`: how long to wait for a waiter to take it before going on)."""
        if not self.waiting:
            return
        self._lock.release()
        deadline = time.monotonic() + patience
        while self.waiting and time.monotonic() < deadline:
            time.sleep(0.005)
        self._lock.acquire()

    def __enter__(self) -> "Turn":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ServedModel:
    """The one local model of a server process, and what a caller may do with it. Calls take
    turns (a lock): the model's prefix caches, its loaded KV blocks and its tokenizer are
    shared state, and on a CPU a second decode at once would only halve the speed of both.
    A request that waits longer than `wait` seconds for its turn gets ModelBusyError (503
    model_busy) instead of holding a worker thread."""

    def __init__(self, memory: Memory, lm: LocalModel, wait: float = 60.0) -> None:
        self.memory, self.lm, self.wait = memory, lm, wait
        self.gate = Gate(memory, Keys(memory.store))
        self.turn = Turn()

    def _take_turn(self) -> None:
        if not self.turn.acquire(timeout=self.wait):
            raise errors.ModelBusyError(f"the model served other requests for {self.wait:g} s; "
                                        "retry later")

    @classmethod
    def load(cls, memory: Memory, model: ServedModel | LocalModel | str | Path
             ) -> ServedModel:
        """Load the model and its tiers now, so that no request waits for them."""
        if isinstance(model, ServedModel):
            return model
        lm = memory.local_model(model)
        memory.activation(lm)
        memory.parametric(lm)
        return cls(memory, lm)

    # generation ------------------------------------------------------------------------------
    def pieces(self, who: Principal, body: S.GenerateRequest) -> Iterator[str | dict]:
        """Text pieces, then the Generation as a dict. The search and the KV blocks are done
        before this returns, so a bad request fails before any event is sent; decoding runs
        in a thread of its own that gives the turn back when it ends, whether or not anyone
        still reads (an HTTP client that hangs up leaves the response's iterator unclosed
        until garbage collection; closing this one stops decoding at the next piece)."""
        cubes = self.readable(who, body.cube)
        self._take_turn()
        out: queue.SimpleQueue = queue.SimpleQueue()
        gone = threading.Event()
        try:
            stream = self.memory.generate(
                body.query, model=self.lm, cube=cubes, user_id=body.user_id,
                agent_id=body.agent_id, session_id=body.session_id, top_k=body.top_k,
                max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                seed=body.seed, use_cache=body.use_cache, stream=True)
            threading.Thread(target=self._decode, args=(stream, out, gone), daemon=True,
                             name="memstack-generate").start()
        except BaseException:  # the decode thread never started: the turn is still ours
            self.turn.release()
            raise
        return _drain(out, gone)

    def _decode(self, stream: Stream, out: queue.SimpleQueue, gone: threading.Event) -> None:
        try:
            for piece in stream:
                out.put(piece)
                if gone.is_set():
                    return
            out.put(stream.result.to_dict())  # type: ignore[union-attr]
        except Exception as exc:  # the reader raises it
            out.put(exc)
        finally:
            self.turn.release()
            out.put(_END)

    def generate(self, who: Principal, body: S.GenerateRequest) -> dict[str, Any]:
        """The Generation of a request, whole."""
        *_, result = self.pieces(who, body)
        return result  # type: ignore[return-value]

    # shards ----------------------------------------------------------------------------------
    def ask(self, who: Principal, body: S.AskRequest) -> dict[str, Any]:
        if body.shard == "auto":
            scope: dict[str, Any] = {"cube": self.readable(who, body.cube)}
        else:
            self.shard(who, body.shard)
            scope = {}
        self._take_turn()
        try:
            return self.memory.ask(body.question, model=self.lm, shard=body.shard,
                                   user_id=body.user_id, agent_id=body.agent_id,
                                   max_new_tokens=body.max_new_tokens, **scope)
        finally:
            self.turn.release()

    def shard(self, who: Principal, shard_id: str) -> ShardRow:
        """A shard the caller may use: everything in its weights (its items) is in cubes the
        key can read. Otherwise it is reported missing, like an item."""
        store = self.memory.store
        row, missing = store.shard(shard_id), errors.NotFoundError(f"no shard {shard_id!r}")
        if row is None or row.status != "active":  # a stale shard may hold deleted memories
            raise missing
        items = store.items_by_id(row.item_ids)
        visible = self.gate.keys.visible_cubes(who)
        cube_ids = {row.cube_id} | {store.cube(name).id for name in
                                    {i.cube for i in items.values()}}
        if len(items) != len(set(row.item_ids)) or (visible is not None and
                                                    not cube_ids <= set(visible)):
            raise missing
        if row.model_key != self.lm.key:
            raise errors.InvalidInputError(f"shard {shard_id} was trained for another base "
                                           f"model than this server's ({self.lm.name})")
        return row

    def readable(self, who: Principal, cube: str | list[str] | None) -> list[str]:
        """The cubes a request names (or the caller's own), each checked for reading."""
        names = [cube] if isinstance(cube, str) or cube is None else cube
        return [self.gate.cube(who, name, "read").name for name in names]


_END = object()


def _drain(out: queue.SimpleQueue, gone: threading.Event) -> Iterator[Any]:
    try:
        while (item := out.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        gone.set()


def parse(kind: type[Body], **fields: Any) -> Body:
    """A request body from keyword arguments (MCP tools), with the REST API's checks."""
    try:
        return kind(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors()[:5])
        raise errors.InvalidInputError(problems) from exc


# REST --------------------------------------------------------------------------------------------
def install(app: FastAPI, served: ServedModel | None, principal: Callable[..., Principal],
            status: Callable[[Exception], tuple[int, str]]) -> None:
    """Add /v1/generate and /v1/ask to `app` (404 model_not_loaded when `served` is None).
    `status` maps an error to (HTTP status, code), for an error after the stream began."""
    if served is None:
        _not_loaded(app)
        return
    Who = Depends(principal)

    @app.post("/v1/generate", tags=["tiers"], response_model=S.GenerationOut,
              responses={**ERRORS, 200: {"content": {"text/event-stream": {}},
                                         "description": "the Generation, or its events"}})
    def generate(body: S.GenerateRequest, who: Principal = Who):
        """Answer with the server's local model from the caller's memories. With "stream"
        (the default) server-sent events: `text` ({"text": piece}) as the model writes, then
        `generation` (the whole Generation); an error after the first event is an `error`
        event ({"error": {"code", "message", "type"}})."""
        if not body.stream:
            return JSONResponse(served.generate(who, body))
        return StreamingResponse(sse(served.pieces(who, body), status),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.post("/v1/ask", tags=["tiers"], response_model=S.AskOut, responses=ERRORS)
    def ask(body: S.AskRequest, who: Principal = Who):
        """A LoRA shard answers from its weights alone (no retrieval); "auto" routes the
        question to the shard of the caller's cubes that holds most of its best hits."""
        return served.ask(who, body)


def sse(pieces: Iterator[str | dict], status: Callable[[Exception], tuple[int, str]]
        ) -> Iterator[str]:
    """Server-sent events of a generation: `text` per piece, `generation` last."""
    try:
        for piece in pieces:
            if isinstance(piece, str):
                yield _event("text", {"text": piece})
            else:
                yield _event("generation", piece)
    except Exception as exc:  # the status line is sent: the error goes as an event
        log.error("generation failed mid-stream", exc_info=exc)
        known = isinstance(exc, errors.MemstackError)
        code = status(exc)[1] if known else "internal_error"
        yield _event("error", {"error": {"code": code, "message": str(exc) if known else
                                         f"internal error ({type(exc).__name__})",
                                         "type": type(exc).__name__ if known else None}})


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _not_loaded(app: FastAPI) -> None:
    def unavailable() -> JSONResponse:
        return JSONResponse({"error": {
            "code": "model_not_loaded", "type": None,
            "message": "this server has no local model; start it with --model smollm2 (or a "
                       "model folder, or env MEMSTACK_MODEL)"}}, status_code=404)

    for path in ("/v1/generate", "/v1/ask"):  # not in the spec: this server cannot do it
        app.post(path, include_in_schema=False)(unavailable)
