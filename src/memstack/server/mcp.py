"""MCP tools over the same Memory and the same API keys: add, search, get, list, delete memories
(and answer, when an LLM is configured; generate_from_memory and ask_shard, when the server has
a local model). Over streamable HTTP (mounted at /mcp by `memstack serve`) the key comes in the
Authorization header of each request; over stdio (`memstack mcp`) it is the key given at start
(MEMSTACK_API_KEY), or the local admin when the database has none.
"""

import asyncio
import functools
from typing import Any

from .._errors import MemstackError, MissingExtraError
from .._memory import Memory
from . import schemas as S
from .access import Gate
from .auth import LOCAL_ADMIN, Keys, Principal
from .generation import ServedModel, parse
from .observe import note_caller

try:  # the tools' annotations name Context, so it must be a module global
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # pragma: no cover - reported when an MCP server is built
    Context = MCPServer = ToolError = None


def _reported(fn):
    """memstack's errors reach the MCP client with their message (the SDK hides others)."""
    @functools.wraps(fn)
    async def tool(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except MemstackError as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc
    return tool


def build_mcp(memory: Memory, *, stdio_key: str | None = None, allow_open: bool = True,
              served: ServedModel | None = None):
    """An MCPServer whose tools check the caller's key and grants like the REST API. With
    `served` (the server's local model), the tools generate_from_memory and ask_shard too."""
    if MCPServer is None:
        raise MissingExtraError("MCP needs the mcp package: pip install 'memstack[server]'")
    keys = Keys(memory.store)
    gate = Gate(memory, keys)
    server = MCPServer("memstack", instructions="Long-term memory: add what should be "
                       "remembered, search it, answer from it.")

    async def caller(ctx: Context) -> Principal:
        """The caller, with the database told which cubes this call may see (PostgreSQL's
        row-level security, the second wall, as for REST requests)."""
        who = note_caller(await run(verify, ctx))  # for the request's log line
        memory.store.wall(await run(keys.visible_cubes, who))
        return who

    def verify(ctx: Context) -> Principal:
        headers = ctx.headers
        if headers is None:  # stdio: the key given at start
            if stdio_key is None and allow_open and not keys.any_key():
                return LOCAL_ADMIN
            return keys.verify(stdio_key)
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token is None and allow_open and not keys.any_key():
            return LOCAL_ADMIN
        return keys.verify(token)

    async def run(fn, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    @server.tool()
    @_reported
    async def add_memory(text: str, ctx: Context, cube: str | None = None,
                         user_id: str | None = None, session_id: str | None = None,
                         speaker: str | None = None, ttl: str | None = None,
                         expires_at: str | None = None) -> dict:
        """Remember a message (and, with an LLM, the facts in it). `ttl` ("30d", "12h",
        seconds) or `expires_at` (ISO 8601): it leaves search then."""
        who = await caller(ctx)
        message = {"role": "user", "content": text, **({"name": speaker} if speaker else {})}

        def add() -> Any:  # one thread: a cube created here widens this context's wall
            row = gate.cube(who, cube, "write", create=True)
            return memory.add(message, cube=row.name, user_id=user_id, session_id=session_id,
                              ttl=ttl, expires_at=expires_at)

        return (await run(add)).to_dict()

    @server.tool()
    @_reported
    async def search_memories(query: str, ctx: Context, cube: str | None = None,
                              user_id: str | None = None, top_k: int = 10) -> list[dict]:
        """Hybrid search of memories; returns the best hits with their scores."""
        who = await caller(ctx)
        row = await run(gate.cube, who, cube, "read")
        hits = await run(memory.search, query, cube=row.name, user_id=user_id, top_k=top_k)
        return [{"id": h.item.id, "score": h.score, "content": h.item.content,
                 "kind": h.item.kind, "speaker": h.item.speaker,
                 "observed_at": h.item.to_dict()["observed_at"]} for h in hits]

    @server.tool()
    @_reported
    async def get_memory(memory_id: str, ctx: Context) -> dict:
        """One memory with its metadata and provenance."""
        item = await run(gate.item, await caller(ctx), memory_id)
        return item.to_dict()

    @server.tool()
    @_reported
    async def list_memories(ctx: Context, cube: str | None = None, user_id: str | None = None,
                            limit: int = 50, offset: int = 0) -> list[dict]:
        """Memories of a cube, oldest first."""
        row = await run(gate.cube, await caller(ctx), cube, "read")
        items = await run(memory.get_all, cube=row.name, user_id=user_id, limit=limit,
                          offset=offset)
        return [i.to_dict() for i in items]

    @server.tool()
    @_reported
    async def delete_memory(memory_id: str, ctx: Context) -> dict:
        """Delete a memory everywhere (and the facts derived from it)."""
        await run(gate.item, await caller(ctx), memory_id, "write")
        count = await run(memory.delete, memory_id)
        return {"deleted": memory_id, "items_deleted": count}

    @server.tool()
    @_reported
    async def give_feedback(target: str, signal: str, ctx: Context, query: str | None = None,
                            correction: str | None = None, user_id: str | None = None) -> dict:
        """Say whether a memory (its id), or the memories of an answer or generation (its id),
        helped: signal "positive" or "negative", with the query it was a hit for. Later
        searches of yours for similar queries rank it up or down; `correction` (text) is kept
        as a memory ranked ahead of the corrected one. Returns the feedback's id (delete it to
        undo)."""
        who = await caller(ctx)
        body = parse(S.FeedbackRequest, target=target, signal=signal, query=query,
                     correction=correction, user_id=user_id)

        def give() -> Any:
            if memory.store.item_by_id(body.target) is not None:
                gate.item(who, body.target)
            return memory.feedback(body.target, body.signal, query=body.query,
                                   correction=body.correction, user_id=body.user_id,
                                   cube_ids=gate.keys.visible_cubes(who),
                                   check=lambda row: gate.keys.require(who, row, "write"))

        return (await run(give)).to_dict()

    if memory.llm is not None:
        @server.tool()
        @_reported
        async def answer_question(question: str, ctx: Context, cube: str | None = None,
                                  user_id: str | None = None) -> dict:
            """Answer a question from memory with the configured LLM."""
            row = await run(gate.cube, await caller(ctx), cube, "read")
            reply = await run(memory.answer, question, cube=row.name, user_id=user_id)
            return {"id": reply.id, "text": reply.text, "memory_ids": reply.memory_ids}

    if served is not None:
        _tier_tools(server, served, caller, run)
    return server


def _tier_tools(server: Any, served: ServedModel, caller: Any, run: Any) -> None:
    """The tools of /v1/generate and /v1/ask, with the same checks and limits."""
    @server.tool()
    @_reported
    async def generate_from_memory(query: str, ctx: Context, cube: str | list[str] | None = None,
                                   user_id: str | None = None, agent_id: str | None = None,
                                   session_id: str | None = None, top_k: int = 10,
                                   max_new_tokens: int = 128, temperature: float = 0.0,
                                   seed: int = 0, use_cache: bool = True) -> dict:
        """Answer with the server's local model from your memories (KV blocks of hot ones
        first): the text, the memory ids and KV blocks used, and timings. temperature 0
        decodes greedily; use_cache false reads every memory as text."""
        body = parse(S.GenerateRequest, query=query, cube=cube, user_id=user_id,
                     agent_id=agent_id, session_id=session_id, top_k=top_k,
                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                     use_cache=use_cache, stream=False)
        return await run(served.generate, await caller(ctx), body)

    @server.tool()
    @_reported
    async def ask_shard(question: str, ctx: Context, shard: str = "auto",
                        cube: str | list[str] | None = None, user_id: str | None = None,
                        agent_id: str | None = None, max_new_tokens: int = 64) -> dict:
        """Answer from a LoRA shard's weights alone (no retrieval); "auto" routes the question
        to the shard of your cubes that holds most of its best search hits."""
        body = parse(S.AskRequest, question=question, shard=shard, cube=cube, user_id=user_id,
                     agent_id=agent_id, max_new_tokens=max_new_tokens)
        return await run(served.ask, await caller(ctx), body)
