"""`memstack serve` and `memstack mcp`: checks before start, then uvicorn (or MCP over stdio)."""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from .._errors import InvalidInputError, MissingExtraError
from .._memory import Memory
from .auth import Keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(memory: Memory, *, host: str = "127.0.0.1", rate_limit: float = 100.0,
          max_body_bytes: int = 2_000_000, threads: int = 16) -> Any:
    """The full ASGI app: REST + /mcp (streamable HTTP) + /ui. Refuses to run open (without
    any API key) on a non-loopback address."""
    try:
        import anyio.to_thread
        from fastapi import FastAPI  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("the server needs FastAPI and uvicorn: "
                                "pip install 'memstack[server]'") from exc
    from .app import create_app
    from .mcp import build_mcp

    loopback = is_loopback(host)
    if not loopback and not Keys(memory.store).any_key():
        raise InvalidInputError(
            f"refusing to serve on {host} without any API key: anyone could read and change "
            "every memory. Create one first: memstack keys create --user you --role admin")
    mcp_server = build_mcp(memory, allow_open=loopback)
    mcp_app = mcp_server.streamable_http_app(streamable_http_path="/", stateless_http=True,
                                             json_response=True, host=host,
                                             max_request_body_size=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        async with mcp_app.router.lifespan_context(mcp_app):  # MCP's session manager
            yield

    app = create_app(memory, allow_open=loopback, rate_limit=rate_limit,
                     burst=max(2 * rate_limit, 1), max_body_bytes=max_body_bytes)
    app.router.lifespan_context = lifespan
    app.mount("/mcp", mcp_app)
    return app


def serve(memory: Memory, *, host: str, port: int, **options: Any) -> None:
    import uvicorn

    app = build(memory, host=host, **options)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def serve_stdio(memory: Memory, key: str | None) -> None:
    from .mcp import build_mcp

    build_mcp(memory, stdio_key=key).run("stdio")
