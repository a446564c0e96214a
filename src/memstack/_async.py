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
