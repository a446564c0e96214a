"""Duplicates merged (learn/dedupe.py): one item keeps the union of provenance, the copies are
superseded by it and leave search; near-misses, other users, other cubes and turns are never
merged; a dry run writes nothing; the CLI and maintain run it."""

from __future__ import annotations

import json

from click.testing import CliRunner

from memstack.cli import cli
from memstack.learn.near import conflict


def _fact(mem, text, user="ann", session="s1", day="2025-01-01", **kw):
    return mem.add(text, kind="fact", user_id=user, session_id=session, observed_at=day,
                   infer=False, **kw).items[0]


def test_duplicates_merged_with_union_provenance_and_history(mem):
    first = _fact(mem, "Ann likes green tea", session="s1", day="2025-01-01")
    again = _fact(mem, "Ann likes green tea", session="s2", day="2025-02-01")
    reworded = _fact(mem, "Ann really likes green tea", session="s3", day="2025-03-01")
    mem.store.update_item(mem.store.item_by_id(again.id)[0], {"source_ids": ["turn-b"]})
    mem.store.update_item(mem.store.item_by_id(reworded.id)[0], {"source_ids": ["turn-c"]})

    report = mem.dedupe(user_id="ann")

    assert report.kept == [first.id]
    assert sorted(report.merged) == sorted([again.id, reworded.id])
    kept = mem.get(first.id)
    assert kept.status == "active" and sorted(kept.source_ids) == ["turn-b", "turn-c"]
    for copy in (again.id, reworded.id):
        item = mem.get(copy)
        assert item.status == "superseded" and item.superseded_by == first.id
        assert mem.history(copy)[-1].reason == f"duplicate of {first.id}"
    assert mem.history(first.id)[-1].reason.startswith("merged duplicates")
    entry = next(e for e in mem.audit_log() if e.action == "dedupe")
    assert set(entry.item_ids) == {first.id, again.id, reworded.id}
    assert mem.dedupe().groups == []  # nothing left to merge


def test_search_no_longer_returns_the_copies(mem):
    first = _fact(mem, "Ann's cat is called Miso")
    copy = _fact(mem, "Ann's cat is called Miso", session="s2", day="2025-02-01")
    before = {h.item.id for h in mem.search("what is the cat called", user_id="ann")}
    assert {first.id, copy.id} <= before
    mem.dedupe()
    after = [h.item.id for h in mem.search("what is the cat called", user_id="ann")]
    assert first.id in after and copy.id not in after
    past = {h.item.id for h in mem.search("cat", user_id="ann", as_of="2025-03-01")}
    assert copy.id in past  # as_of before the merge still sees it


def test_near_misses_never_merged(mem):
    pairs = [("Ann likes tea", "Ann dislikes tea"), ("Ann likes tea", "Ann does not like tea"),
             ("Ann has 3 cats", "Ann has 4 cats"),
             ("Run the tests before merging", "Run the tests after merging"),
             ("Ann lives in Berlin", "Ann lives in Paris"),
             ("Ann has yoga on Monday", "Ann has yoga on Tuesday"),
             ("Ann prefers short answers", "Ann prefers long answers")]
    for n, (a, b) in enumerate(pairs):
        assert conflict(a, b) is not None, (a, b)
        _fact(mem, a, user=f"u{n}")
        _fact(mem, b, user=f"u{n}")
    assert mem.dedupe().groups == []


def test_swapped_value_not_merged_added_word_merged(mem):
    """One content word swapped for another is another fact; a word only added is not."""
    assert conflict("Ann is a nurse", "Ann is a pilot") == "substitution: nurs / pilot"
    assert conflict("Ann likes green tea", "Ann really likes green tea") is None
    nurse = _fact(mem, "Ann is a nurse")
    _fact(mem, "Ann is a pilot", session="s2", day="2025-02-01")
    tea = _fact(mem, "Ann likes green tea", user="bob")
    really = _fact(mem, "Ann really likes green tea", user="bob", session="s2",
                   day="2025-02-01")
    report = mem.dedupe(dry_run=True)
    assert [(g.kept, g.merged) for g in report.groups] == [(tea.id, [really.id])]
    assert nurse.id not in report.kept


def test_never_across_users_cubes_kinds_or_turns(mem):
    _fact(mem, "Likes oat milk in coffee", user="ann")
    _fact(mem, "Likes oat milk in coffee", user="bob")
    _fact(mem, "Likes oat milk in coffee", user="ann", cube="work")
    mem.add("Likes oat milk in coffee", kind="insight", user_id="ann", infer=False)
    for session in ("s1", "s2"):
        mem.add([{"role": "user", "content": "Likes oat milk in coffee"}], user_id="ann",
                session_id=session, infer=False)
    assert mem.dedupe().groups == []


def test_dry_run_writes_nothing(mem):
    first = _fact(mem, "Ann works at Acme as a nurse")
    copy = _fact(mem, "Ann is a nurse at Acme", session="s2", day="2025-02-01")
    audit = len(mem.audit_log(limit=1000))
    report = mem.dedupe(dry_run=True)
    assert report.dry_run and report.kept == [first.id] and report.merged == [copy.id]
    assert mem.get(copy.id).status == "active" and len(mem.history(copy.id)) == 1
    assert len(mem.audit_log(limit=1000)) == audit


def test_cli_and_maintain(mem):
    first = _fact(mem, "Ann is allergic to peanuts")
    copy = _fact(mem, "Ann is allergic to peanuts", session="s2", day="2025-02-01")
    other = _fact(mem, "Ann is allergic to peanuts", cube="work")
    copy2 = _fact(mem, "Ann is allergic to peanuts", cube="work", day="2025-02-01")
    target = str(mem.url or mem.path)  # the CLI opens the same store beside this Memory
    runner = CliRunner()
    base = ["--db", target, "--json"]
    out = runner.invoke(cli, [*base, "dedupe", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["counts"]["merged"] == 1
    out = runner.invoke(cli, [*base, "dedupe"])
    assert json.loads(out.output)["groups"][0]["kept"] == first.id
    out = runner.invoke(cli, [*base, "maintain", "--no-tiers"])  # the other cube's
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["dedupe"]["groups"][0]["merged"] == [copy2.id]
    out = runner.invoke(cli, [*base, "--cube", "work", "get", copy2.id])
    assert json.loads(out.output)["superseded_by"] == other.id
    out = runner.invoke(cli, [*base, "get", copy.id])
    assert json.loads(out.output)["status"] == "superseded"
