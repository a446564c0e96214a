"""Feedback (issue 18): stored as items, moving one user's later searches for similar queries
within a bound, undone by deleting it; corrections ranked ahead of what they correct; answers
and generations named by id. On both stores, through Python, REST, MCP-free CLI and the LLM's
fact manager (scripted)."""

from __future__ import annotations

import contextlib

import httpx
import pytest
from click.testing import CliRunner

from fake_llm import Reply, ScriptedLLM, decisions, facts, update
from memstack import (Client, ContentTooLargeError, FeedbackSettings, InvalidInputError,
                      ItemNotFoundError, Memory, NotFoundError, OpenAIChat, PermissionDeniedError,
                      UnknownKindError)
from memstack.cli.root import cli

ANN = {"user_id": "ann"}
NOTES = ["My sister lives in Paris with her two cats",
         "I moved to Berlin last May for a new job",
         "The weather in Berlin was cold all week",
         "I work as a nurse at the city hospital",
         "Our football club won the regional cup"]
QUERY = "where does ann live"
SIMILAR = "in which city does ann live"


@contextlib.contextmanager
def llm_memory(db_path, embedder):
    """A Memory whose LLM is the scripted server (tests/fake_llm.py), and that server."""
    with ScriptedLLM() as fake:
        llm = OpenAIChat(base_url=fake.url, model="fake", backoff=0.01, timeout=5.0)
        with Memory(db_path, embedder=embedder, llm=llm) as mem:
            yield mem, fake


def fill(mem: Memory, user: dict = ANN) -> dict[str, str]:
    return {text: mem.add(text, **user).ids[0] for text in NOTES}


def ranking(mem: Memory, query: str, **kw) -> list[str]:
    return [h.item.content for h in mem.search(query, top_k=5, **{**ANN, **kw})]


def test_negative_feedback_lowers_a_hit_for_similar_queries_only(mem):
    ids = fill(mem)
    before = ranking(mem, SIMILAR)
    top = before[0]
    result = mem.feedback(ids[top], "negative", query=QUERY, **ANN)
    assert result.item_ids == [ids[top]] and result.query == QUERY
    after, plain = ranking(mem, SIMILAR), ranking(mem, SIMILAR, feedback=False)
    assert after.index(top) > plain.index(top)  # lower for a differently worded question
    assert sorted(plain) == sorted(before)  # off per search (the feedback's own key sits in
    # the full-text index, so in five notes BM25's statistics shift a little: not the order)
    assert ranking(mem, "football cup results") == ranking(mem, "football cup results",
                                                           feedback=False)  # unrelated: same
    assert ranking(mem, SIMILAR, user_id="bob") == []  # bob's scope is his own
    stored = mem.get(result.id)
    assert stored.kind == "feedback" and stored.metadata["signal"] == "negative"
    assert stored.metadata["item_ids"] == [ids[top]] and stored.user_id == "ann"
    assert "feedback" in {e.action for e in mem.audit_log(limit=1000)}
    assert all(h.item.kind != "feedback" for h in mem.search(QUERY, **ANN))  # not a memory
    mem.delete(result.id)
    assert ranking(mem, SIMILAR) == before  # deleting the feedback undoes it


def test_feedback_stays_with_the_user_and_the_cube_that_gave_it(mem):
    ids = fill(mem)
    bob_ids = fill(mem, {"user_id": "bob"})
    bob_before = ranking(mem, SIMILAR, user_id="bob")
    top = ranking(mem, SIMILAR)[0]
    mem.feedback(ids[top], "negative", query=QUERY, **ANN)
    mem.feedback(bob_ids[top], "positive", query=QUERY, user_id="ann")  # ann's, on bob's item
    assert ranking(mem, SIMILAR, user_id="bob") == bob_before
    assert set(ranking(mem, SIMILAR)) <= set(NOTES)  # bob's item never enters ann's results
    for text in NOTES:
        mem.add(text, cube="other", **ANN)  # the same notes in another cube: untouched there
    assert ranking(mem, SIMILAR, cube="other") == ranking(mem, SIMILAR, cube="other",
                                                          feedback=False)


