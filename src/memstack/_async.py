"""AsyncMemory: Memory's methods, awaitable. The logic is Memory's, run in a worker thread."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

from ._memory import Memory


class AsyncMemory:
    """The same methods as Memory, awaitable. Calls run Memory's code in a worker thread.

    >>> async with AsyncMemory("memory.db") as m:
    ...     await m.add("I like green tea", user_id="ann")
    """

    def __init__(self, path: str | Path = "memstack.db", **kwargs: Any) -> None:
        self.sync = Memory(path, **kwargs)

    async def __aenter__(self) -> "AsyncMemory":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.sync, name)
        if name.startswith("_") or not callable(method):
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await asyncio.to_thread(method, *args, **kwargs)
            return list(result) if isinstance(result, Iterator) else result

        call.__name__ = name
        call.__doc__ = method.__doc__
        return call

    async def generate(self, query: str, **kwargs: Any) -> Any:
        """Memory.generate, awaitable. With stream=True, an async iterator of text pieces (each
        decoded in the worker thread) whose `.result` is the Generation once it is exhausted."""
        result = await asyncio.to_thread(self.sync.generate, query, **kwargs)
        return AsyncStream(result) if kwargs.get("stream") else result


class AsyncStream:
    """A generation's text pieces for `async for`; `result` once exhausted."""

    def __init__(self, stream: Any) -> None:
        self._stream, self._pieces = stream, iter(stream)
        self.result = None

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> str:
        piece = await asyncio.to_thread(next, self._pieces, None)
        if piece is None:
            self.result = self._stream.result
            raise StopAsyncIteration
        return piece
