"""Schemathesis (its CLI, the same run a user would do) against the running server's own
OpenAPI spec: generated valid and invalid requests, checked for no 5xx and for responses that
match the spec (status code, content type, body schema). Exits non-zero on any failure."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memstack import Client


@pytest.mark.slow
def test_schemathesis_finds_no_failure(db_path, embedder, tmp_path):
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
             "--checks", "not_a_server_error,response_schema_conformance,"
                         "status_code_conformance,content_type_conformance",
             "--max-examples", "15", "--seed", "1",
             # revoking the fuzzer's own key would end the run early
             "--exclude-path-regex", "/v1/keys/"],
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:]
        assert " passed" in result.stdout.split("SUMMARY")[-1]
    finally:
        running.stop()
        memory.close()
