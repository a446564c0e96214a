"""The store as the source of truth: schema versions, damage, index repair, embedders, threads."""

import gc
import json
import sqlite3
import threading
import time

import numpy as np
import pytest

from memstack import (EmbeddingMismatchError, Memory, SchemaVersionError, StoreCorruptError)
from memstack.index import HnswIndex
from memstack.store.schema import SCHEMA_VERSION


class HashEmbedder:
    """A second, tiny embedder (bag of hashed words) to show that models are never mixed."""

    def __init__(self, dim: int = 64) -> None:
        self.name, self._dim = f"test-hash-{dim}", dim

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts):
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, hash(word) % self._dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_newer_schema_is_refused(db_path, embedder):
    Memory(db_path, embedder=embedder).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaVersionError, match="Upgrade memstack"):
        Memory(db_path, embedder=embedder)


def test_a_version_1_database_is_migrated(db_path, embedder):
    """A database of schema 1 (versions without superseded_by and source_ids) opens, migrates
    in place, and keeps its items and history."""
    from memstack.store.sqlite import _driver

    with Memory(db_path, embedder=embedder) as mem:
        item = mem.add("I keep bees", user_id="ann").items[0]
        mem.update(item.id, "I keep two hives of bees")
    conn = _driver().connect(str(db_path), isolation_level=None)
    conn.execute("ALTER TABLE versions DROP COLUMN superseded_by")  # back to schema 1
    conn.execute("ALTER TABLE versions DROP COLUMN source_ids")
    conn.execute("DROP INDEX items_derived")
    for table in ("grants", "api_keys", "users", "kv_blocks", "shards", "repairs"):  # 3 to 6
        conn.execute(f"DROP TABLE {table}")
    conn.execute("ALTER TABLE audit DROP COLUMN prev")  # 9: the audit chain
    conn.execute("ALTER TABLE audit DROP COLUMN hash")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Memory(db_path, embedder=embedder) as mem:
        versions = mem.history(item.id)
        assert [v.content for v in versions] == ["I keep bees", "I keep two hives of bees"]
        assert versions[0].source_ids == [] and versions[0].superseded_by is None
        assert mem.search("bees", user_id="ann")[0].item.id == item.id
        version = mem.store.conn.execute("PRAGMA user_version").fetchone()[0]
        assert version == SCHEMA_VERSION
        mem.add("a write after the migration", user_id="ann")  # chains onto the old entries
        assert mem.verify_audit().ok and mem.audit_log()[-1].hash


def test_foreign_and_garbage_files_are_refused(tmp_path, embedder):
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StoreCorruptError, match="not a memstack"):
        Memory(other, embedder=embedder)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreCorruptError):
        Memory(junk, embedder=embedder)


def _index_state(mem):
    cube = mem.store.cube("default")
    return mem.store.indexes.get(cube.id).keys, mem.store.live_keys(cube.id)


def test_damaged_index_is_rebuilt_from_the_store(db_path, embedder):
    with Memory(db_path, embedder=embedder) as mem:
        ids = mem.add([f"memory {n} about the sea" for n in range(20)], user_id="ann").ids
        mem.search("sea", user_id="ann")
    index_file = next(db_path.parent.glob("*.vec/*.hnsw"))
    index_file.write_bytes(b"garbage" * 10)
    with Memory(db_path, embedder=embedder) as mem:
        index_keys, store_keys = _index_state(mem)
        assert index_keys == store_keys and len(store_keys) == 21  # 20 turns + the session header
        assert mem.search("memory 7 about the sea", user_id="ann")[0].item.id == ids[7]


def test_stale_index_catches_up_and_a_missing_one_is_built(db_path, embedder):
    with Memory(db_path, embedder=embedder) as mem:
        mem.add("first memory about apples", user_id="ann")
        mem.search("apples", user_id="ann")
    # a second writer that never loads the index (as a process killed before saving would)
    writer = Memory(db_path, embedder=embedder)
    late = writer.add("second memory about pears", user_id="ann").items[0]
    writer.store.close()
    with Memory(db_path, embedder=embedder) as mem:
        index_keys, store_keys = _index_state(mem)
        assert index_keys == store_keys
        assert mem.search("pears", user_id="ann")[0].item.id == late.id
    for path in db_path.parent.glob("*.vec/*"):
        path.unlink()
    with Memory(db_path, embedder=embedder) as mem:
        assert _index_state(mem)[0] == _index_state(mem)[1]


