"""Every abuse of the REST server gets its documented answer (docs/server.md, "Errors"), through
a real uvicorn server: bodies that are too large, not JSON, of another content type or too
slow; unknown paths and wrong methods; slow and idle connections that must not slow anyone
else; and concurrent load, under which no request gets a 4xx it did not cause."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from memstack import Memory
from memstack.server.guards import BodyTimeout, raise_open_files

from conftest import RunningServer


@pytest.fixture
def running(db_path, embedder):
    memory = Memory(db_path, embedder=embedder)
    server = RunningServer(memory, rate_limit=0, body_timeout=BodyTimeout(total=2, gap=1))
    server.admin = server.key("root", role="admin")
    yield server
    server.stop()
    memory.close()


def _call(server, method, path, **kw):
    headers = {"Authorization": f"Bearer {server.admin}", **kw.pop("headers", {})}
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


def _error(response) -> dict:
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


JSON = {"Content-Type": "application/json"}


def test_bodies_that_are_not_json(running):
    r = _call(running, "POST", "/v1/search", content=b'{"query": "x",\n "top_k": }',
              headers=JSON)
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
    assert "line 2, column 11 (character 25)" in _error(r)["message"]
    r = _call(running, "POST", "/v1/memories", content=b'{"messages": "caf\xe9"}', headers=JSON)
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
    assert "utf-8" in _error(r)["message"]
    r = _call(running, "POST", "/v1/search", json={"quer": "x"})  # JSON, wrong fields
    assert r.status_code == 422 and _error(r)["code"] == "validation_error"
    assert "body.query: Field required" in _error(r)["message"]


@pytest.mark.parametrize("headers, content", [
    ({"Content-Type": "text/plain"}, b'{"query": "x"}'),
    ({"Content-Type": "application/x-www-form-urlencoded"}, b"query=x"),
    ({"Content-Type": "multipart/form-data; boundary=b"}, b"--b\r\n\r\nx\r\n--b--\r\n"),
    ({}, b'{"query": "x"}'),  # no Content-Type at all
])
def test_a_json_route_refuses_other_content_types(running, headers, content):
    r = _call(running, "POST", "/v1/search", content=content, headers=headers)
    assert r.status_code == 415 and _error(r)["code"] == "unsupported_media_type"
    assert "application/json" in _error(r)["message"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_content_types_pass(running, content_type):
    r = _call(running, "POST", "/v1/search", content=b'{"query": "x"}',
              headers={"Content-Type": content_type})
    assert r.status_code == 200


def test_unknown_paths_and_wrong_methods(running):
    for path in ("/v1/nope", "/v1/memories/abc/nope", "/nope"):
        r = _call(running, "GET", path)
        assert r.status_code == 404 and _error(r)["code"] == "not_found"
    r = _call(running, "DELETE", "/v1/search")
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"
    r = _call(running, "PATCH", "/v1/memories/abc")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "PUT",
                                                                             "DELETE"}


def test_bodies_over_the_limit(running):
    r = _call(running, "POST", "/v1/memories", content=b"x" * 3_000_000, headers=JSON)
    assert r.status_code == 413 and _error(r)["code"] == "too_large"

    def chunks():  # no Content-Length: chunked, 2.6 MB against 2 MB, read by uvicorn
        for _ in range(26):
            yield b"x" * 100_000

    r = _call(running, "POST", "/v1/memories", content=chunks(), headers=JSON)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413 and _error(r)["code"] == "too_large"
    r = _call(running, "POST", "/v1/search", content=iter([b'{"query": ', b'"x"}']),
              headers=JSON)
    assert r.status_code == 200  # a small chunked body is read as it is
    r = _call(running, "POST", "/mcp/", content=b"x" * 3_000_000, headers=JSON)
    assert r.status_code == 413  # the mounted MCP app is behind the same limit


def _post_slowly(server, pieces: list[bytes], pause: float) -> tuple[float, bytes]:
    """POST /v1/search over a raw socket, its body in `pieces` with `pause` seconds before
    each; returns (seconds until the server answered and closed, what it sent)."""
    body = b"".join(pieces)
    conn = socket.create_connection(("127.0.0.1", server.port))
    conn.sendall(f"POST /v1/search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.admin}"
                 f"\r\nContent-Type: application/json\r\nContent-Length: {len(body) + 1}\r\n"
                 "\r\n".encode())
    started, received = time.monotonic(), b""
    conn.settimeout(pause)
    for piece in pieces:
        try:
            received += conn.recv(65536)  # the answer, before the pause is over
            break
        except TimeoutError:
            conn.sendall(piece)
    conn.settimeout(10)
    while chunk := conn.recv(65536):
        received += chunk
    conn.close()
    return time.monotonic() - started, received


def test_a_slow_body_is_answered_408_and_the_connection_closed(running):
    # a byte every 0.3 s: every gap (1 s) is kept, the total (2 s) is not
    seconds, received = _post_slowly(running, [b" "] * 30, pause=0.3)
    assert received.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in received
    assert 1.8 < seconds < 4
    # a body that stops half-way: the gap (1 s) runs out
    seconds, received = _post_slowly(running, [b'{"query"'] + [b""] * 5, pause=0.6)
    assert received.startswith(b"HTTP/1.1 408") and 0.9 < seconds < 2.5


def _p95(latencies: list[float]) -> float:
    return sorted(latencies)[int(0.95 * len(latencies)) - 1]


def _latencies(url: str, token: str, topic: str) -> list[float]:
    """50 health checks and 50 searches (each query new: none is cached), one by one."""
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as http:
        http.post("/v1/search", json={"query": "warm up"})
        for n in range(50):
            query = {"json": {"query": f"{topic} number {n}"}}
            for method, path, kw in (("GET", "/v1/health", {}), ("POST", "/v1/search", query)):
                started = time.perf_counter()
                assert http.request(method, path, **kw).status_code == 200
                out.append(time.perf_counter() - started)
    return out


class Trickle:
    """Clients sending their request bodies a byte at a time, each every `pause` seconds."""

    def __init__(self, port: int, clients: int, pause: float) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]
        for s in self.socks:
            s.sendall(b"POST /v1/memories HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 100000\r\n\r\n")
        self.pause, self.stopped = pause, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.pause):
            for s in self.socks:
                s.sendall(b" ")

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def test_slow_clients_hold_no_worker_and_slow_no_one(db_path, embedder):
    """Bodies are read in the event loop: 32 clients sending a byte every 0.2 s, on a server
    with 2 worker threads and the default 30 s body timeout, leave others' latency as it was."""
    with Memory(db_path, embedder=embedder) as memory:
        server = RunningServer(memory, rate_limit=0, threads=2)
        try:
            token = server.key("root", role="admin")
            httpx.post(f"{server.url}/v1/memories", json={"messages": "my cat is Miso"},
                       headers={"Authorization": f"Bearer {token}"}).raise_for_status()
            before = _p95(_latencies(server.url, token, "cat"))
            slow = Trickle(server.port, clients=32, pause=0.2)
            try:
                during = _p95(_latencies(server.url, token, "dog"))
                assert slow.thread.is_alive()  # the slow clients were still sending
            finally:
                slow.close()
        finally:
            server.stop()
    print(f"p95 before {before * 1000:.1f} ms, during {during * 1000:.1f} ms")
    assert during < max(3 * before, before + 0.1)


