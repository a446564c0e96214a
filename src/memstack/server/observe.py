"""What an operator's probes, scrapers and log shippers read (docs/server.md, "Health,
readiness, metrics and logs"):

- `GET /v1/ready`: 200 `{"ready": true, "checks": {...}}` when the store answers a read, the
  embedder has embedded a text in this process and the served model (with --model) is loaded;
  else 503 `not_ready` naming the check that failed. `/v1/health` stays the cheap liveness
  probe. Neither needs a key.
- `GET /metrics`: Prometheus text. Open when the server runs open (loopback, no key yet);
  otherwise an admin key, unless `public_metrics` (for a scraper inside a private network).
  With `memstack serve --workers N` every worker writes its numbers to one folder
  (prometheus_client's multiprocess mode, `share_metrics_across_workers`) and any worker's
  /metrics sums them.
- Request ids: every HTTP response carries `X-Request-ID`, the caller's own when it is sane
  (1-128 characters of [A-Za-z0-9._-]), else a new uuid4 hex; error bodies repeat it as
  `error.request_id` (`request_id()`), and so does every JSON log line of the request.
- `log_json`: one JSON line per request on stderr, and every memstack (and uvicorn) log record
  as a JSON line, a traceback in its `traceback` field. Without it nothing changes: no access
  log, errors logged as before.

All of it is one plain ASGI wrapper (`Observe`, no BaseHTTPMiddleware: its per-request cost
showed in profiles) around the whole middleware stack, outside Starlette's error middleware,
so a 500 carries its request id and is counted too.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.routing import Match, Mount

from .._errors import MissingExtraError
from .._memory import Memory
from .auth import ForbiddenError, Keys, Principal

__all__ = ["PROBES", "install", "note_caller", "request_id", "share_metrics_across_workers"]

log = logging.getLogger("memstack.server")
PROBES = frozenset({"/v1/health", "/v1/ready", "/metrics"})  # not activity, not access-logged
READY_SECONDS = 2.0  # a check slower than this fails: probes have short timeouts
_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
EMBED_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # version and variant bits of a uuid4
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


# request ids ---------------------------------------------------------------------------------
@dataclass
class RequestInfo:
    """One request's id and, once authenticated, who made it. The context variable holds this
    object, so a worker thread (which runs with a copy of the context) fills in the same one."""

    id: str
    user: str | None = None
    key_id: str | None = None


_CURRENT: ContextVar[RequestInfo | None] = ContextVar("memstack_request", default=None)


def request_id() -> str | None:
    """The id of the request being served here (None outside a request)."""
    info = _CURRENT.get()
    return info.id if info is not None else None


def note_caller(who: Principal) -> Principal:
    """Remember who the request acts as, for its log line; returns `who`."""
    info = _CURRENT.get()
    if info is not None:
        info.user, info.key_id = who.user, who.key_id
    return who


def _incoming_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SANE_ID.fullmatch(text) else _new_id()
    return _new_id()


def _new_id() -> str:
    """A uuid4 in hex, from `random` rather than os.urandom (uuid.uuid4): a request id is no
    secret, and urandom cost 12 us a call here, half of this module's cost per request."""
    return f"{random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET:032x}"


# installing ----------------------------------------------------------------------------------
def install(app: FastAPI, memory: Memory, keys: Keys, *, allow_open: bool,
            log_json: bool = False, public_metrics: bool = False) -> None:
    """Add /v1/ready and /metrics to `app` and wrap its whole middleware stack in `Observe`
    (built when the app first runs, so routes and middleware added later are inside it)."""
    metrics = Metrics(memory.embedder)
    _ready_route(app, Readiness(app, memory))
    _metrics_route(app, metrics, keys, allow_open=allow_open, public=public_metrics)
    access = _log_json(app) if log_json else None
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: Observe(build(), app, metrics, access)  # type: ignore


