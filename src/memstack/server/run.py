"""`memstack serve` and `memstack mcp`: checks before start, then uvicorn (or MCP over stdio)."""

from __future__ import annotations

import contextlib
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


def build(memory: Memory, *, host: str = "127.0.0.1", rate_limit: float = 100.0,
          max_body_bytes: int = 2_000_000, threads: int = 16, model: Any = None,
          maintenance: dict[str, Any] | None = None) -> Any:
    """The full ASGI app: REST + /mcp (streamable HTTP) + /ui. Refuses to run open (without
    any API key) on a non-loopback address. `model` ("smollm2" or a folder) is loaded once,
    for /v1/generate, /v1/ask and their MCP tools."""
    try:
        import anyio.to_thread
        from fastapi import FastAPI  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("the server needs FastAPI and uvicorn: "
                                "pip install 'memstack[server]'") from exc
    from ..embed.batching import BatchingEmbedder
    from .app import create_app
    from .generation import ServedModel
    from .mcp import build_mcp

    if not isinstance(memory.embedder, BatchingEmbedder):  # requests share forward passes
        # load the model (and build its ONNX twin) now: ready means ready, and the first
        # request does not wait seconds for it
        memory.embedder.embed(["warm up"])
        memory.embedder = BatchingEmbedder(memory.embedder)

    loopback = is_loopback(host)
    if not loopback and not Keys(memory.store).any_key():
        raise InvalidInputError(
            f"refusing to serve on {host} without any API key: anyone could read and change "
            "every memory. Create one first: memstack keys create --user you --role admin")
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
                     model=served, maintenance=maintenance)
    inner = app.router.lifespan_context
    app.router.lifespan_context = lifespan
    app.mount("/mcp", mcp_app)
    return app


def serve(memory: Memory, *, host: str, port: int, workers: int = 1, **options: Any) -> None:
    """Run uvicorn. With workers > 1, each worker process opens the database itself (SQLite in
    WAL mode takes several processes; each one's vector index catches up with the others'
    writes through the cube's generation counter), so Python work uses every core."""
    import uvicorn

    from ..tiers.activation.model import model_folder

    if workers > 1 and options.get("model") is not None:
        model_folder(options["model"])  # checked (smollm2 converted) once; each worker loads it
    # also checks the key rule before forking
    app = build(memory, host=host, **({**options, "model": None} if workers > 1 else options))
    if workers <= 1:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
        return
    memory.close()
    # the URL with its password goes to the workers through their environment, never a log
    os.environ["MEMSTACK_SERVE"] = json.dumps({"db": memory.url or str(memory.path),
                                               "files": str(memory.path),
                                               "cube": memory.default_cube,
                                               "host": host, "workers": workers, **options})
    uvicorn.run("memstack.server.run:worker_app", factory=True, host=host, port=port,
                workers=workers, log_level="warning", access_log=False)


def worker_app() -> Any:
    """The app of one worker process (uvicorn --workers), configured by MEMSTACK_SERVE. The LLM
    comes from MEMSTACK_LLM_URL / MEMSTACK_LLM_MODEL / MEMSTACK_LLM_API_KEY, as in the CLI."""
    from ..llm.client import from_options

    config = json.loads(os.environ["MEMSTACK_SERVE"])
    import torch

    # share the cores instead of each worker's model using all of them: measured on 2 cores,
    # 2 workers x 2 torch threads served 27 requests/s, 2 x 1 thread 110 (docs/server.md)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.pop("workers")))
    llm = from_options(os.environ.get("MEMSTACK_LLM_URL"), os.environ.get("MEMSTACK_LLM_MODEL"),
                       os.environ.get("MEMSTACK_LLM_API_KEY"))
    memory = Memory(config.pop("db"), cube=config.pop("cube"), llm=llm, files=config.pop("files"))
    for report in memory.repaired:
        print(f"memstack: {memory.location}: {summary(report)}", file=sys.stderr)
    return build(memory, **config)


def serve_stdio(memory: Memory, key: str | None, model: str | None = None) -> None:
    """MCP over stdio; with `model` ("smollm2" or a folder, loaded now) the tools
    generate_from_memory and ask_shard too."""
    from .generation import ServedModel
    from .mcp import build_mcp

    served = ServedModel.load(memory, model) if model else None
    build_mcp(memory, stdio_key=key, served=served).run("stdio")
