"""The test fixtures themselves: a server process that dies makes the test that used it fail
with the process's exit status and the end of its stderr, not a bare 'connection refused'."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CRASHING = '''
import sys, httpx
from conftest import ServerProcess, free_port

SCRIPT = """
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def do_POST(self):
        sys.stderr.write("general protection fault in libggml-cpu.so\\\\n"); sys.stderr.flush()
        os.abort()
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

def test_uses_a_server_that_crashes(tmp_path):
    port = free_port()
    server = ServerProcess("fake", [sys.executable, "-c", SCRIPT, str(port)], tmp_path)
    server.wait_ready(f"http://127.0.0.1:{port}/")
    for _ in range(2):  # the first request kills it, the second is refused
        try:
            httpx.post(f"http://127.0.0.1:{port}/", timeout=5)
        except httpx.HTTPError:
            pass
    httpx.post(f"http://127.0.0.1:{port}/", timeout=5)
'''


def test_a_dead_server_is_reported_with_its_status_and_stderr(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner=CRASHING)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the fake server process died (killed by SIGABRT)*",
                                 "*general protection fault in libggml-cpu.so*",
                                 "*The test then failed:*"])