class Observe:
    """The request id, the request metrics and the access log line, around everything."""

    def __init__(self, app: Any, root: FastAPI, metrics: Metrics,
                 access: logging.Logger | None) -> None:
        self.app, self.routes = app, Routes(root)
        self.metrics, self.access = metrics, access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        info = RequestInfo(_incoming_id(scope["headers"]))
        token, started = _CURRENT.set(info), time.perf_counter()
        path, root_path = scope["path"], scope.get("root_path", "")
        header = (b"x-request-id", info.id.encode("ascii"))
        status, done = 500, False

        async def send_with_id(message: dict) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                done = True
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette's error middleware answered 500 and the app's handler logged the
            # traceback: raising on would only make uvicorn log it a second time, unformatted
            if not done:
                raise
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - started
            route = self.routes.template(scope, path, root_path)
            self.metrics.request(scope["method"], route, status, seconds)
            if self.access is not None and (path not in PROBES or status >= 400):
                _access_line(self.access, scope, path, info, route, status, seconds)
            _CURRENT.reset(token)


class Routes:
    """A request's route template (`/v1/memories/{memory_id}`), never its raw path, so metric
    labels stay few: a mounted app (/mcp) is its mount path, anything else `unmatched`."""

    def __init__(self, app: FastAPI) -> None:
        self.app, self._top, self._count = app, set(), -1

    def template(self, scope: dict, path: str, root_path: str) -> str:
        routes = self.app.router.routes
        if len(routes) != self._count:  # routes are added until the app starts serving
            self._top, self._count = {id(r) for r in routes}, len(routes)
        route = scope.get("route")
        if route is not None and id(route) in self._top and not isinstance(route, Mount):
            return route.path
        # not routed (a middleware answered: 413, 429) or routed inside a mounted app
        probe = {"type": "http", "path": path, "root_path": root_path, "method": scope["method"]}
        for candidate in routes:
            if candidate.matches(probe)[0] is not Match.NONE:
                return getattr(candidate, "path", "unmatched") or "unmatched"
        return "unmatched"


# readiness -----------------------------------------------------------------------------------
class ReadyOut(BaseModel):
    ready: bool
    checks: dict[str, str]


class Readiness:
    """The checks of /v1/ready. Each runs in a thread of its own limiter (never queued behind
    requests, at most one at a time) and fails after READY_SECONDS."""

    def __init__(self, app: FastAPI, memory: Memory) -> None:
        self.app, self.memory = app, memory
        self.embedded = False  # the model answered once: a loaded model stays loaded
        self.limiters: dict[str, anyio.CapacityLimiter] = {}

    async def checks(self) -> dict[str, str]:
        found = {"store": await self._run("store", self.memory.store.cube_count),
                 "embedder": await self._run("embedder", self._embedder)}
        served = getattr(self.app.state, "served", None)
        if served is not None:
            found["model"] = "ok" if getattr(served, "lm", None) is not None else "not loaded"
        return found

    def _embedder(self) -> None:
        if not self.embedded:
            self.memory.embedder.embed(["ready?"])
            self.embedded = True

    async def _run(self, name: str, check: Callable[[], Any]) -> str:
        limiter = self.limiters.setdefault(name, anyio.CapacityLimiter(1))
        try:
            with anyio.fail_after(READY_SECONDS):
                await anyio.to_thread.run_sync(check, limiter=limiter, abandon_on_cancel=True)
        except TimeoutError:
            return f"timed out after {READY_SECONDS:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure is "not ready"; details in the log
            log.warning("readiness check %s failed: %s", name, exc, exc_info=exc)
            return f"failed: {type(exc).__name__}"
        return "ok"


