"""The OpenAI-compatible client and JSON replies, over real HTTP against the scripted fake server:
retries, time-outs, refused connections, HTTP errors, garbage, truncated and oversized replies."""

from __future__ import annotations

import socket
import time

import pytest
from pydantic import BaseModel

from fake_llm import Drip, Fault, Hang, Raw, Reply, ScriptedLLM
from memstack import (InvalidInputError, LLMOutputError, LLMResponseError, LLMUnavailableError,
                      OpenAIChat)
from memstack.llm.structured import ask, parse_reply

HELLO = [{"role": "user", "content": "hello"}]


class Pet(BaseModel):
    name: str
    age: int


@pytest.fixture
def server():
    with ScriptedLLM() as fake:
        yield fake


def client(server: ScriptedLLM, **options) -> OpenAIChat:
    return OpenAIChat(base_url=server.url, model="fake", backoff=0.01, **options)


def test_completion_and_token_accounting(server):
    server.script(Reply("hi there"), Reply("again", usage=False))
    llm = client(server)
    first = llm.complete(HELLO)
    assert first.text == "hi there" and first.prompt_tokens > 0 and not first.estimated_tokens
    second = llm.complete(HELLO)
    assert second.estimated_tokens and second.completion_tokens >= 1  # no usage: estimated
    assert llm.usage.calls == 2
    assert llm.usage.prompt_tokens == first.prompt_tokens + second.prompt_tokens


def test_http_500_is_retried_then_succeeds(server):
    server.script(Fault(500), Fault(503), Reply("ok"))
    llm = client(server, max_retries=2)
    assert llm.complete(HELLO).text == "ok"
    assert len(server.requests) == 3 and llm.usage.retries == 2 and llm.usage.failed_calls == 2


def test_retries_are_bounded(server):
    server.script(*[Fault(500)] * 10)
    llm = client(server, max_retries=2)
    with pytest.raises(LLMResponseError, match="failed 3 time"):
        llm.complete(HELLO)
    assert len(server.requests) == 3


def test_retry_after_is_honoured(server):
    server.script(Fault(429, headers={"Retry-After": "0.3"}), Reply("ok"))
    started = time.monotonic()
    assert client(server).complete(HELLO).text == "ok"
    assert time.monotonic() - started >= 0.3


def test_client_errors_are_not_retried(server):
    server.script(Fault(401, '{"error": "bad key"}'), Reply("never"))
    with pytest.raises(LLMResponseError, match="HTTP 401"):
        client(server).complete(HELLO)
    assert len(server.requests) == 1


def test_endpoint_down_fails_fast_with_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = OpenAIChat(base_url=f"http://127.0.0.1:{port}/v1", model="m", backoff=0.01)
    started = time.monotonic()
    with pytest.raises(LLMUnavailableError, match="cannot reach"):
        llm.complete(HELLO)
    assert time.monotonic() - started < 5


def test_time_out(server):
    server.script(Hang(2.0, Reply("late")), Hang(2.0, Reply("late")))
    llm = client(server, timeout=0.5, max_retries=1)
    with pytest.raises(LLMUnavailableError, match="timed out"):
        llm.complete(HELLO)


def test_a_slow_drip_cannot_stretch_the_deadline(server):
    server.script(Drip(b'{"choices": [' + b" " * 200 + b"]}", interval=0.02))
    llm = client(server, timeout=1.0, max_retries=0)
    started = time.monotonic()
    with pytest.raises(LLMUnavailableError, match="no complete reply"):
        llm.complete(HELLO)
    assert time.monotonic() - started < 2.5


def test_a_reply_of_megabytes_is_refused(server):
    server.script(Raw(b'{"x": "' + b"a" * 5_000_000 + b'"}'))
    with pytest.raises(LLMResponseError, match="passed 2,000,000 bytes"):
        client(server).complete(HELLO)


@pytest.mark.parametrize("body", [b"<html>502 bad gateway</html>", b'{"choices": []}',
                                  b'{"choices": [{"message": {"content": 5}}]}', b""])
def test_a_body_that_is_no_completion(server, body):
    server.script(Raw(body))
    with pytest.raises(LLMResponseError, match="no chat completion"):
        client(server).complete(HELLO)


def test_unsupported_response_format_falls_back(server):
    rejected = Fault(400, '{"error": "unknown response_format type json_schema"}')
    server.script(rejected, Reply('{"name": "Miso", "age": 2}'))
    llm = client(server)
    assert ask(llm, HELLO, Pet).value == Pet(name="Miso", age=2)
    assert server.requests[0]["response_format"]["type"] == "json_schema"
    assert server.requests[1]["response_format"]["type"] == "json_object"
    assert "schema" in server.requests[1]["response_format"]  # as llama-cpp-python reads it
    assert llm.structured == "json_object"  # remembered for the next calls


def test_bad_configuration_is_refused():
    with pytest.raises(InvalidInputError):
        OpenAIChat(base_url="localhost:8080", model="m")
    with pytest.raises(InvalidInputError):
        OpenAIChat(base_url="http://x/v1", model="")


@pytest.mark.parametrize("text", ['{"name": "Miso", "age": 2}',
                                  '```json\n{"name": "Miso", "age": 2}\n```',
                                  'Sure! Here it is: {"name": "Miso", "age": 2} Hope it helps.'])
def test_lenient_parsing(text):
    assert parse_reply(text, Pet) == Pet(name="Miso", age=2)


@pytest.mark.parametrize("text, problem", [('{"name": "Miso", "age": 2', "no JSON object"),
                                           ('{"name": "Miso", "age": }', "not valid JSON"),
                                           ('{"name": "Miso"}', "age: Field required"),
                                           ("no json here", "no JSON object")])
def test_invalid_replies_are_explained(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_reply(text, Pet)


def test_one_repair_then_success(server):
    server.script(Reply('{"name": "Miso", "age": '), Reply('{"name": "Miso", "age": 2}'))
    reply = ask(client(server), HELLO, Pet)
    assert reply.value.age == 2 and reply.repaired
    repair_prompt = server.requests[1]["messages"][-1]["content"]
    assert "invalid" in repair_prompt and '"age"' in repair_prompt  # the error and the schema


def test_invalid_twice_raises_with_both_replies(server):
    server.script(Reply("garbage"), Reply('{"name": 3}'))
    with pytest.raises(LLMOutputError, match="failed its schema twice") as caught:
        ask(client(server), HELLO, Pet)
    assert [c.text for c in caught.value.completions] == ["garbage", '{"name": 3}']
    assert len(server.requests) == 2  # one repair, no more
