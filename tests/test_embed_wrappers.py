"""The server's embedder wrappers: BatchingEmbedder shares forward passes between threads and keeps
queries apart (their own encoding), QueryCache answers a repeated query without the model, and
Memory.use_embedder puts a wrapper where searches and adds use it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from memstack import Memory
from memstack._errors import InvalidInputError
from memstack.embed.batching import BatchingEmbedder
from memstack.embed.query_cache import QueryCache


class Counting:
    """A deterministic embedder that counts its calls; queries are encoded differently."""

    name, dim = "counting", 8

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def _vectors(self, texts: list[str], salt: int) -> np.ndarray:
        out = np.stack([np.random.default_rng(abs(hash((t, salt))) % 2**32).random(self.dim)
                        for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            self.calls.append(("embed", len(texts)))
        return self._vectors(texts, 0)

    def embed_query(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            self.calls.append(("query", len(texts)))
        return self._vectors(texts, 1)


def test_batching_keeps_queries_and_texts_apart_and_returns_each_callers_vectors():
    inner = Counting()
    batching = BatchingEmbedder(inner)
    seen: list[int] = []
    batching.observer = lambda n, seconds: seen.append(n)
    results: dict[str, np.ndarray] = {}

    def call(n: int) -> None:
        text = f"text {n}"
        results[f"q{n}"] = batching.embed_query([text])[0]
        results[f"t{n}"] = batching.embed([text])[0]

    threads = [threading.Thread(target=call, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(12):
        assert np.allclose(results[f"q{n}"], inner.embed_query([f"text {n}"])[0])
        assert np.allclose(results[f"t{n}"], inner.embed([f"text {n}"])[0])
    assert sum(seen) == 24 and batching.depth == 0


def test_query_cache_answers_repeats_without_the_model_and_evicts_the_oldest():
    inner = Counting()
    cache = QueryCache(inner, size=2)
    first = cache.embed_query(["where is  Ann?"])
    again = cache.embed_query([" where is Ann? "])  # the same query, other whitespace
    assert np.array_equal(first, again) and inner.calls == [("query", 1)]
    assert (cache.hits, cache.misses) == (1, 1)
    cache.embed_query(["b"]), cache.embed_query(["c"])  # "where is Ann?" is evicted
    cache.embed_query(["where is Ann?"])
    assert cache.misses == 4
    cache.embed(["stored text"]), cache.embed(["stored text"])  # never cached
    assert inner.calls.count(("embed", 1)) == 2
    assert cache.name == inner.name and cache.dim == inner.dim
    with pytest.raises(ValueError):
        QueryCache(inner, size=0)


def test_use_embedder_reaches_searches_and_adds(db_path, embedder):
    with Memory(db_path, embedder=embedder) as memory:
        memory.add([{"role": "user", "content": "I moved to Lisbon in May."}], user_id="ann")
        cache = QueryCache(BatchingEmbedder(embedder))
        memory.use_embedder(cache)
        for _ in range(3):
            hits = memory.search("where did Ann move?", user_id="ann")
        assert hits and "Lisbon" in hits[0].item.content
        assert cache.hits >= 2 and cache.misses >= 1
        memory.add([{"role": "user", "content": "And to Porto in June."}], user_id="ann")
        assert "Porto" in memory.search("Porto", user_id="ann")[0].item.content
        with pytest.raises(InvalidInputError, match="is not"):
            memory.use_embedder(Counting())


def _recording(memory: Memory) -> dict[int, str]:
    """Context keys as written last, item rowid -> text (FTS5 here keeps no text to read)."""
    written: dict[int, str] = {}
    insert = memory.store.insert_keys

    def recorded(rows):
        rows = list(rows)
        for rowid, texts, roles, _ in rows:
            written.update({rowid: t for t, r in zip(texts, roles) if r == "context"})
        return insert(rows)

    memory.store.insert_keys = recorded
    return written


def _by_content(memory: Memory, written: dict[int, str]) -> dict[str, str]:
    items = memory.store.items_by_rowid(list(written))
    return {items[rowid].content: text for rowid, text in written.items()}


def test_turns_added_one_by_one_get_the_context_keys_of_one_add(tmp_path, embedder):
    """An add to a session reads only the new turns' windows: the keys come out as when the
    whole session is written at once."""
    turns = [{"role": "user" if n % 2 else "assistant", "content": f"turn {n} about topic {n % 5}"}
             for n in range(30)]
    with Memory(tmp_path / "one.db", embedder=embedder) as memory:
        written = _recording(memory)
        memory.add(turns, user_id="ann", session_id="s")
        at_once = _by_content(memory, written)
    with Memory(tmp_path / "many.db", embedder=embedder) as memory:
        written = _recording(memory)
        for turn in turns:
            memory.add([turn], user_id="ann", session_id="s")
        one_by_one = _by_content(memory, written)
    assert len(at_once) == 30 and at_once == one_by_one