def _ready_route(app: FastAPI, readiness: Readiness) -> None:
    @app.get("/v1/ready", response_model=ReadyOut, tags=["meta"],
             responses={503: {"model": ReadyOut, "description": "not ready: `error` says why"}})
    async def ready() -> Any:
        """Ready for traffic: the store answers, the embedding model is loaded, and so is the
        served model if one was configured. 503 `not_ready` names the check that failed."""
        checks = await readiness.checks()
        failed = [f"{name} {state}" for name, state in checks.items() if state != "ok"]
        if not failed:
            return {"ready": True, "checks": checks}
        return JSONResponse({"ready": False, "checks": checks, "error": {
            "code": "not_ready", "message": "not ready: " + "; ".join(failed), "type": None,
            "request_id": request_id()}}, status_code=503)


# metrics -------------------------------------------------------------------------------------
def share_metrics_across_workers() -> str:
    """Before uvicorn starts worker processes: the folder where each worker writes its metrics
    (prometheus_client's multiprocess mode), so that any worker's /metrics sums them all. A
    fresh temporary folder, removed at exit, unless PROMETHEUS_MULTIPROC_DIR names one already
    (the operator's: then they clear it between runs)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        folder = tempfile.mkdtemp(prefix="memstack-metrics-")
        atexit.register(shutil.rmtree, folder, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.multiprocess
        import prometheus_client.values
    except ImportError as exc:
        raise MissingExtraError("the server's /metrics needs prometheus-client: "
                                "pip install 'memstack[server]'") from exc
    return prometheus_client


class Metrics:
    """The server's Prometheus metrics. In one process they live in a registry of this app;
    in a worker of `serve --workers N` in files every worker writes (the environment variable
    was set before the worker imported prometheus_client)."""

    def __init__(self, embedder: Any) -> None:
        prom = self.prom = _prometheus()
        self.multiprocess = prom.values.ValueClass is not prom.values.MutexValue
        self.registry = None if self.multiprocess else prom.CollectorRegistry()
        if self.multiprocess:
            _forget_dead_workers(prom)
        where = {"registry": self.registry}
        labels = ("method", "route", "status")
        self.requests = prom.Counter("memstack_http_requests", "HTTP requests answered",
                                     labels, **where)
        self.latency = prom.Histogram("memstack_http_request_duration_seconds",
                                      "Time to answer an HTTP request, body included", labels,
                                      buckets=LATENCY_BUCKETS, **where)
        self.in_flight = prom.Gauge("memstack_http_requests_in_flight", "HTTP requests being "
                                    "answered now", multiprocess_mode="livesum", **where)
        self.embed_seconds = prom.Histogram("memstack_embed_pass_seconds", "Time of one forward "
                                            "pass of the embedding model",
                                            buckets=EMBED_BUCKETS, **where)
        self.embed_texts = prom.Histogram("memstack_embed_pass_texts", "Texts embedded in one "
                                          "forward pass", buckets=TEXT_BUCKETS, **where)
        self.embed_queue = prom.Gauge("memstack_embed_queue_texts", "Texts waiting for a "
                                      "forward pass", multiprocess_mode="livesum", **where)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._depth: Callable[[], int] = lambda: 0
        self._watch(embedder)

    def _watch(self, embedder: Any) -> None:
        """Embedding metrics from the server's BatchingEmbedder (others have none), found
        inside its wrappers (a query cache, which forwards reads but not writes of `observer`
        to the embedder it wraps)."""
        while embedder is not None and "observer" not in getattr(embedder, "__dict__", {}):
            embedder = getattr(embedder, "__dict__", {}).get("inner")
        if embedder is None:
            return
        self._depth = lambda: embedder.depth
        embedder.observer = self.embedded
        if not self.multiprocess:  # files are written, not read from a function
            self.embed_queue.set_function(self._depth)

    def embedded(self, texts: int, seconds: float) -> None:
        """The BatchingEmbedder's observer: runs on its thread, so it must never raise."""
        try:
            self.embed_seconds.observe(seconds)
            self.embed_texts.observe(texts)
            if self.multiprocess:
                self.embed_queue.set(self._depth())
        except Exception:  # noqa: BLE001 - a metric is not worth a stuck embedder
            log.exception("recording an embedding pass failed")

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method if method in _METHODS else "other", route, status)
        children = self._children.get(key)
        if children is None:  # labels() costs microseconds: once per label set
            labels = (key[0], route, str(status))
            children = self._children[key] = (self.requests.labels(*labels),
                                              self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text a scraper reads, and its content type; every worker's sum in multiprocess
        mode."""
        registry = self.registry
        if self.multiprocess:
            self.embed_queue.set(self._depth())
            registry = self.prom.CollectorRegistry()
            self.prom.multiprocess.MultiProcessCollector(registry)
        return self.prom.generate_latest(registry), self.prom.CONTENT_TYPE_LATEST


def _forget_dead_workers(prom: Any) -> None:
    """A worker that died left its live gauges (in flight, queue) behind: drop them."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for path in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
        pid = int(path.rsplit("_", 1)[1][:-3])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            prom.multiprocess.mark_process_dead(pid, folder)
        except PermissionError:  # alive, someone else's
            pass


def _metrics_route(app: FastAPI, metrics: Metrics, keys: Keys, *, allow_open: bool,
                   public: bool) -> None:
    @app.get("/metrics", include_in_schema=False)
    def scrape(request: Request) -> Response:
        if not public:
            _require_admin(request, keys, allow_open)
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)


