"""MCP with the official SDK's client: the tools over streamable HTTP (at /mcp, with the same API
keys and grants as REST) and over stdio (`memstack mcp`)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import httpx2
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client


def payload(result):
    """A tool's answer as data (structured content when the server sends it, else its text)."""
    assert not result.is_error, result.content
    if result.structured_content is not None:
        data = result.structured_content
        return data.get("result", data) if set(data) == {"result"} else data
    return json.loads(result.content[0].text)


async def http_session(url: str, token: str, steps):
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                  timeout=60) as http:
        async with streamable_http_client(f"{url}/mcp/", http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await steps(session)


def test_mcp_over_streamable_http(server):
    ann, bob = server.key("ann"), server.key("bob")

    async def as_ann(session):
        tools = {t.name for t in (await session.list_tools()).tools}
        added = payload(await session.call_tool("add_memory", {
            "text": "I keep bees in my garden", "user_id": "ann", "speaker": "Ann"}))
        memory_id = added["results"][0]["id"]
        hits = payload(await session.call_tool("search_memories", {"query": "bees"}))
        got = payload(await session.call_tool("get_memory", {"memory_id": memory_id}))
        listed = payload(await session.call_tool("list_memories", {}))
        return tools, memory_id, hits, got, listed

    tools, memory_id, hits, got, listed = asyncio.run(http_session(server.url, ann, as_ann))
    assert {"add_memory", "search_memories", "get_memory", "list_memories",
            "delete_memory"} <= tools and "answer_question" not in tools  # no LLM here
    assert hits[0]["id"] == memory_id and got["speaker"] == "Ann"
    assert memory_id in {row["id"] for row in listed}

    async def as_bob(session):  # another user's memory is not there for bob
        result = await session.call_tool("get_memory", {"memory_id": memory_id})
        search = await session.call_tool("search_memories", {"query": "bees", "cube": "~ann"})
        return result, search

    result, search = asyncio.run(http_session(server.url, bob, as_bob))
    assert result.is_error and "no memory" in result.content[0].text
    assert search.is_error and "no read access" in search.content[0].text

    async def delete(session):
        return payload(await session.call_tool("delete_memory", {"memory_id": memory_id}))

    assert asyncio.run(http_session(server.url, ann, delete))["items_deleted"] >= 1


def test_mcp_without_a_key_is_refused(server):
    async def steps(session):
        return await session.call_tool("list_memories", {})

    result = asyncio.run(http_session(server.url, "msk_bad_key", steps))
    assert result.is_error and "unknown or revoked" in result.content[0].text


def test_mcp_over_stdio(db_path, embedder):
    from memstack import Memory
    from memstack.server.auth import Keys

    with Memory(db_path, embedder=embedder) as memory:
        token = Keys(memory.store).create_key("ann").token
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "memstack", "--db", str(db_path), "mcp"],
        env={**os.environ, "MEMSTACK_API_KEY": token, "HF_HUB_OFFLINE": "1"})

    async def steps():
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await session.call_tool("add_memory", {"text": "My bike is blue",
                                                       "user_id": "ann"})
                return payload(await session.call_tool("search_memories",
                                                       {"query": "bike colour"}))

    hits = asyncio.run(steps())
    assert hits[0]["content"] == "My bike is blue"


def test_mcp_feedback_is_walled(server):
    """give_feedback (issue 18): on your own memory it is stored and moves your searches; on
    another user's memory it is 'no memory', as get_memory is."""
    ann, bob = server.key("ann"), server.key("bob")

    async def as_ann(session):
        added = payload(await session.call_tool("add_memory", {
            "text": "My sister lives in Porto", "user_id": "ann"}))
        memory_id = added["results"][0]["id"]
        given = payload(await session.call_tool("give_feedback", {
            "target": memory_id, "signal": "negative", "query": "where does my sister live",
            "user_id": "ann"}))
        bad = await session.call_tool("give_feedback", {"target": memory_id, "signal": "meh"})
        return memory_id, given, bad

    memory_id, given, bad = asyncio.run(http_session(server.url, ann, as_ann))
    assert given["item_ids"] == [memory_id] and given["query"] == "where does my sister live"
    assert bad.is_error
    assert server.memory.get(given["id"]).kind == "feedback"

    async def as_bob(session):
        return await session.call_tool("give_feedback", {"target": memory_id,
                                                         "signal": "positive"})

    refused = asyncio.run(http_session(server.url, bob, as_bob))
    assert refused.is_error and "no memory" in refused.content[0].text
    assert len(server.memory.get_all(kinds=["feedback"], cube="~ann")) == 1
