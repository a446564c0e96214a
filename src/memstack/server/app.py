"""The REST API: FastAPI over one shared Memory. Every route authenticates, checks the grant on
the cube it touches, calls one library method and returns JSON. Errors map to HTTP in one place
(`_status`, `_install_errors`), with a stable `code`, and every one is JSON:

    400 invalid_input (the library refused an argument), confirmation_required, invalid_json
        (a body that does not parse: the message gives line, column and character)
    401 unauthenticated   403 forbidden
    404 not_found (also an unknown path; llm_not_configured: /v1/answer on a server without
        an LLM; model_not_loaded: /v1/generate and /v1/ask on a server without --model)
    405 method_not_allowed (with an Allow header)
    408 timeout (the body did not arrive within the body timeout; the connection is closed)
    413 too_large (Content-Length or a chunked body over max_body_bytes)
    415 unsupported_media_type (a body that is not application/json, or application/*+json,
        on a route that takes JSON)
    422 validation_error (JSON with wrong or missing fields)   429 rate_limited
    502 llm_error   503 store_unavailable / model_busy   500 store_error / internal_error

Each 4xx has a cause in the request; what goes wrong in the server is a 5xx. The body is read
(and the 408 and 413 answered) by server/guards.py before the app parses it.

An item in a cube the caller cannot read answers 404, as if it did not exist (ids are not
probed); a cube by name answers 403. With no API key in the database and `allow_open`, requests
act as a local admin: `memstack serve` allows that only on a loopback address.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import _errors as errors
from .._memory import Memory
from . import schemas as S
from .access import Gate, default_cube
from .auth import LOCAL_ADMIN, AuthError, ForbiddenError, Keys, Principal
from .background import install as install_maintenance
from .background import status as maintenance_status
from .generation import ServedModel
from .generation import install as install_generation
from .guards import BodyGuard, BodyTimeout, JSONRoute, UnsupportedMediaType
from .observe import install as install_observe
from .observe import note_caller, request_id
from .spec import install as install_spec

log = logging.getLogger("memstack.server")
ERRORS = {400: {"model": S.ErrorBody}, 401: {"model": S.ErrorBody}, 403: {"model": S.ErrorBody},
          404: {"model": S.ErrorBody}, 413: {"model": S.ErrorBody},
          422: {"model": S.ErrorBody}, 429: {"model": S.ErrorBody}, 503: {"model": S.ErrorBody}}


class RateLimited(Exception):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after


class RateLimiter:
    """A token bucket per key: `rate` requests per second on average, bursts up to `burst`.
    On a store that several processes share (PostgreSQL) the buckets live in the database, so
    the limit holds across processes and hosts; otherwise in this process."""

    def __init__(self, rate: float, burst: float, store: Any = None) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._store = store if getattr(store, "shared_rate_limits", False) else None

    def take(self, key: str) -> None:
        if self.rate <= 0:
            return
        if self._store is not None:
            wait = self._store.take_token(key, self.rate, self.burst)
            if wait > 0:
                raise RateLimited(wait)
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                raise RateLimited((1 - tokens) / self.rate)
            self._buckets[key] = (tokens - 1, now)


def _status(exc: Exception) -> tuple[int, str]:
    table: list[tuple[type, int, str]] = [
        (AuthError, 401, "unauthenticated"), (ForbiddenError, 403, "forbidden"),
        (errors.NotFoundError, 404, "not_found"),
        (errors.ConfirmationRequiredError, 400, "confirmation_required"),
        (errors.InvalidInputError, 400, "invalid_input"),
        (errors.LLMError, 502, "llm_error"),
        (errors.StoreUnavailableError, 503, "store_unavailable"),
        (errors.ModelBusyError, 503, "model_busy"),
        (errors.StoreError, 500, "store_error"),
        (errors.MemstackError, 500, "internal_error")]
    return next((status, code) for kind, status, code in table if isinstance(exc, kind))


def _error(status: int, code: str, message: str, kind: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"code": code, "message": message, "type": kind, "request_id": request_id()}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def create_app(memory: Memory, *, allow_open: bool = False, rate_limit: float = 100.0,
               burst: float = 200.0, max_body_bytes: int = 2_000_000, model: Any = None,
               maintenance: Any = None, log_json: bool = False,
               public_metrics: bool = False,
               body_timeout: float | BodyTimeout = BodyTimeout()) -> FastAPI:
    """The ASGI app. `memory` is shared by all requests (it is thread-safe). `model` ("smollm2",
    a model folder, a LocalModel or a ServedModel) is loaded now and serves /v1/generate and
    /v1/ask (server/generation.py); with it, background maintenance runs by `maintenance` (a
    MaintenanceSettings or its fields; None: hourly after 60 s without requests;
    server/background.py). /v1/ready, /metrics (`public_metrics`: without a key), request ids
    and `log_json` (JSON lines on stderr): server/observe.py. `body_timeout` (seconds for
    a whole request body, or a BodyTimeout): a slower client is answered 408."""
    app = FastAPI(title="memstack", version="0.1.0",
                  description="Memory for LLM applications and agents: add, search, answer.")
    keys, limiter = Keys(memory.store), RateLimiter(rate_limit, burst, memory.store)
    app.state.memory, app.state.keys = memory, keys
    _install_errors(app)
    _install_guards(app, max_body_bytes, BodyTimeout.of(body_timeout))

    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        if token is None and allow_open and not keys.any_key():
            return note_caller(LOCAL_ADMIN)
        who = note_caller(keys.verify(token))  # for the request's log line
        limiter.take(who.key_id or who.user)
        return who

    async def walled(who: Principal = Depends(principal)) -> Principal:
        """The caller, with the database told which cubes this request may see (PostgreSQL's
        row-level security: a second wall behind the access checks). Set in the request's
        context, which the endpoint's worker thread inherits."""
        memory.store.wall(await run_in_threadpool(keys.visible_cubes, who))
        return who

    _routes(app, memory, keys, walled)
    app.state.served = ServedModel.load(memory, model) if model is not None else None
    install_generation(app, app.state.served, walled, _status)
    install_maintenance(app, memory, app.state.served, maintenance)
    from .ui import mount_ui

    mount_ui(app)
    install_observe(app, memory, keys, allow_open=allow_open, log_json=log_json,
                    public_metrics=public_metrics)
    install_spec(app)  # links and refusals in /openapi.json
    return app


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(errors.MemstackError)
    async def memstack_error(request: Request, exc: errors.MemstackError) -> JSONResponse:
        status, code = _status(exc)
        if status >= 500:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(status, code, str(exc), type(exc).__name__)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug: still a JSON error with a code, and the traceback in the log."""
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal_error", f"internal error ({type(exc).__name__}); "
                      "the server's log has the details")

    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
        return _error(429, "rate_limited", "too many requests for this key; slow down",
                      headers={"Retry-After": str(max(1, round(exc.retry_after)))})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        broken = next((e for e in exc.errors() if e["type"] == "json_invalid"), None)
        if broken is not None:
            return _error(400, "invalid_json", _json_problem(broken, exc.body))
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors()[:5])
        return _error(422, "validation_error", problems or "invalid request")

    @app.exception_handler(UnsupportedMediaType)
    async def unsupported(request: Request, exc: UnsupportedMediaType) -> JSONResponse:
        return _error(415, "unsupported_media_type", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI's body parser
            return _unparsed(request, exc.__cause__)
        if exc.status_code == 404:
            return _error(404, "not_found", f"no such path: {request.url.path} (the API is "
                                            "at /v1/..., described at /docs)")
        if exc.status_code == 405:
            allow = _allowed(request)
            return _error(405, "method_not_allowed", f"{request.method} is not allowed on "
                          f"{request.url.path}; it takes {allow}", headers={"Allow": allow})
        return _error(exc.status_code, "http_error", str(exc.detail), headers=exc.headers)


def _allowed(request: Request) -> str:
    """Every method of the routes on this path (Starlette names the first route's only)."""
    methods = {m for route in request.app.router.routes
               if route.matches(request.scope)[0] is not Match.NONE
               for m in getattr(route, "methods", None) or ()}
    return ", ".join(sorted(methods))


def _json_problem(error: dict, body: Any) -> str:
    """Where a body stops being JSON: "... at line 1, column 12 (character 11)"."""
    position = error["loc"][-1] if isinstance(error["loc"][-1], int) else None
    reason = error.get("ctx", {}).get("error", "not JSON")
    if position is None or not isinstance(body, str):
        return f"the request body is not valid JSON: {reason}"
    line = body.count("\n", 0, position) + 1
    column = position - (body.rfind("\n", 0, position) + 1) + 1
    return (f"the request body is not valid JSON: {reason} at line {line}, column {column} "
            f"(character {position})")


def _unparsed(request: Request, cause: BaseException) -> JSONResponse:
    """FastAPI answers 400 to any error while it reads and decodes a body. A body that is not
    UTF-8 (or UTF-16/32) is the client's; anything else is the server's (500)."""
    if isinstance(cause, UnicodeDecodeError):
        return _error(400, "invalid_json", f"the request body is not valid JSON: it is not "
                      f"{cause.encoding} text (byte {cause.start}: {cause.reason})")
    log.error("%s %s: reading the body failed", request.method, request.url.path,
              exc_info=cause)
    return _error(500, "internal_error", f"internal error ({type(cause).__name__}) reading "
                  "the request body; the server's log has the details")


def _install_guards(app: FastAPI, limit: int, timeout: BodyTimeout) -> None:
    """413 and 408 before the app reads a body; 415 on a JSON route (server/guards.py)."""
    app.add_middleware(BodyGuard, limit=limit, timeout=timeout, refuse=_error)
    app.router.route_class = JSONRoute  # the routes defined from here on


def _routes(app: FastAPI, memory: Memory, keys: Keys, principal) -> None:  # noqa: C901
    Who = Depends(principal)
    gate = Gate(memory, keys)
    cube_row, readable_item = gate.cube, gate.item

    def readable_cubes(who: Principal, cube: str | list[str] | None) -> list:
        names = [cube] if isinstance(cube, str) or cube is None else cube
        return [cube_row(who, n, "read") for n in names]

    def cube_out(who: Principal, cube) -> dict[str, Any]:
        row = memory.store.cube(cube.name)
        return {**cube.to_dict(), "access": keys.access(who, row)}

    @app.get("/v1/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        """Up; and the background maintenance: enabled, running, the last run (start, end,
        what it did, how many errors), the next run and what it waits for. On the event loop
        (it reads attributes only), so it answers while every worker thread waits."""
        return {"status": "ok", "maintenance": maintenance_status(app)}

    @app.get("/v1/me", response_model=S.MeOut, responses=ERRORS, tags=["meta"])
    def me(who: Principal = Who):
        return {"user": who.user, "role": who.role, "key_id": who.key_id,
                "cubes": list(who.cubes) if who.cubes is not None else None,
                "default_cube": default_cube(who), "llm": memory.llm.name if memory.llm else None}

    # cubes and grants ---------------------------------------------------------------------
    @app.get("/v1/cubes", response_model=list[S.CubeOut], responses=ERRORS, tags=["cubes"])
    def list_cubes(who: Principal = Who):
        rows = [(c, keys.access(who, memory.store.cube(c.name))) for c in memory.cubes()]
        return [{**c.to_dict(), "access": access} for c, access in rows if access is not None]

    @app.post("/v1/cubes", response_model=S.CubeOut, status_code=201, responses=ERRORS,
              tags=["cubes"])
    def create_cube(body: S.CubeRequest, who: Principal = Who):
        gate.may_create(who, body.name)
        cube = memory.create_cube(body.name, owner=who.user)
        return cube_out(who, cube)

    @app.get("/v1/cubes/{cube}", response_model=S.CubeOut, responses=ERRORS, tags=["cubes"])
    def get_cube(cube: str, who: Principal = Who):
        cube_row(who, cube, "read")
        return cube_out(who, next(c for c in memory.cubes() if c.name == cube))

    @app.get("/v1/cubes/{cube}/grants", response_model=list[S.GrantOut], responses=ERRORS,
             tags=["cubes"])
    def list_grants(cube: str, who: Principal = Who):
        row = cube_row(who, cube, "read")
        if not keys.can_manage(who, row):
            raise ForbiddenError(f"only the owner of cube {cube!r} or an admin sees its grants")
        return keys.grants(row)

    @app.put("/v1/cubes/{cube}/grants", response_model=list[S.GrantOut], responses=ERRORS,
             tags=["cubes"])
    def grant(cube: str, body: S.GrantRequest, who: Principal = Who):
        row = cube_row(who, cube, "read")
        keys.grant(who, row, body.user, body.access)
        return keys.grants(row)

    @app.delete("/v1/cubes/{cube}/grants/{user}", response_model=list[S.GrantOut],
                responses=ERRORS, tags=["cubes"])
    def revoke_grant(cube: str, user: str, who: Principal = Who):
        row = cube_row(who, cube, "read")
        keys.grant(who, row, user, None)
        return keys.grants(row)

    @app.get("/v1/cubes/{cube}/export", responses=ERRORS, tags=["cubes"],
             response_class=StreamingResponse)
    def export(cube: str, who: Principal = Who):
        cube_row(who, cube, "read")
        # read now, under this request's check
        rows = list(memory.export(cube, destination=f"download by {who.user} over REST"))

        def lines() -> Iterator[str]:
            for row in rows:
                yield json.dumps(row, ensure_ascii=False) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/v1/cubes/{cube}/archive", responses=ERRORS, tags=["cubes"],
             response_class=FileResponse)
    def cube_archive(cube: str, who: Principal = Who, tiers: bool = False):
        """The cube as one archive file (docs/governance.md), for its owner or an admin;
        `tiers`: with its KV blocks and LoRA shards."""
        row = cube_row(who, cube, "read")
        if not keys.can_manage(who, row):
            raise ForbiddenError(f"only the owner of cube {cube!r} or an admin exports it")
        folder = tempfile.mkdtemp(prefix="memstack-archive-")
        path = Path(folder) / f"{cube}.memcube"
        try:
            memory.export_cube(cube, path, tiers=tiers)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return FileResponse(path, media_type="application/x-tar", filename=path.name,
                            background=BackgroundTask(shutil.rmtree, folder, True))

    @app.get("/v1/cubes/{cube}/retention", response_model=list[S.RetentionRuleOut],
             responses=ERRORS, tags=["cubes"])
    def retention_rules(cube: str, who: Principal = Who):
        """The cube's retention rules (docs/governance.md), for anyone who reads it."""
        return [r.to_dict() for r in memory.retention(cube_row(who, cube, "read").name)]

    @app.put("/v1/cubes/{cube}/retention", response_model=S.RetentionOut, responses=ERRORS,
             tags=["cubes"])
    def set_retention(cube: str, body: S.RetentionRequest, who: Principal = Who):
        """Set the cube's rule for a kind, for its owner or an admin; says what the next
        maintenance run does under it. 400 `confirmation_required` when the rules would take
        every item out of search and `confirm` is false."""
        row = cube_row(who, cube, "read")
        if not keys.can_manage(who, row):
            raise ForbiddenError(f"only the owner of cube {cube!r} or an admin sets its "
                                 "retention")
        return memory.set_retention(row.name, body.kind, expire_after=body.expire_after,
                                    archive_unused=body.archive_unused,
                                    purge_after=body.purge_after, confirm=body.confirm,
                                    actor=who.user)

    @app.post("/v1/cubes/import", response_model=S.CubeImportOut, status_code=201,
              responses=ERRORS, tags=["cubes"])
    async def cube_import(request: Request, name: str = Query(alias="as", min_length=1,
                                                              max_length=200),
                          who: Principal = Who):
        """A cube archive (the request body, application/x-tar) as the new cube `as`, owned
        by the caller; checked member by member before anything is written."""
        gate.may_create(who, name)
        data = await request.body()
        return await run_in_threadpool(_import_archive, data, name, who.user)

    def _import_archive(data: bytes, name: str, owner: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="memstack-upload-") as folder:
            path = Path(folder) / "upload.memcube"
            path.write_bytes(data)
            report = memory.import_cube(path, as_name=name, owner=owner, fresh_ids=True)
        report["file"] = "upload"  # not the server's scratch path
        return {k: v for k, v in report.items() if k != "remapped_ids"}

    @app.post("/v1/cubes/{cube}/import", response_model=S.ImportOut, responses=ERRORS,
              tags=["cubes"])
    def import_(cube: str, body: dict[str, Any], who: Principal = Who,
                user_id: str | None = Query(default=None, max_length=200),
                infer: bool = False):
        cube_row(who, cube, "write", create=True)
        mapping = memory.import_conversation(body, user_id=user_id, cube=cube, infer=infer)
        return {"turns": len(mapping), "sessions": len(body.get("sessions", []))}

    # memories -----------------------------------------------------------------------------
    @app.post("/v1/memories", response_model=S.AddOut, status_code=201, responses=ERRORS,
              tags=["memories"])
    def add(body: S.AddRequest, who: Principal = Who):
        row = cube_row(who, body.cube, "write", create=True)
        messages = body.messages if isinstance(body.messages, str) else (
            [m.model_dump(exclude_none=True) for m in body.messages]
            if isinstance(body.messages, list) else body.messages.model_dump(exclude_none=True))
        result = memory.add(messages, user_id=body.user_id, agent_id=body.agent_id,
                            session_id=body.session_id, observed_at=body.observed_at,
                            metadata=body.metadata, cube=row.name, kind=body.kind,
                            infer=body.infer, expires_at=body.expires_at, ttl=body.ttl)
        return JSONResponse(result.to_dict(), status_code=201)  # built to the schema already

    @app.post("/v1/search", response_model=S.SearchOut, responses=ERRORS, tags=["memories"])
    def search(body: S.SearchRequest, who: Principal = Who):
        rows = readable_cubes(who, body.cube)
        hits = memory.search(body.query, cube=[r.name for r in rows], user_id=body.user_id,
                             agent_id=body.agent_id, session_id=body.session_id,
                             kinds=body.kinds, filters=body.filters, since=body.since,
                             until=body.until, as_of=body.as_of, top_k=body.top_k,
                             threshold=body.threshold, feedback=body.feedback)
        # the hot path: to_dict() is the schema, so skip re-validating it (about 1 ms a hit)
        return JSONResponse({"results": [h.to_dict() for h in hits]})

    @app.get("/v1/memories", response_model=S.ItemsOut, responses=ERRORS, tags=["memories"])
    def list_memories(who: Principal = Who, cube: str | None = Query(default=None),
                      user_id: str | None = None, agent_id: str | None = None,
                      session_id: str | None = None,
                      kind: list[str] | None = Query(default=None),
                      limit: int = Query(default=100, ge=1, le=1000),
                      offset: int = Query(default=0, ge=0, le=10_000_000)):
        row = cube_row(who, cube, "read")
        items = memory.get_all(cube=row.name, user_id=user_id, agent_id=agent_id,
                               session_id=session_id, kinds=kind, limit=limit + 1,
                               offset=offset)
        more = len(items) > limit
        return {"items": [i.to_dict() for i in items[:limit]],
                "next_offset": offset + limit if more else None}

    @app.get("/v1/memories/{memory_id}", response_model=S.ItemOut, responses=ERRORS,
             tags=["memories"])
    def get(memory_id: str, who: Principal = Who):
        readable_item(who, memory_id)
        return memory.get(memory_id).to_dict()

    @app.put("/v1/memories/{memory_id}", response_model=S.ItemOut, responses=ERRORS,
             tags=["memories"])
    def update(memory_id: str, body: S.UpdateRequest, who: Principal = Who):
        readable_item(who, memory_id, "write")
        return memory.update(memory_id, body.data, metadata=body.metadata,
                             reason=body.reason).to_dict()

    @app.delete("/v1/memories/{memory_id}", response_model=S.DeletedOut, responses=ERRORS,
                tags=["memories"])
    def delete(memory_id: str, who: Principal = Who, cascade: bool = True,
               receipt: bool = False):
        """Delete a memory; with `receipt`, also what was checked afterwards and found clean
        in every tier, and the backups and exports that still hold it."""
        readable_item(who, memory_id, "write")
        result = memory.delete(memory_id, cascade=cascade, receipt=receipt)
        if receipt:
            return {"deleted": memory_id, "items_deleted": len(result["deleted"]),
                    "receipt": result}
        return {"deleted": memory_id, "items_deleted": result}

    @app.get("/v1/memories/{memory_id}/history", response_model=list[S.VersionOut],
             responses=ERRORS, tags=["memories"])
    def history(memory_id: str, who: Principal = Who):
        readable_item(who, memory_id, include_deleted=True)  # a tombstone has a history too
        return [v.to_dict() for v in memory.history(memory_id)]

    @app.post("/v1/feedback", response_model=S.FeedbackOut, status_code=201, responses=ERRORS,
              tags=["memories"])
    def feedback(body: S.FeedbackRequest, who: Principal = Who):
        """Feedback on a memory, or on the memories an answer or generation used: moves this
        user's later searches for similar queries (bounded, fading); a correction becomes a
        memory ranked ahead of the one it corrects. Stored as a `feedback` item: delete it to
        undo. Needs write access to the cube (404 when the caller cannot read the target)."""
        if memory.store.item_by_id(body.target) is not None:
            readable_item(who, body.target)  # 404 before 403, as for any item
        result = memory.feedback(body.target, body.signal, query=body.query,
                                 correction=body.correction, user_id=body.user_id,
                                 agent_id=body.agent_id, cube_ids=keys.visible_cubes(who),
                                 check=lambda row: keys.require(who, row, "write"))
        return JSONResponse(result.to_dict(), status_code=201)

    if memory.llm is not None:
        @app.post("/v1/answer", response_model=S.AnswerOut, responses=ERRORS,
                  tags=["memories"])
        def answer(body: S.AnswerRequest, who: Principal = Who):
            rows = readable_cubes(who, body.cube)
            reply = memory.answer(body.question, cube=[r.name for r in rows],
                                  user_id=body.user_id, agent_id=body.agent_id,
                                  session_id=body.session_id, as_of=body.as_of,
                                  top_k=body.top_k, max_context_tokens=body.max_context_tokens)
            return {k: v for k, v in reply.to_dict().items() if k != "hits"}
    else:  # not in the spec: this server cannot answer
        @app.post("/v1/answer", include_in_schema=False)
        def no_answer() -> JSONResponse:
            return _error(404, "llm_not_configured", "this server has no LLM; start it with "
                                                     "--llm-url")

    # users and keys (admins; users see and revoke their own keys) ----------------------------
    @app.get("/v1/users", response_model=list[S.UserOut], responses=ERRORS, tags=["admin"])
    def users(who: Principal = Who):
        _admin(who)
        return keys.users()

    @app.post("/v1/users", response_model=S.UserOut, status_code=201, responses=ERRORS,
              tags=["admin"])
    def create_user(body: S.UserRequest, who: Principal = Who):
        _admin(who)
        keys.ensure_user(body.id, body.role)
        return next(u for u in keys.users() if u["id"] == body.id)

    @app.post("/v1/keys", response_model=S.NewKeyOut, status_code=201, responses=ERRORS,
              tags=["admin"])
    def create_key(body: S.KeyRequest, who: Principal = Who):
        _admin(who)
        new = keys.create_key(body.user, role=body.role, cubes=body.cubes, label=body.label)
        return {"key_id": new.key_id, "token": new.token, "user": new.user, "role": new.role}

    @app.get("/v1/keys", response_model=list[S.KeyOut], responses=ERRORS, tags=["admin"])
    def list_keys(who: Principal = Who):
        return keys.keys(None if who.admin else who.user)

    @app.delete("/v1/keys/{key_id}", response_model=list[S.KeyOut], responses=ERRORS,
                tags=["admin"])
    def revoke_key(key_id: str, who: Principal = Who):
        keys.revoke(key_id, by=who)
        return keys.keys(None if who.admin else who.user)

    # the audit chain (admins) -----------------------------------------------------------------
    @app.get("/v1/audit/head", response_model=S.AuditHeadOut, responses=ERRORS, tags=["admin"])
    def audit_head(who: Principal = Who):
        """The audit chain's head: keep it elsewhere, verify against it later."""
        _admin(who)
        return memory.audit_head()

    @app.post("/v1/audit/verify", response_model=S.AuditVerifyOut, responses=ERRORS,
              tags=["admin"])
    def audit_verify(body: S.AuditVerifyRequest, who: Principal = Who):
        """Walk the chain (and check `head`): `ok`, or the first broken entry and why."""
        _admin(who)
        return memory.verify_audit(body.head.model_dump() if body.head else None).to_dict()


def _admin(who: Principal) -> None:
    if not who.admin:
        raise ForbiddenError("this needs an admin key")
