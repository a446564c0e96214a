"""Background maintenance in the server (the service is tiers/maintenance.py): a thread started
in the app's lifespan applies retention and, with a model served, runs the KV scheduler and
retrains stale shards every `every` seconds (the first run one interval after start), when no
request but the probes (/v1/health, /v1/ready, /metrics) came for `quiet` seconds and inside the
daily window. With several workers each process has the thread, and the store's lease lets one
run at a time. Each unit of a run holds the served model's turn; a shard's retrain hands it to a
waiting generate or ask request between two optimizer steps (a few seconds), so requests do not
wait for a whole retrain. Shutting down stops a retrain at its next step and releases the lease.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from .._memory import Memory
from ..tiers.maintenance import Maintenance, MaintenanceSettings
from .observe import PROBES

SERVER_DEFAULTS = MaintenanceSettings(every=3600.0, quiet=60.0)


class LastRequest:
    """When the last request other than a health check arrived (start: the app's creation)."""

    def __init__(self) -> None:
        self.at = time.time()

    def __call__(self) -> float:
        return self.at


class NoteRequests:
    """ASGI middleware: every request but the probes (/v1/health, /v1/ready, /metrics)
    counts as activity."""

    def __init__(self, app: Any, seen: LastRequest) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in PROBES:
            self.seen.at = time.time()
        await self.app(scope, receive, send)


def install(app: FastAPI, memory: Memory, served: Any,
            settings: MaintenanceSettings | dict[str, Any] | None) -> None:
    """Set app.state.maintenance (None with `every` 0; without a model, retention only) and
    start it with the app's lifespan."""
    if isinstance(settings, dict):
        settings = MaintenanceSettings(**settings)
    settings = (settings or SERVER_DEFAULTS).check()
    app.state.maintenance = None
    if settings.every <= 0 or getattr(memory.store, "read_only", False):
        return
    seen = LastRequest()
    app.add_middleware(NoteRequests, seen=seen)
    service = memory.maintenance(model=served.lm if served else None, settings=settings,
                                 last_activity=seen)
    if served is not None:
        service.guard = served.turn  # the model's tokenizer and caches are shared with requests
    app.state.maintenance = service
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state:
            service.start(delay=True)
            try:
                yield state
            finally:
                await run_in_threadpool(service.stop)

    app.router.lifespan_context = lifespan


def status(app: FastAPI) -> dict[str, Any]:
    """The `maintenance` field of /v1/health."""
    service: Maintenance | None = getattr(app.state, "maintenance", None)
    return service.status() if service is not None else {"enabled": False}
