"""Bad input gets a specific MemstackError with advice, and nothing is half-written."""

import pytest

from memstack import (ContentTooLargeError, EmptyContentError, InvalidDateError,
                      InvalidEncodingError, InvalidFilterError, InvalidInputError,
                      InvalidLimitError, InvalidQueryError, ItemNotFoundError, MemstackError,
                      UnknownKindError)


def _counts(mem):
    conn = mem.store.conn
    return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                 for t in ("items", "keys", "versions", "audit"))


@pytest.mark.parametrize("messages, error", [
    ("", EmptyContentError),
    ("   \n\t ", EmptyContentError),
    ([{"role": "user", "content": "fine"}, {"role": "user", "content": "  "}], EmptyContentError),
    (b"\xff\xfe not utf-8", InvalidEncodingError),
    ("lone \udc80 surrogate", InvalidEncodingError),
    ("x" * 10_000_000, ContentTooLargeError),
    ([{"role": "wizard", "content": "hi"}], InvalidInputError),
    ([{"role": "user"}], InvalidInputError),
    ([], InvalidInputError),
    (42, InvalidInputError),
    ([{"role": "user", "content": "hi", "timestamp": "the day after never"}], InvalidDateError),
])
def test_bad_messages(mem, messages, error):
    mem.add("something valid first", user_id="ann")
    before = _counts(mem)
    with pytest.raises(error) as info:
        mem.add(messages, user_id="ann")
    assert isinstance(info.value, MemstackError) and len(str(info.value)) > 20
    assert _counts(mem) == before


@pytest.mark.parametrize("kwargs, error", [
    ({"kind": "dream"}, UnknownKindError),
    ({"kind": "session"}, UnknownKindError),
    ({"observed_at": "2023-02-30"}, InvalidDateError),
    ({"observed_at": "yesterday-ish"}, InvalidDateError),
    ({"metadata": {"x": object()}}, InvalidInputError),
    ({"metadata": ["not", "a", "dict"]}, InvalidInputError),
    ({"user_id": ""}, InvalidInputError),
    ({"user_id": 7}, InvalidInputError),
])
def test_bad_add_arguments(mem, kwargs, error):
    before = _counts(mem)
    with pytest.raises(error):
        mem.add("hello", **kwargs)
    assert _counts(mem) == before


@pytest.mark.parametrize("kwargs, error", [
    ({"query": ""}, InvalidQueryError),
    ({"query": "   "}, InvalidQueryError),
    ({"query": '"*" - ()'}, InvalidQueryError),
    ({"query": "x" * 5000}, InvalidQueryError),
    ({"query": 3}, InvalidQueryError),
    ({"query": "ok", "top_k": 0}, InvalidLimitError),
    ({"query": "ok", "top_k": -5}, InvalidLimitError),
    ({"query": "ok", "top_k": 10**9}, InvalidLimitError),
    ({"query": "ok", "top_k": 2.5}, InvalidLimitError),
    ({"query": "ok", "kinds": ["dream"]}, UnknownKindError),
    ({"query": "ok", "filters": {"nonsense": 1}}, InvalidFilterError),
    ({"query": "ok", "filters": {"speaker": {"like": "A%"}}}, InvalidFilterError),
    ({"query": "ok", "filters": {"metadata.x": {"in": []}}}, InvalidFilterError),
    ({"query": "ok", "filters": {"observed_at": {"gt": "not a date"}}}, InvalidFilterError),
    ({"query": "ok", "filters": {"version": {"gt": "two"}}}, InvalidFilterError),
    ({"query": "ok", "filters": {"metadata.x; DROP TABLE items": 1}}, InvalidFilterError),
    ({"query": "ok", "filters": "speaker=Ann"}, InvalidFilterError),
    ({"query": "ok", "as_of": "whenever"}, InvalidDateError),
])
def test_bad_search_arguments(mem, kwargs, error):
    mem.add("hello world", user_id="ann")
    with pytest.raises(error):
        mem.search(**kwargs)


def test_unknown_ids(mem):
    for call in (lambda: mem.get("nope"), lambda: mem.update("nope", "text"),
                 lambda: mem.delete("nope"), lambda: mem.history("nope")):
        with pytest.raises(ItemNotFoundError, match="nope"):
            call()


def test_failed_update_keeps_the_old_version(mem):
    item = mem.add("original text", user_id="ann").items[0]
    with pytest.raises(EmptyContentError):
        mem.update(item.id, "  ")
    assert mem.get(item.id).content == "original text" and mem.get(item.id).version == 1


def test_delete_all_needs_a_scope(mem):
    mem.add("keep me", user_id="ann")
    with pytest.raises(InvalidInputError, match="reset"):
        mem.delete_all()
    assert len(mem.get_all()) == 2  # the turn and its session
