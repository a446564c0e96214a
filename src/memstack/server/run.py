"""`memstack serve` and `memstack mcp`: checks before start, then uvicorn (or MCP over stdio)."""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import sys
from typing import Any

from .._errors import InvalidInputError, MissingExtraError
from .._memory import Memory
from ..write.repair import summary
from .auth import Keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open(memory: Memory, host: str) -> bool:
    """Whether `host` is a loopback address; InvalidInputError for a server that would run
    open (no API key at all) on any other."""
    loopback = is_loopback(host)
    if not loopback and not Keys(memory.store).any_key():
        raise InvalidInputError(
            f"refusing to serve on {host} without any API key: anyone could read and change "
            "every memory. Create one first: memstack keys create --user you --role admin")
    return loopback


def check_options(*, maintenance: dict[str, Any] | None = None, body_timeout: Any = 30.0,
                  queries: str = "int8", query_cache: int = 4096, **_: Any) -> None:
    """InvalidInputError (or ValueError) for options every worker would refuse."""
    from .background import MaintenanceSettings
    from .guards import BodyTimeout

    MaintenanceSettings(**(maintenance or {})).check()
    BodyTimeout.of(body_timeout)
    if queries not in ("int8", "fp32") or query_cache < 0:
        raise InvalidInputError("queries is int8 or fp32, and the query cache 0 or more")