def test_a_thousand_idle_connections_stop_no_one(db_path, embedder):
    """1,000 connections opened and held without a request; a client still gets answers."""
    raise_open_files()  # 2,000 descriptors here: the clients' ends and the server's
    with Memory(db_path, embedder=embedder) as memory:
        server = RunningServer(memory, rate_limit=0)
        idle = []
        try:
            token = server.key("root", role="admin")
            before = _p95(_latencies(server.url, token, "cat"))
            idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
                    for _ in range(1000)]
            during = _p95(_latencies(server.url, token, "dog"))
            for conn in idle[::100]:  # still open (uvicorn does not time out a connection
                conn.setblocking(False)  # that never sent a request)
                with pytest.raises(BlockingIOError):
                    conn.recv(1)
        finally:
            for conn in idle:
                conn.close()
            server.stop()
    print(f"p95 before {before * 1000:.1f} ms, with 1,000 idle connections {during * 1000:.1f} ms")
    assert during < max(3 * before, before + 0.1)


def test_serve_raises_the_open_file_limit():
    script = ("import resource\n"
              "from memstack.server.guards import raise_open_files\n"
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
              "print(raise_open_files(), hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    before, after, hard, now = (int(x.strip("(),")) for x in out)
    expected = 65_536 if hard == -1 else min(65_536, hard)
    assert (before, after, now) == (256, expected, expected)


def _statuses(url: str, token: str) -> dict[tuple[str, str], float]:
    """(route, status) -> requests answered, from the server's own /metrics."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("memstack_http_requests_total{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:
                                                               line.index("}")].split(","))
            key = (labels["route"].strip('"'), labels["status"].strip('"'))
            out[key] = out.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return out


def _hang_up_mid_body(port: int, token: str) -> None:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(f"POST /v1/memories HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
                 '{"messages": "half'.encode())
    conn.close()


def test_under_concurrent_load_no_request_gets_a_4xx_it_did_not_cause(db_path, embedder):
    """16 clients, one add to four searches each, several in one session of one user, while
    others hang up half-way through their bodies: every request is answered 2xx, and the
    server counts the hang-ups as 499, not as 400 (FastAPI's answer to any failure while it
    reads a body, which the server then logged and counted as the client's bad request)."""
    import asyncio
    import random

    from memstack.bench.speed import _turn, corpus, queries

    with Memory(db_path, embedder=embedder) as memory:
        memory.create_cube("~ana", owner="ana")
        memory.add_many({"messages": s.messages, "user_id": s.user, "session_id": s.id,
                         "observed_at": s.date, "cube": "~ana"} for s in corpus(120))
        server = RunningServer(memory, rate_limit=100)
        try:
            token = server.key("ana")
            questions = [q for _, q in queries(200, 120)]
            seen: list[tuple[str, int, str]] = []

            async def client(http: httpx.AsyncClient, n: int, end: float) -> None:
                rng = random.Random(n)
                while time.monotonic() < end:
                    if rng.random() < 0.2:
                        r = await http.post("/v1/memories", json={
                            "messages": [_turn(rng, "Ana", 0)], "user_id": "ana",
                            "session_id": f"load-{n % 4}"})  # four clients a session
                    else:
                        r = await http.post("/v1/search", json={
                            "query": rng.choice(questions), "top_k": 10})
                    seen.append((r.request.url.path, r.status_code, r.text[:200]))
                    if n % 4 == 0:
                        await asyncio.to_thread(_hang_up_mid_body, server.port, token)

            async def load() -> None:
                async with httpx.AsyncClient(base_url=server.url, timeout=60, headers={
                        "Authorization": f"Bearer {token}"}) as http:
                    end = time.monotonic() + 6
                    await asyncio.gather(*(client(http, n, end) for n in range(16)))

            asyncio.run(load())
            time.sleep(0.5)  # the last hang-ups are counted
            counted = _statuses(server.url, server.key("root", role="admin"))
        finally:
            server.stop()
    failed = [s for s in seen if s[1] >= 300]
    assert len(seen) > 100 and not failed, failed[:5]
    client_errors = {key: n for key, n in counted.items() if key[1].startswith("4")}
    assert set(client_errors) == {("/v1/memories", "499")}, client_errors


@pytest.mark.slow  # two worker processes start: about 40 s
def test_memstack_serve_body_timeout(db_path, tmp_path):
    """`memstack serve --body-timeout 1`, two workers: a body that stops half-way gets 408."""
    from conftest import ServerProcess, free_port

    port = free_port()
    server = ServerProcess("serve", [
        sys.executable, "-m", "memstack", "--db", str(db_path), "serve", "--port", str(port),
        "--workers", "2", "--body-timeout", "1"], tmp_path)
    try:
        server.wait_ready(f"http://127.0.0.1:{port}/v1/health")
        server.port, server.admin = port, "none"  # the 408 comes before any key is checked
        seconds, received = _post_slowly(server, [b'{"query"'] + [b""] * 8, pause=0.4)
        assert received.startswith(b"HTTP/1.1 408") and 0.9 < seconds < 3
    finally:
        server.stop()
