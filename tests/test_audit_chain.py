"""The audit log's hash chain: every write chained on both stores, and each kind of tampering
done outside memstack (editing the database directly) found by `memstack audit verify`."""

import json
import shutil
import sqlite3
import threading

import psycopg
import pytest
from click.testing import CliRunner

from memstack import Memory
from memstack.cli import cli
from memstack.store.chain import link


def _write_some(mem):
    added = mem.add("Ann's sister lives in Porto", user_id="ann").items[0]
    mem.add("Ann bought a kayak", user_id="ann")
    mem.update(added.id, "Ann's sister lives in Lisbon", reason="moved")
    mem.add("Bob plays chess", user_id="bob")
    mem.delete(added.id)
    mem.add("Ann plays the cello", user_id="ann")


def test_every_write_is_chained_and_the_chain_verifies_on_both_stores(mem, target, tmp_path,
                                                                       embedder):
    _write_some(mem)
    entries = mem.audit_log(limit=1000)
    assert len(entries) >= 6 and all(e.hash and len(e.hash) == 64 for e in entries)
    head = mem.audit_head()
    assert head["seq"] == entries[-1].seq and head["hash"] == entries[-1].hash
    report = mem.verify_audit(head)
    assert report.ok and report.entries == len(entries) and report.problem is None
    # a copy into the other kind of store keeps the chain (and the head still matches)
    other = tmp_path / "copy.db" if not str(target).endswith(".db") else None
    if other is not None:
        mem.migrate(other, files=tmp_path / "copy-files")
        with Memory(other, embedder=embedder, files=tmp_path / "copy-files") as copy:
            assert copy.verify_audit(head).ok
            copy.add("a write after the copy", user_id="ann")
            assert copy.verify_audit(head).ok