def test_two_open_memories_see_each_others_writes(db_path, embedder):
    a, b = Memory(db_path, embedder=embedder), Memory(db_path, embedder=embedder)
    a.add("alpha note about lanterns", user_id="ann")
    assert b.search("lanterns", user_id="ann")[0].item.content == "alpha note about lanterns"
    b.add("beta note about lanterns and kites", user_id="ann")
    assert {h.item.content for h in a.search("kites lanterns", user_id="ann")} >= {
        "beta note about lanterns and kites"}
    a.close()
    b.close()


def test_mixing_embedders_is_refused_and_reembed_converts(db_path, embedder):
    with Memory(db_path, embedder=embedder) as mem:
        item = mem.add("the blue bicycle is in the garage", user_id="ann").items[0]
    other = HashEmbedder()
    with Memory(db_path, embedder=other) as mem:
        with pytest.raises(EmbeddingMismatchError, match="memstack --cube default reembed"):
            mem.search("bicycle", user_id="ann")
        with pytest.raises(EmbeddingMismatchError):
            mem.add("more", user_id="ann")
        assert mem.reembed() == 2  # the turn and its session header
        assert mem.search("blue bicycle garage", user_id="ann")[0].item.id == item.id
        assert mem.cubes()[0].embed_model == "test-hash-64"
    with Memory(db_path, embedder=embedder) as mem:
        with pytest.raises(EmbeddingMismatchError):
            mem.search("bicycle", user_id="ann")


def test_reembed_keys_every_item_as_an_add_does(db_path):
    """reembed (and migrate, which shares `stored_keys`) rebuild a session's key from its header
    as the add wrote it: with the same model, every vector comes out as it was."""
    model = HashEmbedder()
    with Memory(db_path, embedder=model) as mem:
        added = mem.add([{"role": "user", "content": "We met at the harbour on Friday"}],
                        user_id="ann", session_id="s1", observed_at="2024-05-03")
        rowids = [mem.store.item_by_id(i.id)[0] for i in [*added.items, added.session]]
        before = [sorted(map(tuple, (v for _, v in mem.store.key_vectors(r)))) for r in rowids]
        mem.reembed()
        after = [sorted(map(tuple, (v for _, v in mem.store.key_vectors(r)))) for r in rowids]
    assert np.allclose(np.array(before[1]), np.array(after[1]))  # the session's header
    assert np.allclose(np.array(before[0]), np.array(after[0]))


def test_concurrent_threads_share_one_memory(mem):
    errors = []

    def work(n):
        try:
            for k in range(5):
                mem.add(f"thread {n} note {k}", user_id=f"u{n}")
                mem.search(f"note {k}", user_id=f"u{n}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for n in range(4):
        assert len(mem.get_all(user_id=f"u{n}", kinds=["turn"])) == 5


def test_the_vector_index_is_saved_in_the_background_when_writes_pause(db_path, embedder,
                                                                       monkeypatch):
    from memstack.index import saver

    monkeypatch.setattr(saver, "AUTOSAVE_SECONDS", 0.0)
    monkeypatch.setattr(saver, "QUIET_SECONDS", 0.2)
    mem = Memory(db_path, embedder=embedder)
    mem.add("first memory about apples", user_id="ann")
    mem.search("apples", user_id="ann")  # loads the index
    saves = []
    original = HnswIndex.save
    monkeypatch.setattr(HnswIndex, "save", lambda index: (saves.append(
        threading.current_thread().name), original(index)))
    for n in range(3):
        mem.add(f"memory {n} about pears", user_id="ann")
    # never inside add() (on a busy machine the saver may already have run between two adds)
    assert threading.current_thread().name not in saves
    deadline = time.monotonic() + 10
    while not saves and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(saves) == {"memstack-index-saver"}
    index_file = next(db_path.parent.glob("*.vec/*.json"))
    assert len(json.loads(index_file.read_text())["live"]) == len(mem.store.live_keys(1))
    thread = mem.store.indexes.saver._thread
    mem.close()
    assert not thread.is_alive()


def test_an_unclosed_memory_does_not_keep_its_saver_thread(db_path, embedder, monkeypatch):
    from memstack.index import saver

    monkeypatch.setattr(saver, "QUIET_SECONDS", 0.1)
    mem = Memory(db_path, embedder=embedder)
    mem.add("a memory about figs", user_id="ann")
    mem.search("figs", user_id="ann")
    mem.add("another memory about figs", user_id="ann")
    thread = mem.store.indexes.saver._thread
    assert thread.is_alive()
    mem.store.conn.close()  # the file is released; the saver is left running
    del mem
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
