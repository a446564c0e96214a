"""A FAKE LLM server for tests: a real HTTP server speaking the OpenAI chat-completions protocol
whose replies are scripted, not generated.

It exists because the operation logic (ADD / UPDATE / DELETE / NOOP, superseding, repair, faults)
must be tested deterministically, and a real small model (SmolLM2-135M, tested separately in
test_llm_real.py) cannot be made to say a given thing. memstack talks to it over real HTTP with
its real client, exactly as to llama.cpp or OpenAI.

    with ScriptedLLM() as llm:
        llm.script(facts("Ann lives in Paris"), Fault(500), decisions(add(1)))
        memory = Memory(path, llm=OpenAIChat(base_url=llm.url, model="fake"))

Each request takes the next scripted action; with the script empty, `responder(request)` is asked
(a function of the request body returning an action), else the server answers HTTP 500.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    """A normal completion whose message content is `content` (a dict is sent as JSON text)."""

    content: Any
    usage: bool = True


@dataclass
class Fault:
    """An HTTP error status with a body, optionally after a delay."""

    status: int = 500
    body: str = '{"error": {"message": "scripted failure"}}'
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Raw:
    """Bytes sent as a 200 body as they are (garbage, truncated JSON, megabytes...)."""

    body: bytes


@dataclass
class Hang:
    """Wait `seconds` before doing `then` (for time-outs)."""

    seconds: float
    then: Any = None


@dataclass
class Drip:
    """A 200 reply sent one byte every `interval` seconds (a read time-out never fires)."""

    body: bytes
    interval: float = 0.05


class ScriptedLLM:
    def __init__(self, responder: Callable[[dict], Any] | None = None) -> None:
        self.responder = responder
        self.requests: list[dict] = []
        self._script: list[Any] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *actions: Any) -> None:
        with self._lock:
            self._script.extend(actions)

    def __enter__(self) -> "ScriptedLLM":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, request: dict) -> Any:
        with self._lock:
            self.requests.append(request)
            if self._script:
                return self._script.pop(0)
        return self.responder(request) if self.responder else Fault(500)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # /v1/models, as llama.cpp lists its one model
                self._send(200, json.dumps({"object": "list", "data": [
                    {"id": "fake-model", "object": "model"}]}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._act(fake._next(body), body)

            def _act(self, action: Any, request: dict) -> None:
                if isinstance(action, Hang):
                    time.sleep(action.seconds)
                    action = action.then or Fault(504)
                if isinstance(action, Reply):
                    self._send(200, json.dumps(completion(action, request)).encode())
                elif isinstance(action, Fault):
                    self._send(action.status, action.body.encode(), action.headers)
                elif isinstance(action, Raw):
                    self._send(200, action.body)
                elif isinstance(action, Drip):
                    self._drip(action)
                else:
                    raise TypeError(f"unknown scripted action {action!r}")

            def _send(self, status: int, data: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (size cap, deadline): that is the test

            def _drip(self, action: Drip) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(action.body)))
                self.end_headers()
                try:
                    for byte in action.body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(action.interval)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


def completion(reply: Reply, request: dict) -> dict:
    content = reply.content if isinstance(reply.content, str) else json.dumps(reply.content)
    body: dict[str, Any] = {
        "id": "fake-1", "object": "chat.completion", "model": request.get("model", "fake"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}]}
    if reply.usage:
        prompt = sum(len(m["content"]) for m in request["messages"]) // 4
        body["usage"] = {"prompt_tokens": prompt, "completion_tokens": len(content) // 4,
                         "total_tokens": prompt + len(content) // 4}
    return body


# builders for the two extraction replies -----------------------------------------------------
def facts(*texts: str, kind: str = "fact", sources: list[int] | None = None) -> Reply:
    return Reply({"facts": [{"text": t, "kind": kind, "sources": sources or [1]}
                            for t in texts]})


def decisions(*items: dict) -> Reply:
    return Reply({"decisions": list(items)})


def add(fact: int) -> dict:
    return {"event": "ADD", "fact": fact}


def update(fact: int, target: int, text: str) -> dict:
    return {"event": "UPDATE", "fact": fact, "target": target, "text": text}


def delete(fact: int, target: int) -> dict:
    return {"event": "DELETE", "fact": fact, "target": target}


def noop(fact: int, target: int) -> dict:
    return {"event": "NOOP", "fact": fact, "target": target}
