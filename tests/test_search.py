"""Hybrid search: fusion, scopes, kinds, filters, time, as_of and literal queries."""

import pytest

from memstack import InvalidFilterError


@pytest.fixture
def filled(mem):
    mem.add([{"role": "user", "name": "Ann", "content": "I moved to Berlin for a new job."},
             {"role": "user", "name": "Ann", "content": "My sister lives in Lisbon."}],
            user_id="ann", session_id="a1", observed_at="2024-05-02", metadata={"topic": "home"})
    mem.add([{"role": "user", "name": "Ann", "content": "I play the cello in an orchestra."}],
            user_id="ann", session_id="a2", observed_at="2024-07-15", metadata={"topic": "music"})
    mem.add([{"role": "user", "name": "Bob", "content": "I moved to Berlin too, last year."}],
            user_id="bob", session_id="b1", observed_at="2024-06-01")
    return mem


def test_hits_carry_score_and_rank_per_retriever(filled):
    hits = filled.search("Which city did Ann move to?", user_id="ann")
    top = hits[0]
    assert "Berlin" in top.item.content and top.item.user_id == "ann"
    assert {"bm25", "vector"} <= set(top.ranks) <= {"bm25", "vector", "bm25_context", "vector_context"}
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_results_never_cross_user_scope(filled):
    for query in ("Berlin", "moved to Berlin too last year", "cello orchestra"):
        assert {h.item.user_id for h in filled.search(query, user_id="ann")} <= {"ann"}
        assert {h.item.user_id for h in filled.search(query, user_id="bob")} <= {"bob"}
    assert filled.search("Berlin", user_id="nobody") == []


def test_session_scope(filled):
    hits = filled.search("Berlin job", user_id="ann", session_id="a2")
    assert {h.item.session_id for h in hits} == {"a2"}


def test_kinds_filter_and_session_headers_only_on_request(filled):
    assert {h.item.kind for h in filled.search("Ann", user_id="ann")} == {"turn"}
    sessions = filled.search("conversation session", user_id="ann", kinds=["session"])
    assert sessions and {h.item.kind for h in sessions} == {"session"}


@pytest.mark.parametrize("filters, expected", [
    ({"metadata.topic": "music"}, {"I play the cello in an orchestra."}),
    ({"metadata.topic": {"ne": "music"}}, {"I moved to Berlin for a new job.",
                                           "My sister lives in Lisbon."}),
    ({"metadata.topic": {"in": ["music", "nothing"]}}, {"I play the cello in an orchestra."}),
    ({"observed_at": {"gte": "2024-07-01"}}, {"I play the cello in an orchestra."}),
    ({"observed_at": {"lt": "2024-06-01"}}, {"I moved to Berlin for a new job.",
                                             "My sister lives in Lisbon."}),
    ({"content": {"contains": "LISBON"}}, {"My sister lives in Lisbon."}),
    ({"speaker": "Ann", "observed_at": {"gt": "2024-01-01", "lte": "2024-05-02"}},
     {"I moved to Berlin for a new job.", "My sister lives in Lisbon."}),
])
def test_filter_operators(filled, filters, expected):
    hits = filled.search("where does Ann live and what does she play", user_id="ann",
                         filters=filters, top_k=20)
    assert {h.item.content for h in hits} == expected


def test_metadata_contains_on_lists(mem):
    mem.add("tagged note", user_id="ann", metadata={"labels": ["work", "urgent"]})
    mem.add("other note", user_id="ann", metadata={"labels": ["home"]})
    hits = mem.search("note", user_id="ann", filters={"metadata.labels": {"contains": "urgent"}})
    assert [h.item.content for h in hits] == ["tagged note"]


def test_since_until(filled):
    hits = filled.search("Berlin Lisbon cello", user_id="ann", since="2024-07-01",
                         until="2024-08-01")
    assert [h.item.content for h in hits] == ["I play the cello in an orchestra."]


