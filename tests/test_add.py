"""Ingestion without an LLM: turns, sessions, time, relative dates, chunking."""

from datetime import datetime, timezone

from conftest import CONVERSATION

from memstack.ingest.rules import CHUNK_CHARS


def test_string_dict_and_list_are_stored_as_turns(mem):
    assert len(mem.add("I like green tea", user_id="ann").items) == 1
    assert len(mem.add({"role": "user", "content": "I run on Sundays"}, user_id="ann").items) == 1
    result = mem.add(CONVERSATION, user_id="ann", session_id="s1")
    assert [i.kind for i in result.items] == ["turn"] * 3
    assert [i.speaker for i in result.items] == ["Ann", "assistant", "Ann"]
    assert {i.session_id for i in result.items} == {"s1"}


def test_session_item_links_its_turns_across_adds(mem):
    first = mem.add(CONVERSATION[:2], user_id="ann", session_id="s1")
    second = mem.add(CONVERSATION[2:], user_id="ann", session_id="s1")
    session = second.session
    assert session.kind == "session" and session.id == first.session.id
    assert session.metadata["turn_count"] == 3
    turns = first.items + second.items
    assert all(t.parent_id == session.id for t in turns)
    assert [t.metadata["turn_index"] for t in turns] == [0, 1, 2]
    sessions = mem.get_all(user_id="ann", kinds=["session"])
    assert [s.id for s in sessions] == [session.id]


def test_each_add_without_session_gets_its_own_session(mem):
    a = mem.add("one thing", user_id="ann")
    b = mem.add("another thing", user_id="ann")
    assert a.session.id != b.session.id and a.items[0].session_id != b.items[0].session_id


def test_time_comes_from_message_then_observed_at(mem):
    result = mem.add([{"role": "user", "content": "first", "timestamp": "2023-05-08T13:56:00Z"},
                      {"role": "user", "content": "second"}],
                     user_id="ann", observed_at="1:56 pm on 9 May, 2023")
    first, second = result.items
    assert first.observed_at == datetime(2023, 5, 8, 13, 56, tzinfo=timezone.utc)
    assert second.observed_at == datetime(2023, 5, 9, 13, 56, tzinfo=timezone.utc)
    assert first.recorded_at.year >= 2025  # recorded now, observed then


def test_relative_dates_are_resolved_against_the_turn_time(mem):
    item = mem.add("I went hiking yesterday and two weeks ago I was in Rome", user_id="ann",
                   observed_at="2023-05-08").items[0]
    resolved = {r["text"]: r["start"] for r in item.metadata["resolved_dates"]}
    assert resolved["yesterday"] == "2023-05-07"
    assert resolved["two weeks ago"] == "2023-04-24"  # the week before last, from Monday
    # the resolved date is searchable by its calendar name
    hits = mem.search("7 May 2023 hiking", user_id="ann")
    assert hits[0].item.id == item.id


def test_long_message_is_chunked_and_every_chunk_finds_the_turn(mem):
    filler = " ".join(f"Sentence {n} talks about ordinary weather and errands." for n in range(200))
    text = filler + " The secret recipe uses cardamom and smoked paprika."
    assert len(text) > 5 * CHUNK_CHARS
    item = mem.add(text, user_id="ann").items[0]
    assert item.content == text  # the turn keeps its full text
    keys = mem.store.conn.execute("SELECT k.role FROM keys k JOIN items i ON i.rowid = k.item_rowid "
                                  "WHERE i.id = ?", (item.id,)).fetchall()
    assert len(keys) > 5 and all(r[0].startswith("chunk:") for r in keys)
    hits = mem.search("cardamom paprika recipe", user_id="ann")
    assert hits[0].item.id == item.id


def test_other_kinds_are_stored_without_a_session(mem):
    fact = mem.add("Ann is allergic to peanuts", user_id="ann", kind="fact").items[0]
    assert fact.kind == "fact" and fact.parent_id is None and fact.valid_from is not None
    assert mem.search("peanut allergy", user_id="ann", kinds=["fact"])[0].item.id == fact.id


def test_metadata_is_kept_and_per_message_metadata_merges(mem):
    item = mem.add([{"role": "user", "content": "hello there", "metadata": {"turn_id": "D1:1"}}],
                   user_id="ann", metadata={"source": "chat"}).items[0]
    assert item.metadata == {"source": "chat", "turn_id": "D1:1", "turn_index": 0}