def test_positive_feedback_raises_a_memory_within_the_searchs_selection(mem):
    ids = fill(mem)
    query = "what did I eat for breakfast"
    far = ranking(mem, query)[-1]
    mem.feedback(ids[far], "positive", query=query, **ANN)
    assert ranking(mem, "what did I have for breakfast")[0] == far
    assert far not in [h.item.content for h in mem.search(
        "what did I have for breakfast", kinds=["fact"], **ANN)]  # the search's own filters
    assert far not in [h.item.content for h in mem.search(
        "what did I have for breakfast", session_id="nope", **ANN)]


def test_a_flood_moves_an_item_no_further_than_the_bound(mem):
    ids = fill(mem)
    target = ids[ranking(mem, SIMILAR)[0]]
    mem.feedback(target, "negative", query=SIMILAR, **ANN)
    once = {h.item.id: h.score for h in mem.search(SIMILAR, **ANN)}
    for _ in range(40):
        mem.feedback(target, "negative", query=SIMILAR, **ANN)
    flooded = {h.item.id: h.score for h in mem.search(SIMILAR, **ANN)}
    assert flooded == pytest.approx(once, abs=1e-6)  # the same query saturates the bound
    plain = {h.item.id: h.score for h in mem.search(SIMILAR, feedback=False, **ANN)}
    weight = mem.searcher.feedback.weight
    assert flooded[target] >= plain[target] - weight * max(plain.values()) - 1e-9


def test_feedback_fades_with_time(mem, monkeypatch):
    import time as clock

    from memstack.retrieve import feedback as fb

    ids = fill(mem)
    target = ids[ranking(mem, SIMILAR)[0]]
    mem.feedback(target, "negative", query=SIMILAR, **ANN)
    qvec = mem.embedder.embed([SIMILAR])[0]
    sel = fb.Selection(cube_ids=(mem.store.cube("default").id,), user_id="ann")
    now = clock.time()
    fresh = fb.nudges(mem.store, qvec, sel, FeedbackSettings(), now=now)[target]
    later = fb.nudges(mem.store, qvec, sel, FeedbackSettings(), now=now + 90 * 86400)[target]
    assert fresh == pytest.approx(-1.0, abs=1e-3) and later == pytest.approx(fresh / 2, abs=1e-3)


def test_a_correction_is_ranked_ahead_of_what_it_corrects_and_goes_with_its_feedback(mem):
    ids = fill(mem)
    wrong = ids["I moved to Berlin last May for a new job"]
    result = mem.feedback(wrong, "negative", correction="I moved to Munich in June, not Berlin",
                          **ANN)
    correction = mem.get(result.correction_id)
    assert correction.kind == "fact" and correction.metadata["corrects"] == wrong
    assert correction.source_ids == [result.id]
    hits = [h.item.id for h in mem.search("where did I move last year", **ANN)]
    assert hits.index(correction.id) == hits.index(wrong) - 1
    assert result.query is None  # no query: rankings do not move
    mem.delete(result.id)
    with pytest.raises(ItemNotFoundError):
        mem.get(correction.id)
    assert mem.get(wrong).status == "active"


def test_bad_feedback_is_refused_and_writes_nothing(mem):
    ids = fill(mem)
    target = ids[NOTES[0]]
    count = len(mem.get_all(include_inactive=True, limit=1000))
    with pytest.raises(InvalidInputError, match="signal"):
        mem.feedback(target, "meh", query=QUERY)
    with pytest.raises(InvalidInputError):
        mem.feedback(target, "negative", correction="   ")
    with pytest.raises(ContentTooLargeError):
        mem.feedback(target, "negative", correction="x" * 10_001)
    with pytest.raises(ItemNotFoundError):
        mem.feedback("no-such-id", "negative", query=QUERY)
    result = mem.feedback(target, "negative", query=QUERY)
    with pytest.raises(InvalidInputError, match="feedback item"):
        mem.feedback(result.id, "negative", query=QUERY)
    mem.delete(ids[NOTES[1]])
    with pytest.raises(ItemNotFoundError):
        mem.feedback(ids[NOTES[1]], "positive", query=QUERY)
    with pytest.raises(UnknownKindError):
        mem.add("a feedback by hand", kind="feedback")
    assert len(mem.get_all(include_inactive=True, limit=1000)) == count  # feedback is no memory
    assert len(mem.get_all(kinds=["feedback"], include_inactive=True, limit=1000)) == 1