def test_writers_in_parallel_on_postgres_extend_one_chain(pg_url, embedder, tmp_path):
    mems = [Memory(pg_url, embedder=embedder, files=tmp_path) for _ in range(3)]

    def write(mem, n):
        for i in range(8):
            mem.add(f"note {n}-{i} about the garden", user_id=f"u{n}")

    threads = [threading.Thread(target=write, args=(m, n)) for n, m in enumerate(mems)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = mems[0].verify_audit()
    assert report.ok, report.message
    assert report.entries == len(mems[0].audit_log(limit=1000)) >= 24
    for mem in mems:
        mem.close()


# -- tampering with the SQLite file directly ------------------------------------------------


@pytest.fixture
def chained(tmp_path, embedder):
    """A store with a chained log, its exported head, and a CLI runner for copies of it."""
    path = tmp_path / "memory.db"
    with Memory(path, embedder=embedder) as mem:
        for i in range(6):
            mem.add(f"memory number {i} about boats", user_id="ann")
    runner = CliRunner()

    def verify(db, *args):
        return runner.invoke(cli, ["--db", str(db), "--json", "audit", "verify", *args],
                             catch_exceptions=False)

    head = tmp_path / "head.json"
    result = runner.invoke(cli, ["--db", str(path), "audit", "head", "-o", str(head)],
                           catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(head.read_text())["seq"] == 6
    return path, head, verify


def _tampered(path, statements, write=None):
    copy = path.with_name("tampered.db")
    shutil.copy(path, copy)
    conn = sqlite3.connect(copy)
    conn.execute("DROP TRIGGER audit_append_only_update")
    conn.execute("DROP TRIGGER audit_append_only_delete")
    for statement in statements:
        conn.execute(statement)
    if write:
        write(conn)
    conn.commit()
    conn.close()
    return copy


def _forge(conn, seq, after_seq):
    """Insert an entry with a correct hash after entry `after_seq` (0: the start; what a
    forger who read store/chain.py would write)."""
    prev = conn.execute("SELECT hash FROM audit WHERE seq = ?", (after_seq,)).fetchone()[0] \
        if after_seq else "0" * 64
    values = (1.0e9, "user:mallory", "add", "default", "[]", "{}")
    conn.execute("INSERT INTO audit (seq, at, actor, action, cube, item_ids, detail, prev, hash) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (seq, *values, prev, link(prev, *values)))


def _rechain_from(conn, seq):
    """Edit entry `seq` and recompute every hash from it on (a consistent forged chain)."""
    conn.execute("UPDATE audit SET actor = 'user:mallory' WHERE seq = ?", (seq,))
    prev = conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq - 1,)).fetchone()[0]
    for seq_, *values in conn.execute("SELECT seq, at, actor, action, cube, item_ids, detail "
                                      "FROM audit WHERE seq >= ? ORDER BY seq", (seq,)).fetchall():
        digest = link(prev, *values)
        conn.execute("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (prev, digest, seq_))
        prev = digest


TAMPERING = {
    "edited": (["UPDATE audit SET actor = 'user:mallory' WHERE seq = 3"], None, 3),
    "edited detail": (["UPDATE audit SET detail = '{\"reason\": \"nothing\"}' WHERE seq = 4"],
                      None, 4),
    "deleted": (["DELETE FROM audit WHERE seq = 3"], None, 4),
    "deleted first": (["DELETE FROM audit WHERE seq = 1"], None, 2),
    "inserted": (["UPDATE audit SET seq = seq + 10 WHERE seq >= 4",
                  "INSERT INTO audit (seq, at, actor, action, cube, item_ids, detail) "
                  "SELECT 4, at, 'user:mallory', action, cube, item_ids, detail FROM audit "
                  "WHERE seq = 3"], None, 4),
    "inserted with a forged hash": (["UPDATE audit SET seq = seq + 10 WHERE seq >= 4"],
                                    lambda c: _forge(c, 4, 3), 14),
    "reordered": (["UPDATE audit SET seq = 100 WHERE seq = 3", "UPDATE audit SET seq = 3 "
                   "WHERE seq = 4", "UPDATE audit SET seq = 4 WHERE seq = 100"], None, 3),
    "unchained": (["UPDATE audit SET hash = NULL WHERE seq = 5"], None, 5),
    "edited with its own hash recomputed": ([], lambda c: _rehash_one(c, 3), 3),
    "inserted at the start": (["UPDATE audit SET seq = seq + 10"], lambda c: _forge(c, 1, 0),
                              11),
}


def _rehash_one(conn, seq):
    """Edit entry `seq` and recompute its own hash (not the entries after it)."""
    conn.execute("UPDATE audit SET actor = 'user:mallory' WHERE seq = ?", (seq,))
    prev, *values = conn.execute("SELECT prev, at, actor, action, cube, item_ids, detail FROM "
                                 "audit WHERE seq = ?", (seq,)).fetchone()
    conn.execute("UPDATE audit SET hash = ? WHERE seq = ?", (link(prev, *values), seq))


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_verify_finds_each_kind_of_tampering_at_its_entry(chained, kind):
    path, _, verify = chained
    statements, write, seq = TAMPERING[kind]
    assert verify(path).exit_code == 0
    result = verify(_tampered(path, statements, write))
    report = json.loads(result.output)
    assert result.exit_code == 8 and not report["ok"]
    assert report["problem"] == kind.split(" ")[0] and report["seq"] == seq, report


def test_the_exported_head_catches_a_cut_tail_and_a_rewritten_chain(chained):
    path, head, verify = chained
    cut = _tampered(path, ["DELETE FROM audit WHERE seq >= 5"])
    assert verify(cut).exit_code == 0  # what is left is a valid chain ...
    report = json.loads(verify(cut, "--head", str(head)).output)
    assert report["problem"] == "truncated" and report["seq"] == 6  # ... but not the whole one
    rewritten = _tampered(path, [], lambda c: _rechain_from(c, 3))
    assert verify(rewritten).exit_code == 0
    result = verify(rewritten, "--head", str(head))
    assert result.exit_code == 8 and json.loads(result.output)["problem"] == "rewritten"


def test_a_bad_head_file_is_a_clear_error(chained, tmp_path):
    path, _, verify = chained
    bad = tmp_path / "bad.json"
    for text in ("not json", "[1, 2]", '{"seq": 3}', '{"seq": 3, "hash": "short"}'):
        bad.write_text(text)
        result = verify(path, "--head", str(bad))
        assert result.exit_code == 2 and "audit head" in result.output, result.output


def test_entries_written_before_the_chain_are_sealed_by_the_first_chained_one(tmp_path,
                                                                              embedder):
    path = tmp_path / "old.db"
    with Memory(path, embedder=embedder) as mem:
        mem.add("written by an older memstack", user_id="ann")
        mem.add("also written before the chain", user_id="ann")
    conn = sqlite3.connect(path)  # as a store of schema 8 had them: no links
    conn.execute("DROP TRIGGER audit_append_only_update")
    conn.execute("UPDATE audit SET prev = NULL, hash = NULL")
    conn.commit()
    conn.close()
    with Memory(path, embedder=embedder) as mem:
        mem.add("the first chained entry", user_id="ann")
        report = mem.verify_audit()
        assert report.ok and report.entries == 3
    conn = sqlite3.connect(path)
    conn.execute("UPDATE audit SET actor = 'user:mallory' WHERE seq = 1")
    conn.commit()
    conn.close()
    with Memory(path, embedder=embedder) as mem:
        report = mem.verify_audit()
        assert not report.ok and report.seq == 3  # the seal no longer matches what it covers


def test_tampering_on_postgres_is_found_too(pg_url, embedder, tmp_path):
    with Memory(pg_url, embedder=embedder, files=tmp_path) as mem:
        _write_some(mem)
        head = mem.audit_head()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the database's owner, outside
        conn.execute("ALTER TABLE audit DISABLE TRIGGER audit_append_only")
        conn.execute("UPDATE audit SET detail = '{}' WHERE seq = 2")
    with Memory(pg_url, embedder=embedder, files=tmp_path) as mem:
        report = mem.verify_audit(head)
        assert (report.ok, report.problem, report.seq) == (False, "edited", 2)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 2")
    with Memory(pg_url, embedder=embedder, files=tmp_path) as mem:
        report = mem.verify_audit(head)
        assert (report.ok, report.problem) == (False, "truncated")


def test_admins_read_the_head_and_verify_over_rest(server):
    import httpx

    admin = {"Authorization": f"Bearer {server.admin}"}
    user = {"Authorization": f"Bearer {server.key('ann')}"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/memories", headers=user, json={
            "messages": "Ann keeps bees", "user_id": "ann"}).status_code == 201
        head = http.get("/v1/audit/head", headers=admin).json()
        assert head["seq"] >= 1 and len(head["hash"]) == 64
        report = http.post("/v1/audit/verify", headers=admin, json={"head": head}).json()
        assert report["ok"] and report["entries"] == head["seq"]
        assert http.get("/v1/audit/head", headers=user).status_code == 403
        assert http.post("/v1/audit/verify", headers=admin,
                         json={"head": {"seq": 1, "hash": "xyz"}}).status_code == 422
        wrong = {"seq": head["seq"], "hash": "0" * 64}
        report = http.post("/v1/audit/verify", headers=admin, json={"head": wrong}).json()
        assert (report["ok"], report["problem"]) == (False, "rewritten")
