"""Retention (issue 17 part 2), on SQLite files and a real PostgreSQL: items that expire
(expires_at / ttl), cube rules per kind (expire, archive the unused, purge after a grace), the
audit log, and the guard against a rule set that removes everything."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from memstack import Memory
from memstack._errors import ConfirmationRequiredError, InvalidInputError
from memstack.govern.retention import duration

DAY = 86400.0


def _ids(hits):
    return [h.item.id for h in hits]


def _now():
    return datetime.now(timezone.utc)


def test_durations_read_as_seconds_and_bad_ones_are_refused():
    assert duration("90s", "x") == 90 and duration("2w", "x") == 14 * DAY
    assert duration(timedelta(hours=1), "x") == 3600 and duration(None, "x") is None
    for bad in ("soon", "-3d", 0, -1, True, "3y", float("inf")):
        with pytest.raises(InvalidInputError):
            duration(bad, "ttl")


def test_an_expired_item_leaves_search_at_once_and_as_of_still_sees_it(mem):
    keep = mem.add("Ann keeps a green parrot named Kiwi", user_id="ann", kind="fact").ids[0]
    gone = mem.add("Ann has a temporary door code 4711", user_id="ann", kind="fact",
                   ttl=3).ids[0]
    item = mem.get(gone)
    assert item.expires_at is not None and item.expires_at > item.recorded_at
    assert gone in _ids(mem.search("door code", user_id="ann"))
    time.sleep(max(0.0, (item.expires_at - _now()).total_seconds()) + 0.2)
    # no maintenance ran: the query itself leaves it out
    assert gone not in _ids(mem.search("door code", user_id="ann"))
    assert gone not in [i.id for i in mem.get_all(user_id="ann")]
    assert keep in _ids(mem.search("parrot", user_id="ann"))
    before = item.expires_at - timedelta(milliseconds=300)
    assert gone in _ids(mem.search("door code", user_id="ann", as_of=before))
    after = item.expires_at + timedelta(seconds=1)
    assert gone not in _ids(mem.search("door code", user_id="ann", as_of=after))

    report = mem.apply_retention()
    assert report.expired == {"default": [gone]} and not report.archived
    item = mem.get(gone)
    assert item.status == "archived" and item.valid_to == item.expires_at
    assert [v.reason for v in mem.history(gone)][-1] == "expired"
    assert gone in _ids(mem.search("door code", user_id="ann", as_of=before))
    entries = [e for e in mem.audit_log() if e.action == "retention_expire"]
    assert entries and entries[-1].item_ids == [gone]
    assert not mem.apply_retention().changed  # nothing left to do


def test_expiry_arguments_are_checked_before_anything_is_written(mem):
    for kwargs in ({"ttl": "soon"}, {"ttl": -5}, {"expires_at": "2001-01-01"},
                   {"expires_at": "2999-01-01", "ttl": 60}, {"expires_at": "not a date"}):
        with pytest.raises(InvalidInputError):
            mem.add("Ann is in Rome", user_id="ann", kind="fact", **kwargs)
    assert mem.get_all(user_id="ann") == []
    later = _now() + timedelta(days=3)
    item = mem.get(mem.add("Ann is in Rome", user_id="ann", kind="fact",
                           expires_at=later.isoformat()).ids[0])
    assert abs((item.expires_at - later).total_seconds()) < 1e-3


def test_rules_expire_archive_and_purge_per_kind_with_the_audit_log(mem):
    turns = mem.add([{"role": "user", "content": "I am planning a trip to Lisbon"},
                     {"role": "assistant", "content": "Lisbon is lovely in spring"}],
                    user_id="ann", session_id="s1").ids
    fact = mem.add("Ann is planning a trip to Lisbon", user_id="ann", kind="fact").ids[0]
    core = mem.add("Ann: vegetarian, lives in Porto", user_id="ann", kind="core").ids[0]
    mem.set_retention(kind="turn", expire_after="30d", purge_after="7d")
    mem.set_retention(kind="*", archive_unused="60d", purge_after="90d")
    rules = {r.kind: r for r in mem.retention()}
    assert rules["turn"].expire_after == 30 * DAY and rules["*"].archive_unused == 60 * DAY
    assert rules["turn"].set_by == mem.actor

    now = time.time()
    assert not mem.apply_retention(now=_at(now + 29 * DAY)).changed
    preview = mem.apply_retention(now=_at(now + 31 * DAY), dry_run=True)
    assert sorted(preview.expired["default"]) == sorted(turns) and not preview.archived
    assert mem.get(turns[0]).status == "active"  # a dry run writes nothing
    done = mem.apply_retention(now=_at(now + 31 * DAY))
    assert sorted(done.expired["default"]) == sorted(turns)
    assert all(mem.get(t).status == "archived" for t in turns)
    # the turns were archived on day 31; their purge waits 7 days from then
    assert not mem.apply_retention(now=_at(now + 37 * DAY)).purged
    done = mem.apply_retention(now=_at(now + 39 * DAY))
    assert sorted(done.purged["default"]) == sorted(turns)
    gone = mem.store.items_by_id(turns)
    assert all(i.status == "deleted" and i.content is None for i in gone.values())
    assert all(v.content is None for t in turns for v in mem.history(t))

    # the fact and the core block: not turns, so the "*" rule's 60 days; core is pinned
    done = mem.apply_retention(now=_at(now + 61 * DAY))
    assert done.archived == {"default": [fact]} and mem.get(core).status == "active"
    assert [v.reason for v in mem.history(fact)][-1] == "unused"
    assert mem.get(fact).valid_to is None  # archived, not untrue

    assert not mem.apply_retention(now=_at(now + 150 * DAY)).purged
    done = mem.apply_retention(now=_at(now + 152 * DAY))
    assert done.purged == {"default": [fact]}
    actions = [e.action for e in mem.audit_log(limit=500)]
    for action in ("retention_set", "retention_expire", "retention_archive", "retention_purge"):
        assert action in actions
    assert mem.verify_audit().ok


def test_a_read_keeps_an_item_from_being_archived_as_unused(mem):
    used = mem.add("Ann's locker number is 118", user_id="ann", kind="fact").ids[0]
    idle = mem.add("Ann once visited Oslo", user_id="ann", kind="fact").ids[0]
    mem.set_retention(kind="fact", archive_unused="10d")
    now = time.time()
    mem.store.touch({used: (1, now + 9 * DAY)})
    done = mem.apply_retention(now=_at(now + 11 * DAY))
    assert done.archived == {"default": [idle]}
    assert mem.get(used).status == "active"


def test_a_rule_set_that_removes_everything_needs_confirmation(mem):
    for n in range(3):
        mem.add(f"note number {n}", user_id="ann", kind="fact")
    old = time.time() - 40 * DAY
    rows = [rowid for rowid, _ in mem.store.select_items(_all(mem))]
    with mem.store.transaction():
        for rowid in rows:
            mem.store.update_item(rowid, {"recorded_at": _at(old)})
    with pytest.raises(ConfirmationRequiredError, match="all 3 items"):
        mem.set_retention(kind="*", expire_after="30d")
    assert mem.retention() == []  # refused: nothing written
    assert not any(e.action == "retention_set" for e in mem.audit_log())
    out = mem.set_retention(kind="*", expire_after="30d", confirm=True)
    assert out["rule"]["expire_after"] == 30 * DAY
    assert out["next_run"]["counts"]["expired"] == 3
    # a rule that leaves something in search needs no confirmation
    mem.set_retention(kind="*")  # removed
    mem.add("a fresh note", user_id="ann", kind="fact")
    assert mem.set_retention(kind="*", expire_after="30d")["next_run"]["counts"]["expired"] == 3


def test_bad_rules_are_refused_with_a_clear_error(mem):
    mem.add("something", user_id="ann", kind="fact")
    for kwargs in ({"kind": "session", "expire_after": "1d"}, {"kind": "memo", "expire_after": 5},
                   {"expire_after": "forever"}, {"purge_after": 0}):
        with pytest.raises(InvalidInputError):
            mem.set_retention(**kwargs)
    assert mem.retention() == []


def test_an_items_expiry_and_the_cubes_rules_travel_in_its_archive(mem, tmp_path, embedder):
    later = _now() + timedelta(days=5)
    item = mem.add("Ann's passport expires", user_id="ann", kind="fact",
                   expires_at=later).ids[0]
    mem.set_retention(kind="fact", purge_after="30d")
    mem.export_cube("default", tmp_path / "c.memcube")
    with Memory(tmp_path / "other.db", embedder=embedder) as other:
        other.import_cube(tmp_path / "c.memcube")
        copied = other.get(item)
        assert abs((copied.expires_at - later).total_seconds()) < 1e-3
        assert [(r.kind, r.purge_after) for r in other.retention()] == [("fact", 30 * DAY)]


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def _all(mem):
    from memstack.store.selection import Selection

    return Selection(cube_ids=(mem.store.cube("default").id,))


def test_maintain_applies_retention_without_a_model_and_the_server_runs_it(db_path, embedder):
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from memstack.cli import cli
    from memstack.server.app import create_app

    with Memory(db_path, embedder=embedder) as m:
        first = m.add("a code valid for one second", user_id="ann", kind="fact", ttl=1).ids[0]
        m.add("Ann likes chess", user_id="ann", kind="fact")
    time.sleep(1.1)
    out = CliRunner().invoke(cli, ["--db", str(db_path), "--json", "maintain", "--no-tiers"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["retention"]["expired"] == {"default": [first]} and report["kv"] is None
    with Memory(db_path, embedder=embedder) as m:
        second = m.add("another short code", user_id="ann", kind="fact", ttl=1).ids[0]
        time.sleep(1.1)
        app = create_app(m, allow_open=True, maintenance={"every": 0.3, "quiet": 0})
        with TestClient(app) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and m.get(second).status == "active":
                time.sleep(0.1)
            health = client.get("/v1/health").json()["maintenance"]
        assert m.get(second).status == "archived"
        assert "items_expired" in health["last_run"]["did"] and not health["tiers"]


def test_the_cli_shows_sets_and_applies_rules_and_asks_for_yes(db_path, embedder):
    from click.testing import CliRunner

    from memstack.cli import cli

    runner, base = CliRunner(), ["--db", str(db_path)]
    with Memory(db_path, embedder=embedder) as m:
        m.add("note one", user_id="ann", kind="fact")
    out = runner.invoke(cli, [*base, "add", "a short code", "--kind", "fact", "--user", "ann",
                              "--ttl", "soon"])
    assert out.exit_code == 2 and "duration" in out.output
    out = runner.invoke(cli, [*base, "add", "a short code", "--kind", "fact", "--user", "ann",
                              "--ttl", "1"])
    assert out.exit_code == 0, out.output
    time.sleep(1.1)  # the code has expired and the note was not read for a second
    out = runner.invoke(cli, [*base, "retention", "set", "fact", "--archive-unused", "1"])
    assert out.exit_code == 2 and "--yes" in out.output  # the note would leave search too
    out = runner.invoke(cli, [*base, "retention", "set", "fact", "--purge-after", "30d"])
    assert out.exit_code == 0 and "rule for 'fact' set" in out.output, out.output
    out = runner.invoke(cli, [*base, "--json", "retention", "show"])
    rules = json.loads(out.output)
    assert [(r["kind"], r["purge_after"]) for r in rules] == [("fact", 30 * DAY)]
    out = runner.invoke(cli, [*base, "retention", "apply", "--dry-run"])
    assert out.exit_code == 0 and "would expire 1" in out.output, out.output
    out = runner.invoke(cli, [*base, "--json", "retention", "apply"])
    assert json.loads(out.output)["counts"] == {"expired": 1, "archived": 0, "purged": 0}
    out = runner.invoke(cli, [*base, "retention", "set", "fact", "--clear"])
    assert out.exit_code == 0 and "removed" in out.output
    assert runner.invoke(cli, [*base, "retention", "set", "fact"]).exit_code == 2


def test_rest_sets_rules_for_owners_only_and_adds_with_a_ttl(server):
    import httpx

    owner = {"Authorization": f"Bearer {server.key('ann')}"}
    other = {"Authorization": f"Bearer {server.key('bob')}"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        created = http.post("/v1/memories", headers=owner, json={
            "messages": "gate code 1234", "kind": "fact", "user_id": "ann", "cube": "ann-cube",
            "ttl": "30d"})
        assert created.status_code == 201, created.text
        item = http.get(f"/v1/memories/{created.json()['results'][0]['id']}",
                        headers=owner).json()
        assert item["expires_at"] is not None
        bad = http.post("/v1/memories", headers=owner,
                        json={"messages": "x", "cube": "ann-cube", "ttl": "soon"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_input"
        rule = {"kind": "fact", "archive_unused": "1s"}
        time.sleep(1.2)  # unread for a second: the rule would archive the cube's only item
        refused = http.put("/v1/cubes/ann-cube/retention", headers=owner, json=rule)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "confirmation_required"
        assert http.get("/v1/cubes/ann-cube/retention", headers=owner).json() == []
        assert http.put("/v1/cubes/ann-cube/retention", headers=other,
                        json={**rule, "confirm": True}).status_code in (403, 404)
        done = http.put("/v1/cubes/ann-cube/retention", headers=owner,
                        json={**rule, "confirm": True})
        assert done.status_code == 200 and done.json()["rule"]["archive_unused"] == 1
        rules = http.get("/v1/cubes/ann-cube/retention", headers=owner).json()
        assert [(r["kind"], r["set_by"]) for r in rules] == [("fact", "ann")]


def test_an_expired_turn_leaves_its_neighbours_context_keys_at_the_run(mem):
    for text, ttl in (("hello there, how are you", None), ("my locker code is zebraquartz", 1),
                      ("thanks, I will remember it", None)):
        mem.add(text, user_id="ann", session_id="s1", ttl=ttl)
    before = mem.search("zebraquartz", user_id="ann")
    assert any("bm25_context" in h.ranks for h in before if "zebraquartz" not in
               h.item.content)  # the neighbours' context keys hold the code
    time.sleep(1.1)
    assert mem.apply_retention().counts()["expired"] == 1
    after = mem.search("zebraquartz", user_id="ann")
    assert all("bm25_context" not in h.ranks and "bm25" not in h.ranks for h in after)


def test_without_a_model_maintenance_drops_a_shard_that_holds_a_deleted_item(db_path,
                                                                             embedder):
    from memstack.store.shards import ShardRow

    with Memory(db_path, embedder=embedder) as m:
        ids = [m.add(t, user_id="ann", kind="fact").ids[0] for t in ("Ann likes tea",
                                                                    "Ann plays chess")]
        folder = m.store.shard_dir / "shard_x"
        folder.mkdir(parents=True)
        (folder / "adapter.bin").write_bytes(b"weights that learnt both facts")
        with m.store.transaction():
            m.store.insert_shard(ShardRow("shard_x", m.store.cube("default").id, "k", "shard_x",
                                          ids, None, "active", [], 1.0))
        m.update(ids[1], "Ann plays go")  # stale, nothing deleted: kept for a retrain
        assert m.maintenance(model=None).run().shards == []
        m.delete(ids[0])
        report = m.maintenance(model=None).run()
        assert [s["stale"] for s in report.shards] == ["shard_x"]
        assert m.store.shard("shard_x") is None and not folder.exists()


def test_a_deleted_turn_next_to_an_archived_one_leaves_every_context_key(mem):
    """Turns A B X1 X2 C D, X1 expired and archived: deleting X2 rebuilds B's key too (X2 was
    in it, counted among the active turns), and the archived X1 keeps no context key."""
    texts = ["alpha one", "bravo two", "xray expiring soon", "the zebraquartz code",
             "charlie three", "delta four"]
    ids = [mem.add(t, user_id="ann", session_id="s1", ttl=1 if n == 2 else None).ids[0]
           for n, t in enumerate(texts)]
    time.sleep(1.1)
    assert mem.apply_retention().counts()["expired"] == 1
    assert mem.delete(ids[3], receipt=True)["clean"]
    hits = mem.search("zebraquartz", user_id="ann") + \
        mem.search("zebraquartz", user_id="ann", as_of=_now())
    assert not [h for h in hits if {"bm25", "bm25_context"} & set(h.ranks)]