def test_time_cue_in_query_boosts_items_of_that_time(db_path, embedder):
    from memstack import Memory, SearchSettings

    mem = Memory(db_path, embedder=embedder, search_settings=SearchSettings(time_boost=1.3))
    mem.add("We had a picnic by the lake.", user_id="ann", observed_at="2024-05-10")
    mem.add("We had a picnic in the park.", user_id="ann", observed_at="2024-08-10")
    for query, expected in (("picnic in May 2024", "lake"), ("picnic in August 2024", "park"),
                            ("picnic last May", "lake"), ("picnic two weeks ago", "park")):
        hits = mem.search(query, user_id="ann", as_of="2024-08-24")  # relative to as_of
        assert expected in hits[0].item.content, query
        assert hits[0].score > hits[1].score
    mem.close()


@pytest.mark.parametrize("query", ['"Berlin', 'Berlin*', 'Berlin NEAR Lisbon', 'Berlin AND -job',
                                   "it's \"quoted\" (paren) ^caret col:umn", 'OR', 'NOT AND'])
def test_fts_syntax_is_searched_literally(filled, query):
    hits = filled.search(query, user_id="ann")  # no FTS5 syntax error leaks out
    assert isinstance(hits, list)


def test_as_of_sees_superseded_state(mem):
    item = mem.add("Ann lives in Paris", user_id="ann", kind="fact",
                   observed_at="2020-01-01").items[0]
    # supersede by hand the way the LLM manager will: close the window, add the new fact
    mem.store.update_item(mem.store.item_by_id(item.id)[0], {"status": "superseded",
                                                 "valid_to": __import__("memstack")._time.parse_time("2024-01-01")})
    mem.add("Ann lives in Berlin", user_id="ann", kind="fact", observed_at="2024-01-01")
    now = [h.item.content for h in mem.search("where does Ann live", user_id="ann")]
    assert "Ann lives in Paris" not in now and "Ann lives in Berlin" in now
    past = [h.item.content for h in mem.search("where does Ann live", user_id="ann",
                                                as_of="2022-06-01")]
    assert "Ann lives in Paris" in past and "Ann lives in Berlin" not in past


def test_several_cubes_and_unknown_filter(mem):
    mem.add("work note about the quarterly budget", user_id="ann", cube="work")
    mem.add("home note about the garden", user_id="ann", cube="home")
    assert [h.item.cube for h in mem.search("budget note", cube="work")] == ["work"]
    both = {h.item.cube for h in mem.search("note", cube=["work", "home"])}
    assert both == {"work", "home"}
    with pytest.raises(InvalidFilterError, match="metadata.<key>"):
        mem.search("note", cube="work", filters={"topic": "x"})


def test_a_role_is_not_a_speaker_name(mem):
    mem.add([{"role": "user", "content": "I need help with the user login page."},
             {"role": "assistant", "content": "The user login page needs a session cookie."}],
            user_id="ann", session_id="s")
    hits = mem.search("user login page session cookie", user_id="ann")
    assert hits[0].item.role == "assistant"  # "user" in the query boosts no role's turns
    assert hits[0].score > hits[1].score


def test_first_person_questions_can_favour_the_users_own_turns(db_path, embedder):
    from memstack import Memory, SearchSettings

    turns = [{"role": "user", "content": "I keep my bike in the garage."},
             {"role": "assistant", "content": "Bikes are usually kept in a garage or a shed."}]
    scores = {}
    for boost in (1.0, 3.0):
        with Memory(db_path.with_name(f"b{boost}.db"), embedder=embedder,
                    search_settings=SearchSettings(user_boost=boost, session_weight=0)) as m:
            m.add(turns, user_id="ann", session_id="s")
            mine = m.search("where do I keep my bike", user_id="ann")
            plain = m.search("where are bikes kept", user_id="ann")
            scores[boost] = ({h.item.role: h.score for h in mine},
                             {h.item.role: h.score for h in plain})
    assert scores[3.0][0]["user"] / scores[3.0][0]["assistant"] == pytest.approx(
        3 * scores[1.0][0]["user"] / scores[1.0][0]["assistant"])
    assert scores[3.0][1] == scores[1.0][1]  # not in the first person: no boost


