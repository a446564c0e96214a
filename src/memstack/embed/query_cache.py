"""A cache of search queries' vectors, for a server: people and agents repeat their questions
(a dashboard's saved searches, an agent asking the same thing each turn), and the query encoder
is a large part of a search's CPU time (docs/server.md, "Throughput"). One cache per wrapped
embedder (so per model), keyed by the query with its whitespace collapsed; least recently used
out first. Texts that are stored (adds)
are never cached: they are new by nature."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .base import Embedder, embed_query


class QueryCache:
    """Wraps an embedder: `embed` passes through, `embed_query` is cached (up to `size`
    vectors, about 1.5 KB each at 384 dimensions). Same name and dimension as the inner one."""

    def __init__(self, inner: Embedder, *, size: int = 4096) -> None:
        if size < 1:
            raise ValueError("the query cache holds at least one vector")
        self.inner, self.size, self.name = inner, size, inner.name
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def dim(self) -> int:
        return self.inner.dim

    def __getattr__(self, name: str):  # depth, observer... of the wrapped embedder
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.inner.embed(texts)

    def embed_query(self, texts: list[str]) -> np.ndarray:
        return np.stack([self._one(text) for text in texts]) if texts else \
            np.zeros((0, self.dim), np.float32)

    def _one(self, text: str) -> np.ndarray:
        key = " ".join(text.split())
        with self._lock:
            vector = self._vectors.get(key)
            if vector is not None:
                self._vectors.move_to_end(key)
                self.hits += 1
                return vector
            self.misses += 1
        # a copy: the inner embedder's row may be a view that keeps its whole batch alive
        vector = np.array(embed_query(self.inner, text), dtype=np.float32)
        vector.setflags(write=False)  # shared by every search that asks the same
        with self._lock:
            self._vectors[key] = vector
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)
        return vector
