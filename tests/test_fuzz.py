"""Schemathesis (its CLI, the same run a user would do) against the running server's own
OpenAPI spec: generated valid and invalid requests, checked for no 5xx and for responses that
match the spec (status code, content type, body schema). Exits non-zero on any failure. The
stateful run chains requests through the spec's links (server/spec.py): an add's id is read,
updated, deleted and its history read."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memstack import Client

CHECKS = ("not_a_server_error,response_schema_conformance,status_code_conformance,"
          "content_type_conformance")


def _schemathesis(db_path, embedder, *options: str) -> str:
    """Run schemathesis on a fresh server; its output, after asserting it found nothing."""
    from memstack import Memory

    from conftest import RunningServer

    memory = Memory(db_path, embedder=embedder)
    running = RunningServer(memory, rate_limit=0)
    try:
        admin = running.key("root", role="admin")
        Client(running.url, admin).add("a first memory to find", cube="default")
        st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
        result = subprocess.run(
            [st, "run", f"{running.url}/openapi.json", "-H", f"Authorization: Bearer {admin}",
             "--checks", CHECKS, "--seed", "1", *options],
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:]
        assert " passed" in result.stdout.split("SUMMARY")[-1]
        return result.stdout
    finally:
        running.stop()
        memory.close()


@pytest.mark.slow
def test_schemathesis_finds_no_failure(db_path, embedder):
    # revoking the fuzzer's own key would end the run early
    _schemathesis(db_path, embedder, "--max-examples", "15", "--exclude-path-regex", "/v1/keys/")


@pytest.mark.slow
def test_schemathesis_stateful_follows_the_memory_links(db_path, embedder):
    """About 40 s: 300 scenarios of add -> get / update / delete / history."""
    out = _schemathesis(db_path, embedder, "--phases", "stateful", "--max-examples", "300",
                        "--include-path-regex", "^/v1/memories")
    covered, total = map(int, re.search(r"API Links:\s+(\d+) covered / \d+ selected / "
                                        r"(\d+) total", out).groups())
    assert total == 12 and covered >= 8, out[-3000:]  # the links were followed, not just listed