def test_directives_are_the_users_standing_preferences_and_instructions():
    from memstack.ingest.rules import directives, item_keys

    long = ("I'm setting up the chat backend this week. I prefer asynchronous saving with an "
            "acknowledgement over blocking writes. Here is what I have so far, it is not much.")
    assert directives("user", long) == ["I prefer asynchronous saving with an acknowledgement "
                                        "over blocking writes."]
    assert directives("Ann", "Never book me a window seat. Thanks!") == [
        "Never book me a window seat."]
    assert directives("assistant", long) == [] and directives("tool", long) == []
    assert directives("user", "The build failed again this morning.") == []
    texts, roles, _ = item_keys("turn", "user", long, None)
    assert roles == ["body", "directive:0"] and texts[1].startswith("user: I prefer")
    # a message that is one directive is its own key already; facts get no directive keys
    assert item_keys("turn", "user", "Always answer in French.", None)[1] == ["body"]
    assert item_keys("fact", None, long, None)[1] == ["body"]


def test_a_preference_said_in_passing_is_found_and_can_be_favoured(db_path, embedder):
    from memstack import Memory, SearchSettings

    turns = [{"role": "user", "content": "I'm building a chat application with a Flask backend "
              "and a React front end, deployed on a small VPS with Docker Compose and nginx in "
              "front of it. I prefer asynchronous message saving with an acknowledgement over "
              "blocking writes. The login flow uses JWT tokens that expire after an hour."},
             {"role": "assistant", "content": "Message saving can be synchronous, which is "
              "simpler: the request waits until the database has the message."},
             {"role": "user", "content": "The nginx config now proxies the websocket too."}]
    query = "how should message saving work in my chat app"
    ratio = {}
    for boost in (1.0, 2.0):
        with Memory(db_path.with_name(f"d{boost}.db"), embedder=embedder,
                    search_settings=SearchSettings(directive_boost=boost, session_weight=0,
                                                   user_boost=1.0)) as m:
            ids = m.add(turns, user_id="ann", session_id="s").ids
            assert m.get(ids[0]).metadata["directive"] is True
            assert "directive" not in m.get(ids[1]).metadata
            hits = {h.item.id: h for h in m.search(query, user_id="ann")}
            keys = m.store.conn.execute("SELECT k.role FROM keys k JOIN items i ON "
                                        "i.rowid = k.item_rowid WHERE i.id = ?", (ids[0],))
            assert "directive:0" in {r for (r,) in keys}
            ratio[boost] = hits[ids[0]].score / hits[ids[1]].score
    assert ratio[2.0] == pytest.approx(2 * ratio[1.0])


def test_a_message_mostly_code_is_also_keyed_by_its_words():
    from memstack.ingest.rules import item_keys, prose

    code = "```python\n" + "\n".join(f"value_{n} = compute({n})" for n in range(30)) + "\n```"
    message = f"I need the first deployment live by March 1, 2024.\n{code}\nWhy does it fail?"
    assert prose(message) == "I need the first deployment live by March 1, 2024.\nWhy does it fail?"
    texts, roles, _ = item_keys("turn", "user", message, None)
    assert roles == ["body", "prose:0"] and "compute" not in texts[1]
    assert prose("No code here at all.") is None
    words = "The deployment target moved twice this month, and the team agreed on March. " * 3
    assert prose(words + "```\nx = 1\n```") is None  # the code is a small part of it
    unclosed = "Here is the start:\n```js\n" + "let a = 1;\n" * 40
    assert prose(unclosed) == "Here is the start:"


def test_an_update_recomputes_whether_a_turn_states_a_preference(mem):
    [item] = mem.add({"role": "user", "content": "The build failed again this morning."},
                     user_id="ann", session_id="s").items
    assert "directive" not in item.metadata
    updated = mem.update(item.id, "From now on, always run the linter before the build.")
    assert updated.metadata["directive"] is True
    again = mem.update(updated.id, "The build passed.")
    assert "directive" not in again.metadata
