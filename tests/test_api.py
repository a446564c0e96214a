"""The mem0-compatible surface and AsyncMemory (same logic, awaited)."""

import asyncio

import pytest

from memstack import AsyncMemory, ItemNotFoundError


def test_mem0_names_work(mem):
    added = mem.add([{"role": "user", "content": "I love sushi"}], user_id="alice",
                    run_id="r1", metadata={"category": "food"}, infer=False)
    assert added.to_dict()["results"][0]["memory"] == "I love sushi"
    memory_id = added.ids[0]
    hits = mem.search("what food does alice like", user_id="alice", limit=3)
    assert hits[0].item.id == memory_id and hits[0].to_dict()["memory"] == "I love sushi"
    assert mem.get(memory_id).session_id == "r1"
    assert [i.id for i in mem.get_all(user_id="alice", run_id="r1", kinds=["turn"])] == [memory_id]
    mem.update(memory_id, data="I love sushi and ramen")
    assert [v.content for v in mem.history(memory_id)][-1] == "I love sushi and ramen"
    mem.delete(memory_id=memory_id)
    with pytest.raises(ItemNotFoundError):
        mem.get(memory_id)
    mem.add("another", agent_id="helper")
    assert mem.delete_all(agent_id="helper") == 2
    mem.reset()
    assert mem.get_all() == []


def test_get_all_paginates_and_counts_access(mem):
    ids = mem.add([f"note {n}" for n in range(7)], user_id="ann").ids
    page1 = mem.get_all(user_id="ann", kinds=["turn"], limit=4)
    page2 = mem.get_all(user_id="ann", kinds=["turn"], limit=4, offset=4)
    assert [i.id for i in page1 + page2] == ids
    mem.get(ids[0])
    mem.search("note 0", user_id="ann", top_k=1)
    item = mem.get(ids[0])
    assert item.access_count >= 2 and item.last_accessed is not None


def test_async_memory_has_the_same_methods(db_path, embedder):
    async def scenario():
        async with AsyncMemory(db_path, embedder=embedder) as mem:
            added = await mem.add("I keep bees on the roof", user_id="ann")
            hits = await mem.search("bees", user_id="ann")
            await mem.update(added.ids[0], "I keep two hives of bees on the roof")
            history = await mem.history(added.ids[0])
            exported = await mem.export()
            both = await asyncio.gather(mem.search("hives", user_id="ann"),
                                        mem.get(added.ids[0]))
            await mem.delete(added.ids[0])
            return hits, history, exported, both

    hits, history, exported, both = asyncio.run(scenario())
    assert hits[0].item.content == "I keep bees on the roof"
    assert len(history) == 2 and len(exported) == 2
    assert both[0][0].item.id == both[1].id
