"""Load on a running server over loopback: concurrent clients mixing adds and searches.

`memstack serve` runs as its own process on a fresh database (an SQLite file in the workdir, or
the empty PostgreSQL database given as `db`) preloaded with synthetic memories
(bench.speed's corpus); each client has its own API key and cube, and loops for the given time:
an add (one user message) with probability `add_share`, else a search of its cube. Afterwards every
acknowledged add is fetched back by id: a write the server acknowledged and lost is counted.

The searches draw from a pool of a few hundred questions, so a server's query cache answers
most of them after the first minute; `unique_queries` makes every search's text new (a number
appended) to measure the encoder's full cost.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from .._memory import Memory
from ..server.auth import Keys
from .retrieval import _pct, machine, remove_db, require_empty
from .speed import _turn, corpus, queries


def run(*, clients: int = 16, seconds: float = 60.0, add_share: float = 0.2,
        preload: int = 5000, workdir: str | Path | None = None, seed: int = 0,
        workers: int = 2, threads: int = 16, db: str | None = None,
        query_cache: int = 4096, unique_queries: bool = False,
        queries: str = "int8") -> dict[str, Any]:
    folder = Path(workdir or tempfile.mkdtemp(prefix="memstack-server-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    if db is None:
        remove_db(folder, "server.db")
    target = db or str(folder / "server.db")
    tokens = _prepare(target, clients, preload, folder)
    port = free_port()
    process = start(target, port, workers=workers, threads=threads, files=folder,
                    query_cache=query_cache, queries=queries)
    try:
        url = f"http://127.0.0.1:{port}"
        stats, acknowledged = asyncio.run(_load(url, tokens, seconds, add_share, seed, preload,
                                                unique_queries))
        lost = asyncio.run(_verify(url, tokens, acknowledged))
    finally:
        process.terminate()
        process.wait(timeout=30)
    return _report(stats, acknowledged, lost, clients=clients, seconds=seconds,
                   add_share=add_share, preload=preload, server_workers=workers,
                   server_threads=threads, store="postgres" if db else "sqlite",
                   query_cache=query_cache, unique_queries=unique_queries, queries=queries)


def _prepare(db: str, clients: int, preload: int, folder: Path) -> list[str]:
    """Keys and cubes for the clients, and `preload` memories spread over their cubes."""
    with Memory(db, track_access=False, files=folder) as memory:
        require_empty(memory)
        keys = Keys(memory.store)
        tokens = [keys.create_key(f"client{n}").token for n in range(clients)]
        for n in range(clients):
            memory.create_cube(f"~client{n}", owner=f"client{n}")
        sessions = list(corpus(preload))
        memory.add_many({"messages": s.messages, "user_id": s.user, "session_id": s.id,
                         "observed_at": s.date, "cube": f"~client{i % clients}"}
                        for i, s in enumerate(sessions))
    return tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(db: str, port: int, *, workers: int = 1, threads: int = 16, rate_limit: float = 0,
          files: Path | None = None, query_cache: int = 4096, queries: str = "int8"
          ) -> subprocess.Popen:
    """`memstack serve` on `db` (a file or URL) as a process of its own; returns once
    /v1/health answers (a RuntimeError with the server's last words if it does not). Its
    stderr goes to the file `process.log` (a pipe nobody reads would stall it once full)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "memstack", "--db", db, "serve", "--port", str(port),
               "--rate-limit", str(rate_limit), "--workers", str(workers),
               "--threads", str(threads), "--query-cache", str(query_cache),
               "--queries", queries]
    if files is not None:
        command[5:5] = ["--files", str(files)]
    log = Path(files) / f"serve-{port}.log" if files is not None else \
        Path(tempfile.mkstemp(prefix=f"memstack-serve-{port}-", suffix=".log")[1])
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    process.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 300  # each worker loads the model and builds its ONNX copies
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
        if process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]!r}")


async def _load(url: str, tokens: list[str], seconds: float, add_share: float, seed: int,
                preload: int, unique: bool = False
                ) -> tuple[dict[str, list], list[tuple[int, str]]]:
    stats: dict[str, list] = defaultdict(list)  # op -> [(latency_ms, status)]
    acknowledged: list[tuple[int, str]] = []
    questions = [q for _, q in queries(2000, preload, seed=seed + 1)]
    limits = httpx.Limits(max_connections=len(tokens) * 2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        for n in range(len(tokens)):  # warm-up: the model, the indexes
            await http.post("/v1/search", json={"query": "warm up"}, headers=_auth(tokens[n]))
        end = time.monotonic() + seconds
        await asyncio.gather(*(_client(http, n, token, end, add_share, questions, stats,
                                       acknowledged, random.Random(seed + n), unique)
                               for n, token in enumerate(tokens)))
    return stats, acknowledged


async def _client(http: httpx.AsyncClient, n: int, token: str, end: float, add_share: float,
                  questions: list[str], stats: dict[str, list],
                  acknowledged: list[tuple[int, str]], rng: random.Random,
                  unique: bool = False) -> None:
    sent = 0
    while time.monotonic() < end:
        sent += 1
        adding = rng.random() < add_share
        started = time.perf_counter()
        try:
            if adding:
                message = _turn(rng, "Ana", 0)
                response = await http.post("/v1/memories", headers=_auth(token), json={
                    "messages": [message], "user_id": f"client{n}", "session_id": f"load-{n}"})
            else:
                query = rng.choice(questions) + (f" ({n}-{sent})" if unique else "")
                response = await http.post("/v1/search", headers=_auth(token), json={
                    "query": query, "top_k": 10})
            status = response.status_code
        except httpx.HTTPError:
            status = 0
        stats["add" if adding else "search"].append(
            ((time.perf_counter() - started) * 1000, status))
        if adding and status == 201:
            acknowledged.append((n, response.json()["results"][0]["id"]))


async def _verify(url: str, tokens: list[str], acknowledged: list[tuple[int, str]]) -> int:
    lost = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for n, memory_id in acknowledged:
            response = await http.get(f"/v1/memories/{memory_id}", headers=_auth(tokens[n]))
            lost += response.status_code != 200
    return lost


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _report(stats: dict[str, list], acknowledged: list, lost: int, **settings: Any
            ) -> dict[str, Any]:
    seconds = settings["seconds"]
    out: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime()),
                           **settings, "acknowledged_adds": len(acknowledged),
                           "lost_writes": lost}
    for op in ("search", "add"):
        rows = stats.get(op, [])
        latencies = sorted(ms for ms, status in rows if 200 <= status < 300)
        out[op] = {"requests": len(rows), "per_second": round(len(latencies) / seconds, 1),
                   "errors": sum(1 for _, status in rows if not 200 <= status < 300),
                   "p50_ms": _pct(latencies, 50), "p95_ms": _pct(latencies, 95),
                   "p99_ms": _pct(latencies, 99)}
    return out