def test_answers_get_ids_and_feedback_names_their_memories(db_path, embedder):
    with llm_memory(db_path, embedder) as (mem, fake):
        for text in NOTES:
            mem.add(text, infer=False, **ANN)
        fake.script(Reply("Berlin"))
        answer = mem.answer("Where does Ann live?", **ANN)
        assert answer.id.startswith("ans_") and answer.memory_ids
        result = mem.feedback(answer.id, "negative")
        assert sorted(result.item_ids) == sorted(answer.memory_ids)
        stored = mem.get(result.id)
        assert stored.metadata["answer_id"] == answer.id and stored.user_id == "ann"
        assert result.query == "Where does Ann live?"  # the answer's own question
        with pytest.raises(ItemNotFoundError):
            mem.feedback("ans_unknown", "negative")


def test_a_correction_goes_through_the_fact_managers_update(db_path, embedder):
    with llm_memory(db_path, embedder) as (mem, fake):
        fake.script(facts("Ann lives in Berlin."))
        said = mem.add([{"role": "user", "name": "Ann", "content": "I live in Berlin."}],
                       **ANN)
        fact = said.facts[0].id
        fake.script(facts("Ann lives in Munich."),
                    decisions(update(1, 1, "Ann lives in Munich.")))
        result = mem.feedback(fact, "negative", correction="I live in Munich, not Berlin",
                              **ANN)
        [op] = result.operations
        assert op.event == "UPDATE" and op.previous_id == fact
        assert mem.get(fact).status == "superseded"
        turn = mem.get(result.correction_id)
        assert turn.kind == "turn" and turn.metadata["corrects"] == fact
        assert turn.source_ids == [result.id]
        mem.delete(result.id)  # the correction's turn and the fact drawn from it go too
        with pytest.raises(ItemNotFoundError):
            mem.get(op.id)
        restored = mem.get(fact)  # and what it superseded is current again
        assert restored.status == "active" and restored.valid_to is None
        assert [i.content for i in mem.get_all(kinds=["fact"], **ANN)] == \
            ["Ann lives in Berlin."]
        assert mem.history(fact)[-1].reason.startswith("restored")


def test_rest_feedback_is_walled_like_any_item(server):
    alice, bob = Client(server.url, server.key("alice")), Client(server.url, server.key("bob"))
    alice.create_cube("team")
    ids = [alice.add(text, cube="team", user_id="alice").ids[0] for text in NOTES]
    with pytest.raises(NotFoundError):  # bob cannot read the cube: the item does not exist
        bob.feedback(ids[0], "negative", query=QUERY)
    alice.grant("team", "bob", "read")
    with pytest.raises(PermissionDeniedError):  # a reader cannot write feedback into it
        bob.feedback(ids[0], "negative", query=QUERY)
    result = alice.feedback(ids[0], "negative", query=QUERY, user_id="alice")
    assert result.item_ids == [ids[0]]
    plain = alice.search(SIMILAR, cube="team", user_id="alice", feedback=False)
    moved = alice.search(SIMILAR, cube="team", user_id="alice")
    plain_ids, moved_ids = [h.item.id for h in plain], [h.item.id for h in moved]
    assert ids[0] not in moved_ids[:plain_ids.index(ids[0]) + 1]  # lower, or out of the list
    reply = httpx.post(f"{server.url}/v1/feedback", json={"target": ids[0], "signal": "meh"},
                       headers={"Authorization": f"Bearer {server.key('alice')}"})
    assert reply.status_code == 422 or reply.status_code == 400
    assert alice.delete(result.id) == 1


