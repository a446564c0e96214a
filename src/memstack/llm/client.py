"""A client for OpenAI-compatible chat completions (OpenAI, llama.cpp, vLLM, Ollama, ...).

Bounded retries with exponential backoff on refused connections, time-outs, 429 and 5xx; a
deadline per attempt that a slow-dripping server cannot stretch; a cap on the reply size; and
token accounting from the server's `usage` (estimated from characters when a server omits it).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

from .._errors import InvalidInputError, LLMResponseError, LLMUnavailableError

StructuredMode = Literal["json_schema", "json_object", "prompt"]
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Completion:
    """One chat completion: its text and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str | None = None
    estimated_tokens: bool = False  # the server sent no usage; counted from characters


@dataclass
class Usage:
    """Running totals of a client (thread-safe through the client's lock)."""

    calls: int = 0
    failed_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ChatModel(Protocol):
    """What memstack needs of an LLM: one chat completion, optionally constrained to a schema."""

    name: str

    def complete(self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None = None,
                 max_tokens: int = 512, temperature: float = 0.0,
                 stop: list[str] | None = None) -> Completion: ...


@dataclass
class OpenAIChat:
    """Chat completions from any OpenAI-compatible endpoint.

    >>> llm = OpenAIChat(base_url="http://127.0.0.1:8080/v1", model="smollm2")
    >>> llm.complete([{"role": "user", "content": "Say hi"}]).text

    `structured` is how a JSON schema is enforced: "json_schema" (OpenAI, vLLM, llama.cpp),
    "json_object" (older servers; the schema goes along as llama-cpp-python reads it) or "prompt"
    (schema in the prompt only). A server that rejects the mode with HTTP 400 is asked again
    with the next one, and the client remembers.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    connect_timeout: float = 5.0
    max_retries: int = 2
    backoff: float = 0.5
    max_response_bytes: int = 2_000_000
    structured: StructuredMode = "json_schema"
    usage: Usage = field(default_factory=Usage)

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://",
                                                                               "https://")):
            raise InvalidInputError(f"llm base_url must be an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise InvalidInputError("llm model must be named (the server's model id)")
        if self.max_retries < 0 or self.timeout <= 0:
            raise InvalidInputError("llm max_retries must be >= 0 and timeout > 0")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout))
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.model

    def close(self) -> None:
        self._http.close()

    def complete(self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None = None,
                 max_tokens: int = 512, temperature: float = 0.0,
                 stop: list[str] | None = None) -> Completion:
        """One completion, retried on transient failures; raises LLMError subclasses."""
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            body["stop"] = stop
        while True:
            request = {**body, **self._response_format(schema)}
            try:
                return self._with_retries(request, messages)
            except _Rejected as exc:
                if schema is None or self.structured == "prompt":
                    raise LLMResponseError(str(exc)) from None
                self.structured = "json_object" if self.structured == "json_schema" else "prompt"

    def _response_format(self, schema: dict[str, Any] | None) -> dict[str, Any]:
        if schema is None or self.structured == "prompt":
            return {}
        if self.structured == "json_object":
            return {"response_format": {"type": "json_object", "schema": schema}}
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "reply", "schema": schema, "strict": True}}}

    def _with_retries(self, request: dict[str, Any], messages: list[dict[str, str]]
                      ) -> Completion:
        for attempt in range(self.max_retries + 1):
            started = time.monotonic()
            try:
                completion = self._parse(self._post(request), messages,
                                         time.monotonic() - started)
            except _Transient as exc:
                self._count(failed=True)
                if attempt == self.max_retries:
                    raise exc.final(attempt + 1) from None
                self._count(retry=True)
                time.sleep(exc.wait or self.backoff * 2 ** attempt * (1 + random.random() / 2))
                continue
            except LLMResponseError:
                self._count(failed=True)
                raise
            self._count(completion=completion)
            return completion
        raise AssertionError("unreachable")

    def _post(self, request: dict[str, Any]) -> bytes:
        """POST with a whole-reply deadline and size cap (read time-outs alone reset per byte)."""
        deadline = time.monotonic() + self.timeout
        try:
            with self._http.stream("POST", "/chat/completions", json=request) as response:
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self.max_response_bytes:
                        raise LLMResponseError(
                            f"the LLM reply passed {self.max_response_bytes:,} bytes; refused "
                            "(raise max_response_bytes if that is expected)")
                    if time.monotonic() > deadline:
                        raise _Transient(f"no complete reply within {self.timeout:g} s",
                                         unavailable=True)
                    chunks.append(chunk)
                raw = b"".join(chunks)
                self._check_status(response, raw)
                return raw
        except httpx.TimeoutException as exc:
            raise _Transient(f"timed out after {self.timeout:g} s ({type(exc).__name__})",
                             unavailable=True) from exc
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
                httpx.WriteError) as exc:
            raise _Transient(f"cannot reach {self.base_url}: {exc}", unavailable=True) from exc
        except httpx.HTTPError as exc:
            raise LLMResponseError(f"request to {self.base_url} failed: {exc}") from exc

    def _check_status(self, response: httpx.Response, raw: bytes) -> None:
        if response.status_code < 400:
            return
        detail = raw[:300].decode("utf-8", "replace")
        # servers that do not know a response_format answer 400, 422 or (llama-cpp-python) 500
        if "response_format" in raw[:2000].decode("utf-8", "replace"):
            raise _Rejected(f"HTTP {response.status_code}: {detail}")
        if response.status_code in RETRY_STATUS:
            wait = _retry_after(response.headers.get("retry-after"))
            raise _Transient(f"HTTP {response.status_code}: {detail}", wait=wait)
        raise LLMResponseError(f"the LLM endpoint answered HTTP {response.status_code}: {detail}")

    def _parse(self, raw: bytes, messages: list[dict[str, str]], seconds: float) -> Completion:
        try:
            body = json.loads(raw)
            choice = body["choices"][0]
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError("message content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMResponseError(f"the LLM endpoint sent no chat completion ({exc}): "
                                   f"{raw[:200].decode('utf-8', 'replace')!r}") from None
        usage = body.get("usage") or {}
        estimated = not usage.get("prompt_tokens")
        prompt = usage.get("prompt_tokens") or estimate_tokens(
            " ".join(m.get("content", "") for m in messages))
        return Completion(text, int(prompt), int(usage.get("completion_tokens")
                                                 or estimate_tokens(text)),
                          seconds, choice.get("finish_reason"), estimated)

    def _count(self, *, completion: Completion | None = None, failed: bool = False,
               retry: bool = False) -> None:
        with self._lock:
            if completion is not None:
                self.usage.calls += 1
                self.usage.prompt_tokens += completion.prompt_tokens
                self.usage.completion_tokens += completion.completion_tokens
                self.usage.seconds += completion.seconds
            self.usage.failed_calls += failed
            self.usage.retries += retry


class _Transient(Exception):
    """A failure worth retrying."""

    def __init__(self, message: str, *, unavailable: bool = False,
                 wait: float | None = None) -> None:
        super().__init__(message)
        self.unavailable, self.wait = unavailable, wait

    def final(self, attempts: int) -> Exception:
        kind = LLMUnavailableError if self.unavailable else LLMResponseError
        return kind(f"the LLM endpoint failed {attempts} time(s); last: {self}. Check that the "
                    "server is running and --llm-url is right")


class _Rejected(Exception):
    """The server refused the structured-output mode (HTTP 400): try the next mode."""


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 30.0) if value else None
    except ValueError:
        return None


def estimate_tokens(text: str) -> int:
    """Tokens of `text` without a tokenizer: about 4 characters per token for English (BPE)."""
    return max(1, (len(text) + 3) // 4) if text else 0


def first_model(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> str:
    """The first model a server lists at /models (llama.cpp and Ollama serve one or a few)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=timeout)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise LLMUnavailableError(f"cannot list the models of {base_url} ({exc}); name one "
                                  "with --llm-model") from exc


def from_options(url: str | None, model: str | None = None, key: str | None = None,
                 timeout: float = 120.0) -> OpenAIChat | None:
    """The client the CLI and the server build from their options (None without a URL); the
    model defaults to the server's first."""
    if not url:
        return None
    return OpenAIChat(base_url=url, model=model or first_model(url, key), api_key=key,
                      timeout=timeout)