def build(memory: Memory, *, host: str = "127.0.0.1", rate_limit: float = 100.0,
          max_body_bytes: int = 2_000_000, threads: int = 16, model: Any = None,
          maintenance: dict[str, Any] | None = None, log_json: bool = False,
          public_metrics: bool = False, query_cache: int = 4096, queries: str = "int8",
          body_timeout: Any = 30.0, warm: bool = True) -> Any:
    """The full ASGI app: REST + /mcp (streamable HTTP) + /ui. Refuses to run open (without
    any API key) on a non-loopback address. `model` ("smollm2" or a folder) is loaded once,
    for /v1/generate, /v1/ask and their MCP tools. `query_cache`: how many query vectors
    are kept (0: none); `queries`: "int8" encodes search queries with the int8 copy of the
    local model (2.3x cheaper, recall within 0.005 on LoCoMo: docs/server.md), "fp32" as
    stored texts (through a copy of the memory's LocalEmbedder). `warm=False` (a supervisor
    checking the options before its workers start) loads no model. `body_timeout`: seconds a client may take to send a request body
    (or a guards.BodyTimeout): 408 after it."""
    try:
        import anyio.to_thread
        from fastapi import FastAPI  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("the server needs FastAPI and uvicorn: "
                                "pip install 'memstack[server]'") from exc
    from ..embed.batching import BatchingEmbedder
    from ..embed.local import LocalEmbedder
    from ..embed.query_cache import QueryCache
    from .app import create_app
    from .generation import ServedModel
    from .mcp import build_mcp

    if warm and not isinstance(memory.embedder, (QueryCache, BatchingEmbedder)):
        # load the model (and build its ONNX twin) now: ready means ready, and the first
        # request does not wait seconds for it; then concurrent requests share forward passes
        # and repeated queries are not encoded again (docs/server.md, "Throughput")
        embedder = memory.embedder
        if isinstance(embedder, LocalEmbedder) and embedder.queries != queries:
            # a copy (the same loaded model and ONNX copy): the caller's embedder, maybe
            # shared with other Memory objects, keeps its own query encoding
            embedder = copy.copy(embedder)
            embedder.queries, embedder._int8 = queries, None
            embedder.embed_query(["warm up"])
        embedder.embed(["warm up"])
        batching = BatchingEmbedder(embedder)
        memory.use_embedder(QueryCache(batching, size=query_cache) if query_cache else batching)

    loopback = refuse_open(memory, host)
    served = ServedModel.load(memory, model) if model is not None else None
    mcp_server = build_mcp(memory, allow_open=loopback, served=served)
    mcp_app = mcp_server.streamable_http_app(streamable_http_path="/", stateless_http=True,
                                             json_response=True, host=host,
                                             max_request_body_size=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        # MCP's session manager, and the app's own (background maintenance)
        async with mcp_app.router.lifespan_context(mcp_app), inner(app):
            yield

    app = create_app(memory, allow_open=loopback, rate_limit=rate_limit,
                     burst=max(2 * rate_limit, 1), max_body_bytes=max_body_bytes,
                     model=served, maintenance=maintenance, log_json=log_json,
                     public_metrics=public_metrics, body_timeout=body_timeout)
    inner = app.router.lifespan_context
    app.router.lifespan_context = lifespan
    app.mount("/mcp", mcp_app)
    return app


def cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_workers(model: Any = None) -> int:
    """One worker process per core, up to 4 (measured on 2 cores: docs/server.md,
    "Throughput"); one with a local model, which every worker would load."""
    return 1 if model is not None else min(cores(), 4)


def serve(memory: Memory, *, host: str, port: int, workers: int = 1,
          shutdown_timeout: float = 30.0, **options: Any) -> None:
    """Run uvicorn. With workers > 1, each worker process opens the database itself (SQLite in
    WAL mode takes several processes; each one's vector index catches up with the others'
    writes through the cube's generation counter), so Python work uses every core.

    SIGTERM or Ctrl-C (to the supervisor, which passes it on to each worker): new connections
    are refused, the requests in flight get `shutdown_timeout` seconds to finish, then each
    process closes its Memory (the vector indexes are saved) and exits (docs/server.md,
    "Shutdown and restart")."""
    import uvicorn

    from ..tiers.activation.model import model_folder

    if workers > 1 and options.get("model") is not None:
        model_folder(options["model"])  # checked (smollm2 converted) once; each worker loads it
    if workers <= 1:
        app = build(memory, host=host, **options)
        uvicorn.run(closing(app, memory), host=host, port=port, log_level="warning",
                    access_log=False, timeout_graceful_shutdown=shutdown_timeout)
        return
    # the options, extras and key rule checked before forking: a worker that fails to build
    # is restarted by uvicorn for ever; each worker loads the model itself
    check_options(**options)
    build(memory, host=host, warm=False, **{**options, "model": None})
    memory.close()
    from .observe import share_metrics_across_workers

    share_metrics_across_workers()  # every worker's /metrics reports the sums (docs/server.md)
    # the URL with its password goes to the workers through their environment, never a log
    os.environ["MEMSTACK_SERVE"] = json.dumps({"db": memory.url or str(memory.path),
                                               "files": str(memory.path),
                                               "cube": memory.default_cube,
                                               "host": host, "workers": workers, **options})
    uvicorn.run("memstack.server.run:worker_app", factory=True, host=host, port=port,
                workers=workers, log_level="warning", access_log=False,
                timeout_graceful_shutdown=shutdown_timeout)


def worker_app() -> Any:
    """The app of one worker process (uvicorn --workers), configured by MEMSTACK_SERVE. The LLM
    comes from MEMSTACK_LLM_URL / MEMSTACK_LLM_MODEL / MEMSTACK_LLM_API_KEY, as in the CLI."""
    from ..llm.client import from_options

    config = json.loads(os.environ["MEMSTACK_SERVE"])
    import torch

    # share the cores instead of each worker's model using all of them: measured on 2 cores,
    # 2 workers x 2 torch threads served 27 requests/s, 2 x 1 thread 110 (docs/server.md)
    torch.set_num_threads(max(1, cores() // config.pop("workers")))
    llm = from_options(os.environ.get("MEMSTACK_LLM_URL"), os.environ.get("MEMSTACK_LLM_MODEL"),
                       os.environ.get("MEMSTACK_LLM_API_KEY"))
    memory = Memory(config.pop("db"), cube=config.pop("cube"), llm=llm, files=config.pop("files"))
    for report in memory.repaired:
        print(f"memstack: {memory.location}: {summary(report)}", file=sys.stderr)
    return closing(build(memory, **config), memory)


def closing(app: Any, memory: Memory) -> Any:
    """`app`, closing `memory` (saving its vector indexes and access counts) when its lifespan
    ends: uvicorn ends it once the requests in flight are answered. Not at exit: after a
    graceful stop uvicorn raises SIGTERM again, which ends the process without unwinding."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            async with inner(app) as state:
                yield state
        finally:
            memory.close()

    app.router.lifespan_context = lifespan
    return app


def serve_stdio(memory: Memory, key: str | None, model: str | None = None) -> None:
    """MCP over stdio; with `model` ("smollm2" or a folder, loaded now) the tools
    generate_from_memory and ask_shard too."""
    from .generation import ServedModel
    from .mcp import build_mcp

    served = ServedModel.load(memory, model) if model else None
    build_mcp(memory, stdio_key=key, served=served).run("stdio")