def test_cli_feedback_and_search_without_it(db_path, embedder):
    with Memory(db_path, embedder=embedder) as mem:
        ids = fill(mem)
    runner = CliRunner()
    base = ["--db", str(db_path)]
    out = runner.invoke(cli, base + ["feedback", ids[NOTES[0]], "negative", "--query", QUERY,
                                     "--user", "ann"])
    assert out.exit_code == 0, out.output
    assert "feedback" in out.output and "moves searches like" in out.output
    bad = runner.invoke(cli, base + ["feedback", ids[NOTES[0]], "maybe"])
    assert bad.exit_code == 2
    missing = runner.invoke(cli, base + ["feedback", "nope", "negative"])
    assert missing.exit_code != 0 and "nope" in missing.output
    plain = runner.invoke(cli, base + ["--json", "search", SIMILAR, "--user", "ann",
                                       "--no-feedback"])
    assert plain.exit_code == 0, plain.output


def test_one_users_corrections_stay_in_their_scope_and_one_shows_per_memory(mem):
    ids = fill(mem)
    target = ids["I moved to Berlin last May for a new job"]
    before = ranking(mem, "where did I move")
    for n in range(4):
        mem.feedback(target, "negative", correction=f"bob says nonsense {n}", user_id="bob")
    assert ranking(mem, "where did I move") == before  # ann's results: bob's text never
    bobs = [h.item.content for h in mem.search("where did Ann move", user_id="bob")]
    assert len(bobs) == 4  # bob's own scope sees his corrections as memories
    unscoped = [h.item.content for h in mem.search("where did Ann move to", top_k=5)]
    placed = [c for c in unscoped if c.startswith("bob says")]
    assert unscoped.index("I moved to Berlin last May for a new job") - 1 == \
        unscoped.index("bob says nonsense 3")  # the newest correction just ahead of it
    assert len(placed) >= 1


def test_forgetting_a_user_forgets_the_answers_they_asked(db_path, embedder):
    with llm_memory(db_path, embedder) as (mem, fake):
        for text in NOTES:
            mem.add(text, infer=False, **ANN)
        fake.script(Reply("Berlin"))
        answer = mem.answer("Is my HIV test from clinic Zeta positive?", **ANN)
        assert mem.store.answer_rows(answer.id)
        mem.delete_all(**ANN)
        assert mem.store.answer_rows(answer.id) == []
        with pytest.raises(ItemNotFoundError):
            mem.feedback(answer.id, "negative")
        fake.script(Reply("Berlin"))
        mem.add("I moved to Berlin", infer=False, **ANN)
        again = mem.answer("Where does Ann live?", **ANN)
        for memory_id in again.memory_ids:
            mem.delete(memory_id)
        with pytest.raises(ItemNotFoundError):  # every memory it used is gone: so is it
            mem.feedback(again.id, "negative")


def test_feedback_scope_is_validated(mem):
    ids = fill(mem)
    for bad in ("", 5, "x" * 10_000):
        with pytest.raises(InvalidInputError):
            mem.feedback(ids[NOTES[0]], "negative", query=QUERY, user_id=bad)
    with pytest.raises(InvalidInputError):
        mem.feedback(ids[NOTES[0]], "negative", query=QUERY, agent_id=["x"])
    assert mem.get_all(kinds=["feedback"], include_inactive=True) == []


def test_dedupe_never_merges_a_correction(mem):
    mem.add("Ann drinks green tea every morning", kind="fact", **ANN)
    wrong = mem.add("Ann drinks black coffee every morning", kind="fact", **ANN).ids[0]
    result = mem.feedback(wrong, "negative", correction="Ann drinks green tea every morning",
                          **ANN)
    mem.dedupe()
    assert mem.get(result.correction_id).status == "active"
    mem.delete(result.id)
    assert "Ann drinks green tea every morning" in [
        i.content for i in mem.get_all(kinds=["fact"], **ANN)]
