"""Versions, history, and deletion that leaves no trace in the database or index files."""

from pathlib import Path

import pytest

from memstack import ItemNotFoundError, Memory

SECRET = "Zorblax7 quokka passphrase"


def test_update_writes_versions_and_history_has_reasons(mem):
    item = mem.add("Ann lives in Paris", user_id="ann", kind="fact").items[0]
    mem.update(item.id, "Ann lives in Berlin", reason="moved")
    mem.update(item.id, "Ann lives in Berlin, Kreuzberg", reason="more precise")
    history = mem.history(item.id)
    assert [(v.version, v.reason) for v in history] == [(1, "add"), (2, "moved"),
                                                        (3, "more precise")]
    assert history[0].content == "Ann lives in Paris"
    assert all(a.changed_at <= b.changed_at for a, b in zip(history, history[1:]))
    assert mem.get(item.id).version == 3
    top = mem.search("Kreuzberg", user_id="ann")[0]
    assert top.item.id == item.id and top.item.content.endswith("Kreuzberg")
    assert all(h.item.content != "Ann lives in Paris" for h in mem.search("Paris", user_id="ann"))


def _files(db: Path) -> list[Path]:
    return [p for p in db.parent.rglob("*") if p.is_file()]


def _raw(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in _files(db))


def test_delete_leaves_no_trace_in_any_file(db_path, embedder):
    with Memory(db_path, embedder=embedder) as mem:
        for n in range(30):
            mem.add(f"filler memory number {n} about gardening", user_id="ann")
        secret = mem.add(f"My bank {SECRET} is written here", user_id="ann").items[0]
        mem.update(secret.id, f"My bank {SECRET} is written here, twice")
        vector = mem.store.conn.execute(
            "SELECT k.vec FROM keys k JOIN items i ON i.rowid = k.item_rowid WHERE i.id = ?",
            (secret.id,)).fetchone()[0]
        assert mem.search(SECRET, user_id="ann")[0].item.id == secret.id  # loads the index
        mem.flush()
        assert b"Zorblax7" in _raw(db_path)
        assert any(vector in p.read_bytes() for p in _files(db_path) if p.suffix == ".hnsw")
        mem.delete(secret.id, reason="user asked")
        raw = _raw(db_path)
        for token in (b"Zorblax7", b"zorblax7", b"quokka", b"passphrase"):
            assert token not in raw, token
        assert vector not in raw  # nor the float32 embedding, in the db or the index file
        with pytest.raises(ItemNotFoundError, match="deleted"):
            mem.get(secret.id)
        assert all(h.item.id != secret.id for h in mem.search(SECRET, user_id="ann", top_k=100))
        assert secret.id not in {i.id for i in mem.get_all(user_id="ann", limit=1000)}
        history = mem.history(secret.id)
        assert history[-1].status == "deleted" and history[-1].reason == "user asked"
        assert all(v.content is None for v in history)  # tombstone: times and reasons, no text
    with Memory(db_path, embedder=embedder) as mem:  # and not after reopening either
        assert all(h.item.id != secret.id for h in mem.search("quokka", user_id="ann", top_k=100))
    assert b"quokka" not in _raw(db_path)


def test_delete_session_deletes_its_turns(mem):
    result = mem.add(["first turn about kayaks", "second turn about canoes"], user_id="ann",
                     session_id="s1")
    mem.delete(result.session.id)
    assert mem.get_all(user_id="ann") == []
    assert mem.search("kayaks canoes", user_id="ann") == []


def test_delete_all_by_scope_and_reset(mem):
    mem.add("ann's note on tea", user_id="ann")
    mem.add("bob's note on tea", user_id="bob")
    assert mem.delete_all(user_id="ann") == 2
    assert [h.item.user_id for h in mem.search("note on tea")] == ["bob"]
    mem.reset()
    assert mem.get_all() == [] and mem.search("tea") == []
    actions = [e.action for e in mem.audit_log()]
    assert actions[-1] == "reset" and "delete_all" in actions


def test_audit_log_is_append_only(mem):
    item = mem.add("remember the milk", user_id="ann").items[0]
    mem.update(item.id, "remember the oat milk")
    mem.delete(item.id)
    log = mem.audit_log()
    assert [e.action for e in log] == ["add", "update", "delete"]
    assert all(e.actor.startswith("local:") and item.id in e.item_ids for e in log)
    conn = mem.store.conn
    for sql in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
        with pytest.raises(Exception, match="append-only"):
            conn.execute(sql)
    assert len(mem.audit_log()) == 3
    assert b"oat milk" not in b"".join(str(e.to_dict()).encode() for e in log)


def test_vectors_of_deleted_items_are_not_in_the_index(mem):
    items = mem.add([f"note {n} on topic {n}" for n in range(5)], user_id="ann").items
    mem.search("note", user_id="ann")  # load the index, so the delete updates it in place
    doomed = {r[0] for r in mem.store.conn.execute(
        "SELECT k.rowid FROM keys k JOIN items i ON i.rowid = k.item_rowid WHERE i.id = ?",
        (items[2].id,))}
    mem.delete(items[2].id)
    assert doomed and not doomed & mem.store.live_keys(1)
    if hasattr(mem.store, "indexes"):  # SQLite: the HNSW index file beside the database
        index = mem.store.indexes.get(1)
        assert not doomed & index.keys
        assert index.keys == mem.store.live_keys(1) and len(index) == 4 + 1  # turns + session
    else:  # Postgres: vectors are rows of keys, and its HNSW index follows the table
        assert len(mem.store.live_keys(1)) == 4 + 1


@pytest.mark.parametrize("context_vectors", [False, True])
def test_neighbours_context_keys_forget_a_deleted_or_edited_turn(db_path, embedder,
                                                                 context_vectors):
    """A turn is also indexed with its neighbours; deleting or editing it must rebuild theirs."""
    with Memory(db_path, embedder=embedder, context_vectors=context_vectors) as mem:
        turns = mem.add([{"role": "user", "name": "Ann", "content": "What should I cook tonight?"},
                         {"role": "assistant", "content": f"Try the {SECRET} stew."},
                         {"role": "user", "name": "Ann", "content": "Sounds good, thanks!"}],
                        user_id="ann", session_id="s1").items
        mem.search("cook", user_id="ann")
        # the reply "Sounds good" is found through its neighbour's words (context key)
        assert turns[2].id in [h.item.id for h in mem.search("quokka stew", user_id="ann")]
        mem.update(turns[1].id, "Try the lentil soup.")
        assert b"quokka" not in b"".join(
            [bytes(r[0], "utf-8") for r in mem.store.conn.execute(
                "SELECT content FROM items WHERE status = 'active'")])
        hits = mem.search("quokka stew", user_id="ann", top_k=10)
        assert all("quokka" not in (h.item.content or "").lower() for h in hits)
        assert mem.search("lentil soup", user_id="ann")[0].item.id == turns[1].id
        mem.delete(turns[1].id)
        mem.add(f"unrelated {SECRET} note", user_id="bob")
        mem.delete_all(user_id="bob")
    raw = _raw(db_path)
    assert b"lentil" not in raw and b"quokka" not in raw
    with Memory(db_path, embedder=embedder, context_vectors=context_vectors) as mem:
        keys = mem.store.conn.execute("SELECT count(*) FROM keys").fetchone()[0]
        assert keys == 1 + 2 + 2  # session header; two turns with body and context keys
        cube = mem.store.cube("default")
        assert len(mem.store.indexes.get(cube.id).keys) == (5 if context_vectors else 3)
        assert [h.item.id for h in mem.search("cook tonight", user_id="ann")][0] == turns[0].id
