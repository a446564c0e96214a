"""Deletion receipts: each check reads the store after the purge, finds nothing of the deleted
item, and would find it had the purge missed it; copies written while it existed are named."""

from memstack.govern import receipt as receipts


def test_a_receipt_checks_every_index_and_names_the_copies(mem, tmp_path):
    kept = mem.add("Bob's bike is green", user_id="bob").items[0]
    gone = mem.add("Ann's passport number is X1234567, she lives at 5 Elm Street",
                   user_id="ann").items[0]
    mem.backup(tmp_path / "backup")
    list(mem.export(destination=str(tmp_path / "cube.jsonl")))
    receipt = mem.delete(gone.id, receipt=True)
    checked = receipt["items"][gone.id]
    assert receipt["clean"] and receipt["requested"] == [gone.id]
    assert checked["row_clean"] and checked["versions_clean"] and checked["versions_checked"] == 2
    assert checked["full_text_clean"] and checked["words_checked"] >= 6
    assert checked["vector_index_clean"] and checked["vectors_checked"] >= 1
    files = [c["file"] for c in receipt["copies_still_holding"]]
    assert files == [str((tmp_path / "backup").resolve()), str(tmp_path / "cube.jsonl")]
    assert mem.audit_log(limit=1000)[-1].action == "deletion_receipt"
    assert mem.get(kept.id).content == "Bob's bike is green"


def test_the_checks_find_an_item_the_purge_did_not_remove(mem):
    """The same checks on an item that was not deleted: each reports what it finds."""
    item = mem.add("Ann's sister lives in Porto near the river", user_id="ann").items[0]
    cube = mem.store.cube("default")
    before = receipts.capture(mem.store, cube.id, [item.id], cascade=True)
    found = receipts.check(mem.store, "default", before)
    checked = found["items"][item.id]
    assert not found["clean"]
    assert not checked["row_clean"] and not checked["versions_clean"]
    assert not checked["full_text_clean"] and not checked["vector_index_clean"]


def test_a_copy_made_before_the_item_existed_is_not_named(mem, tmp_path):
    mem.add("an older memory", user_id="ann")
    mem.backup(tmp_path / "early")
    item = mem.add("a memory added after the backup", user_id="ann").items[0]
    assert mem.delete(item.id, receipt=True)["copies_still_holding"] == []


def test_a_receipt_over_rest(server):
    import httpx

    user = {"Authorization": f"Bearer {server.key('ann')}"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        added = http.post("/v1/memories", headers=user, json={
            "messages": "Ann's bank PIN is 4321", "user_id": "ann"}).json()
        memory_id = added["results"][0]["id"]
        reply = http.delete(f"/v1/memories/{memory_id}?receipt=true", headers=user).json()
        assert reply["items_deleted"] == 1 and reply["receipt"]["clean"]
        assert reply["receipt"]["items"][memory_id]["full_text_clean"]


def test_a_receipt_for_a_session_covers_its_turns(mem):
    result = mem.add([{"role": "user", "content": "My locker combination is 12-34-56"},
                      {"role": "assistant", "content": "Noted, the locker combination"}],
                     user_id="ann", session_id="gym")
    session = result.items[0].parent_id
    receipt = mem.delete(session, receipt=True)
    assert set(receipt["deleted"]) == {session, *result.ids} and receipt["clean"]
