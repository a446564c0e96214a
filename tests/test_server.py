"""The REST API through real HTTP: the Client mirrors Memory, keys and grants decide access, and
every error has its status and stable code."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from memstack import (AsyncClient, AuthenticationError, Client, InvalidInputError, Memory,
                      NotFoundError, PermissionDeniedError, RateLimitedError)
from memstack.server.auth import Keys
from memstack.server.run import build

from conftest import RunningServer


def test_client_mirrors_memory(server):
    ann = Client(server.url, server.key("ann"))
    added = ann.add([{"role": "user", "name": "Ann", "content": "I adopted a grey cat named Miso"},
                     {"role": "assistant", "content": "Lovely!"}], user_id="ann",
                    session_id="s1", observed_at="2024-05-08")
    assert len(added.ids) == 2
    hits = ann.search("What is the cat called?", user_id="ann")
    assert hits[0].item.content.startswith("I adopted") and hits[0].item.cube == "~ann"
    item = ann.get(added.ids[0])
    assert item.speaker == "Ann" and item.observed_at.year == 2024
    updated = ann.update(item.id, "I adopted a grey cat named Miso on 7 May", reason="precise")
    assert updated.version == 2
    assert [v.reason for v in ann.history(item.id)] == ["add", "precise"]
    assert len(ann.get_all(kinds=["turn"])) == 2
    assert ann.delete(item.id) >= 1
    with pytest.raises(NotFoundError):
        ann.get(item.id)
    exported = ann.export("~ann")
    assert {row["content"] for row in exported} >= {"Lovely!"}


def test_pagination(server):
    ann = Client(server.url, server.key("ann"))
    for n in range(5):
        ann.add(f"note number {n}", user_id="ann", session_id="s")
    first = httpx.get(f"{server.url}/v1/memories", params={"limit": 2, "kind": "turn"},
                      headers={"Authorization": f"Bearer {server.key('ann')}"}).json()
    assert len(first["items"]) == 2 and first["next_offset"] == 2
    rest = ann.get_all(kinds=["turn"], offset=4, limit=2)
    assert [i.content for i in rest] == ["note number 4"]


def test_keys_and_grants(server):
    alice, bob = server.key("alice"), server.key("bob")
    a, b = Client(server.url, alice), Client(server.url, bob)
    a.create_cube("team")
    a.add("the launch is on Friday", cube="team")
    with pytest.raises(PermissionDeniedError):
        b.search("launch", cube="team")
    a.grant("team", "bob", "read")
    assert b.search("launch", cube="team")[0].item.content == "the launch is on Friday"
    with pytest.raises(PermissionDeniedError):
        b.add("bob was here", cube="team")
    a.grant("team", "bob", "write")
    b.add("bob was here", cube="team")
    with pytest.raises(PermissionDeniedError):  # only the owner (or an admin) grants
        b.grant("team", "bob", "write")
    item_id = a.add("alice's private note", user_id="alice").ids[0]
    with pytest.raises(NotFoundError):  # another user's item is not even said to exist
        b.get(item_id)
    with pytest.raises(PermissionDeniedError):
        b.search("note", cube="~alice")
    with pytest.raises(PermissionDeniedError):
        b.add("squatting", cube="~alice")
    assert {c.name for c in b.cubes()} == {"team"}


def test_authentication(server):
    token = server.key("carol")
    assert Client(server.url, token).cubes() == []
    for bad in (None, "msk_nope_nope", "Bearer", token[:-2] + "xx"):
        with pytest.raises(AuthenticationError):
            Client(server.url, bad).cubes()
    key_id = token.split("_")[1]
    Keys(server.memory.store).revoke(key_id)
    with pytest.raises(AuthenticationError, match="revoked"):
        Client(server.url, token).cubes()


def test_a_key_limited_to_cubes(server):
    limited = Client(server.url, server.key("dave", cubes=["dave-work"]))
    limited.add("work note", cube="dave-work")
    with pytest.raises(PermissionDeniedError, match="limited"):
        limited.add("elsewhere", cube="dave-home")
    with pytest.raises(PermissionDeniedError):
        limited.search("note")  # the default cube ~dave is outside the key's cubes


def test_errors_have_status_and_code(server):
    headers = {"Authorization": f"Bearer {server.admin}"}
    def call(method, path, **kw):
        return httpx.request(method, server.url + path, headers={**headers, **kw.pop("h", {})},
                             **kw)
    r = call("POST", "/v1/memories", content=b"{not json", h={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = call("POST", "/v1/memories", json={"messages": "hi", "colour": "blue"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    r = call("POST", "/v1/memories", content=b"x" * 3_000_000,
             h={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    def chunks():  # no Content-Length: the body arrives chunked, 2.6 MB against 2 MB
        for _ in range(26):
            yield b"x" * 100_000

    r = call("POST", "/v1/memories", content=chunks(), h={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert "content-length" not in {k.lower() for k in r.request.headers}
    r = call("POST", "/v1/search", content=iter([b'{"query": ', b'"small", "top_k": 1}']),
             h={"Content-Type": "application/json"})
    assert r.status_code == 200  # a small chunked body is read as it is
    r = call("POST", "/v1/search", json={"query": "x", "cube": "no-such-cube"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = call("POST", "/v1/memories", json={"messages": "   "})
    assert r.status_code == 400 and r.json()["error"]["type"] == "EmptyContentError"
    r = call("GET", "/v1/memories/nope")
    assert r.status_code == 404
    r = httpx.get(server.url + "/v1/cubes")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    r = call("POST", "/v1/answer", json={"question": "anything?"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "llm_not_configured"
    with pytest.raises(InvalidInputError):
        Client(server.url, server.admin).add("  ")
    before = server.memory.store.conn.execute("SELECT count(*) FROM items").fetchone()[0]
    call("POST", "/v1/memories", json={"messages": [{"role": "user", "content": "ok"},
                                                    {"role": "user", "content": ""}]})
    after = server.memory.store.conn.execute("SELECT count(*) FROM items").fetchone()[0]
    assert before == after  # nothing half-written


def test_rate_limit(db_path, embedder):
    with Memory(db_path, embedder=embedder) as memory:
        running = RunningServer(memory, rate_limit=2.0)
        try:
            client = Client(running.url, running.key("eve"))
            with pytest.raises(RateLimitedError):
                for _ in range(20):
                    client.cubes()
            r = httpx.get(running.url + "/v1/cubes",
                          headers={"Authorization": f"Bearer {running.key('eve2')}"})
            assert r.status_code == 200  # per key: another key is not slowed
        finally:
            running.stop()


def test_open_only_on_loopback(db_path, embedder):
    with Memory(db_path, embedder=embedder) as memory:
        with pytest.raises(InvalidInputError, match="refusing to serve"):
            build(memory, host="0.0.0.0")
        running = RunningServer(memory)  # loopback, no keys: the local admin
        try:
            local = Client(running.url)
            local.add("hello from the local admin")
            assert local.search("hello")[0].item.cube == "default"
            running.key("frank")  # once a key exists, keys are required
            with pytest.raises(AuthenticationError):
                local.cubes()
        finally:
            running.stop()
        Keys(memory.store).create_key("root", role="admin")
        build(memory, host="0.0.0.0")  # with a key, a public address is fine


def test_async_client(server):
    async def scenario():
        async with AsyncClient(server.url, server.key("gina")) as m:
            await m.add("I play the cello", user_id="gina")
            return await m.search("which instrument", user_id="gina")
    hits = asyncio.run(scenario())
    assert hits[0].item.content == "I play the cello"


def test_openapi_spec(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/memories", "/v1/search", "/v1/cubes/{cube}/grants"} <= \
        set(spec["paths"]) and "/v1/answer" not in spec["paths"]  # no LLM here


def test_answer_with_an_llm(db_path, embedder):
    from fake_llm import Reply, ScriptedLLM, facts

    from memstack import OpenAIChat

    with ScriptedLLM() as fake:
        llm = OpenAIChat(base_url=fake.url, model="fake", backoff=0.01)
        with Memory(db_path, embedder=embedder, llm=llm) as memory:
            running = RunningServer(memory)
            try:
                ann = Client(running.url, running.key("ann"))
                fake.script(facts("Ann lives in Lisbon."), Reply("Lisbon"))
                added = ann.add("I live in Lisbon.", user_id="ann")
                assert [op.event for op in added.facts] == ["ADD"]
                reply = ann.answer("Where does Ann live?", user_id="ann")
                assert reply.text == "Lisbon" and reply.memory_ids
            finally:
                running.stop()


def test_the_server_encodes_queries_in_int8_without_changing_the_callers_embedder(db_path):
    from memstack import LocalEmbedder
    from memstack.embed.query_cache import QueryCache

    mine = LocalEmbedder()
    with Memory(db_path, embedder=mine) as memory:
        build(memory)  # queries="int8" by default
        served = memory.embedder
        assert isinstance(served, QueryCache) and mine.queries == "fp32" and mine._int8 is None
        inner = served.inner.inner  # the query cache around the batcher around the copy
        assert inner is not mine and inner.queries == "int8" and inner._int8 is not None
        query = memory.searcher.embedder.embed_query(["where does Ann live?"])[0]
        assert 0.97 < float(query @ mine.embed(["where does Ann live?"])[0]) < 0.99999