def _require_admin(request: Request, keys: Keys, allow_open: bool) -> None:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else None
    if token is None and allow_open and not keys.any_key():
        return  # the open local server: everything is open
    who = note_caller(keys.verify(token))
    if not who.admin:
        raise ForbiddenError("/metrics needs an admin key (or serve --public-metrics)")


# logs ----------------------------------------------------------------------------------------
class JsonLines(logging.Formatter):
    """A log record as one JSON line: time, level, logger, pid (which worker), message, the
    request id when there is one, the record's `fields`, and the traceback of an error."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
                            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name, "pid": record.process,
            "message": record.getMessage()}
        rid = request_id()
        if rid is not None:
            line["request_id"] = rid
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class StderrLines(logging.Handler):
    """Writes to the sys.stderr of the moment (a test may have replaced it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own rule: report, never raise
            self.handleError(record)


def _log_json(app: FastAPI) -> logging.Logger:
    """Records as JSON lines on stderr: memstack's and the root logger's now (the MCP SDK gave
    the root a Rich handler that draws multi-line boxes), uvicorn's once it has set up its own
    logging (it does so when it starts, after the app is built). Returns the access logger."""
    handler = StderrLines()
    handler.setFormatter(JsonLines())
    _take_over("memstack", handler, logging.INFO)
    _take_over(None, handler, None)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        for name in ("uvicorn", "uvicorn.error"):
            _take_over(name, handler, None)
        async with inner(app) as state:
            yield state

    app.router.lifespan_context = lifespan
    return logging.getLogger("memstack.access")


def _take_over(name: str | None, handler: logging.Handler, level: int | None) -> None:
    """`handler` is the logger's only handler (None: the root logger, whose handlers print
    whatever other loggers pass up)."""
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False  # a root handler would print the line again, unformatted
    if level is not None:
        logger.setLevel(level)


def json_line(message: str, logger: str = "memstack") -> str:
    """An info line as --log-json writes it, for what is printed before logging is set up."""
    record = logging.LogRecord(logger, logging.INFO, "", 0, message, None, None)
    return JsonLines().format(record)


def _access_line(access: logging.Logger, scope: dict, path: str, info: RequestInfo,
                 route: str, status: int, seconds: float) -> None:
    if not access.isEnabledFor(logging.INFO):
        return
    client = scope.get("client")
    fields = {"method": scope["method"], "route": route, "path": path, "status": status,
              "duration_ms": round(seconds * 1000, 2), "user": info.user, "key_id": info.key_id,
              "client": client[0] if client else None}
    # handle() a record made here: Logger.info would walk the stack for the caller's line
    access.handle(access.makeRecord(access.name, logging.INFO, __file__, 0, "request", None,
                                    None, extra={"fields": fields}))
