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
