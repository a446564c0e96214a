"""What only the PostgreSQL store has to prove (the shared contract runs on both stores through
the `mem` fixture): deletion leaves no bytes in the data directory after scrub(), processes
share one database, the database enforces the audit log, and faults give clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from memstack import InvalidInputError, Memory, SchemaVersionError, StoreError


def _files_holding(folder: Path, needles: dict[str, bytes]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {name: [] for name in needles}
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:  # a file removed while we walk (a WAL segment)
            continue
        for name, needle in needles.items():
            if needle in data:
                found[name].append(str(path.relative_to(folder)))
    return found


def test_deleted_text_and_vector_leave_the_data_directory(pg_server, pg_url, embedder, tmp_path):
    secret = "My locker code is quokka-7731-saffron"
    with Memory(pg_url, embedder=embedder, files=tmp_path) as mem:
        doomed = mem.add(secret, user_id="ann", session_id="s1").ids[0]
        for n in range(30):
            mem.add(f"filler note {n} about gardening and tomatoes", user_id="bob")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            register_vector(conn)
            [vector] = conn.execute("SELECT k.vec FROM keys k JOIN items i ON i.rowid = "
                                    "k.item_rowid WHERE i.id = %s", (doomed,)).fetchone()
            conn.execute("CHECKPOINT")
        # pgvector stores a vector as its float32 values after a small header
        needles = {"text": b"quokka-7731-saffron",
                   "vector": np.asarray(vector.to_numpy(), np.float32)[:16].tobytes()}
        before = _files_holding(Path(pg_server.pgdata), needles)
        assert before["text"] and before["vector"], "the scan must see them before the delete"

        assert mem.delete(doomed) == 1
        assert not [h for h in mem.search("locker code", user_id="ann")
                    if "quokka" in (h.item.content or "")]
        report = mem.scrub()
    assert report["complete"] and report["wal_recycle"] == "off"
    after = _files_holding(Path(pg_server.pgdata), needles)
    assert after == {"text": [], "vector": []}, after


def test_two_processes_share_one_database(pg_url, embedder, tmp_path):
    with Memory(pg_url, embedder=embedder, files=tmp_path) as one, \
            Memory(pg_url, embedder=embedder, files=tmp_path) as two:
        one.add("Ann's sister lives in Porto", user_id="ann")
        # the other pool, no file to reload: the next search sees the write
        assert "Porto" in two.search("where does the sister live", user_id="ann")[0].item.content
        item = two.add("Ann's brother lives in Lyon", user_id="ann").items[0]
        assert one.get(item.id).content == item.content


def test_the_database_keeps_the_audit_log_append_only(pg_url, embedder, tmp_path):
    with Memory(pg_url, embedder=embedder, files=tmp_path) as mem:
        mem.add("a memory", user_id="ann")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for statement in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit",
                          "TRUNCATE audit"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)
        assert conn.execute("SELECT count(*) FROM audit").fetchone()[0] >= 1


def test_an_unreachable_database_is_a_clear_error_without_the_password(embedder):
    url = "postgresql://memstack:hunter2secret@127.0.0.1:1/memory"
    with pytest.raises(StoreError) as info:
        Memory(url, embedder=embedder)
    message = str(info.value)
    assert "127.0.0.1" in message and "hunter2secret" not in message and "***" in message


def test_a_wrong_scheme_and_a_newer_schema_are_clear_errors(pg_url, embedder, tmp_path):
    with pytest.raises(InvalidInputError, match="mysql://"):
        Memory("mysql://root@localhost/memory", embedder=embedder)
    with Memory(pg_url, embedder=embedder, files=tmp_path):
        pass
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE memstack_schema SET version = 99")
    with pytest.raises(SchemaVersionError, match="99"):
        Memory(pg_url, embedder=embedder, files=tmp_path)


def test_a_database_of_other_tables_is_refused(pg_url, embedder, tmp_path):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (x int)")
    with pytest.raises(StoreError, match="not a memstack database"):
        Memory(pg_url, embedder=embedder, files=tmp_path)


def test_row_level_security_is_a_second_wall_by_cube(pg_url, embedder, tmp_path):
    from memstack import ItemNotFoundError

    with Memory(pg_url, embedder=embedder, files=tmp_path) as mem:
        mine = mem.add("Ann keeps her passport in the red drawer", user_id="ann",
                       cube="ann-cube").ids[0]
        theirs = mem.add("Bob keeps his passport in the blue box", user_id="bob",
                         cube="bob-cube").ids[0]
        ann, bob = mem.store.cube("ann-cube").id, mem.store.cube("bob-cube").id
        with mem.store.restricted([ann]):
            # even a call that names the other cube, or its item, meets the database's wall
            assert mem.search("passport", cube="bob-cube") == []
            with pytest.raises(ItemNotFoundError):
                mem.get(theirs)
            assert mem.get(mine).content.startswith("Ann")
        assert mem.get(theirs).content.startswith("Bob")  # outside the block: all cubes
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SET ROLE memstack_app")  # the role the store's statements run as
        counts = "SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM keys), " \
                 "(SELECT count(*) FROM versions)"
        assert conn.execute(counts).fetchone() == (0, 0, 0)  # no cube setting: nothing
        conn.execute("SELECT set_config('memstack.cubes', %s, false)", (str(ann),))
        cubes = {r[0] for r in conn.execute("SELECT DISTINCT cube_id FROM items")}
        assert cubes == {ann} and bob not in cubes
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO grants (cube_id, user_id, access, granted_by, granted_at) "
                         "VALUES (%s, 'x', 'read', 'x', 0)", (bob,))


def test_the_databases_wall_holds_when_the_servers_check_has_a_bug(pg_url, embedder, tmp_path,
                                                                    monkeypatch):
    from conftest import RunningServer

    from memstack import Client
    from memstack.server.auth import Keys

    with Memory(pg_url, embedder=embedder, files=tmp_path) as memory:
        running = RunningServer(memory, rate_limit=1000.0)
        try:
            alice, bob = Client(running.url, running.key("alice")), \
                Client(running.url, running.key("bob"))
            alice.add("alice's launch code is 0417", user_id="alice")
            # the first wall breaks: every access check passes
            monkeypatch.setattr(Keys, "require", lambda self, who, cube, need: None)
            assert bob.search("launch code", cube="~alice") == []  # the database hid the rows
            assert alice.search("launch code", cube="~alice")[0].item.content.endswith("0417")
        finally:
            running.stop()


def _contents(mem):
    return {
        "items": [(i.id, i.kind, i.content, i.status, i.version, i.user_id, i.session_id,
                   i.parent_id, i.metadata, i.source_ids, i.valid_to)
                  for c in mem.cubes() for i in mem.get_all(cube=c.name, limit=10_000,
                                                            include_inactive=True)],
        "cubes": [(c.name, c.owner, c.embed_model, c.embed_dim) for c in mem.cubes()],
    }


def test_migrate_round_trip_is_exact(db_path, pg_url, embedder, tmp_path):
    other = tmp_path / "back.db"
    with Memory(db_path, embedder=embedder) as mem:
        mem.add([{"role": "user", "name": "Ann", "content": "I always take the night train"},
                 {"role": "assistant", "content": "Noted: night trains."}],
                user_id="ann", session_id="s1", observed_at="2024-05-01")
        fact = mem.add("Ann lives in Porto", user_id="ann", kind="fact").ids[0]
        mem.update(fact, "Ann lives in Lisbon")
        gone = mem.add("a note to forget", user_id="bob", cube="bobs").ids[0]
        mem.delete(gone)
        before = _contents(mem)
        history = mem.history(fact)
        hits = [(h.item.id, round(h.score, 6)) for h in mem.search("night train", user_id="ann")]
        audit = [(a.seq, a.action, a.item_ids) for a in mem.audit_log(limit=1000)]
        counts = mem.migrate(pg_url, files=tmp_path)
    assert counts["items"] == len(before["items"]) + 1  # the tombstone's row is copied too
    with Memory(pg_url, embedder=embedder, files=tmp_path) as pg:
        assert _contents(pg) == before and pg.history(fact) == history
        assert [(h.item.id, round(h.score, 6)) for h in pg.search("night train",
                                                                   user_id="ann")] == hits
        assert [(a.seq, a.action, a.item_ids) for a in pg.audit_log(limit=1000)][:-1] == audit
        pg.migrate(other)
    with Memory(other, embedder=embedder) as back:
        assert _contents(back) == before and back.history(fact) == history
        assert [(h.item.id, round(h.score, 6)) for h in back.search("night train",
                                                                     user_id="ann")] == hits


def test_one_url_everywhere_in_the_cli(db_path, pg_url, embedder, tmp_path):
    from click.testing import CliRunner

    from memstack.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    assert run("--db", db_path, "add", "I keep bees on the roof", "--user", "ann").exit_code == 0
    moved = run("--json", "migrate", db_path, pg_url)
    assert moved.exit_code == 0 and json.loads(moved.output)["items"] == 2  # turn + session
    found = run("--db", pg_url, "--json", "search", "bees", "--user", "ann")
    assert "roof" in json.loads(found.output)[0]["content"]
    scrubbed = run("--db", pg_url, "--json", "scrub")
    assert scrubbed.exit_code == 0 and json.loads(scrubbed.output)["complete"] is True
    down = run("--db", "postgresql://ann:sekrit-pw@127.0.0.1:1/none", "stats")
    assert down.exit_code == 4 and "sekrit-pw" not in down.output and "127.0.0.1" in down.output


def test_rate_limits_hold_across_servers_on_one_database(pg_url, embedder, tmp_path):
    import httpx
    from conftest import RunningServer

    with Memory(pg_url, embedder=embedder, files=tmp_path) as one, \
            Memory(pg_url, embedder=embedder, files=tmp_path) as two:
        a = RunningServer(one, rate_limit=0.2)  # a burst of 1, then one request per 5 s
        b = RunningServer(two, rate_limit=0.2)
        try:
            key = {"Authorization": f"Bearer {a.key('eve')}"}
            codes = [httpx.get(server.url + "/v1/cubes", headers=key).status_code
                     for server in (a, b, a)]
            assert codes == [200, 429, 429]  # one bucket for the key, whichever server answers
            other = {"Authorization": f"Bearer {b.key('eve2')}"}
            assert httpx.get(b.url + "/v1/cubes", headers=other).status_code == 200
            # a key revoked through one server is refused by the other at once
            from memstack.server.auth import Keys

            Keys(one.store).revoke(key["Authorization"].split("_")[1])
            assert httpx.get(b.url + "/v1/cubes", headers=key).status_code == 401
        finally:
            a.stop()
            b.stop()


def test_the_speed_bench_runs_on_postgres(pg_url, embedder, tmp_path):
    from memstack.bench import speed

    result = speed.run(120, embedder=embedder, workdir=tmp_path, queries_count=10, db=pg_url)
    assert result["ingest_items_per_second"] > 0 and result["search_latency_ms"]["p50"] > 0
    assert result["disk_bytes"] > 1_000_000 and result["store"].startswith("postgresql://")
    again = speed.run(120, embedder=embedder, workdir=tmp_path, queries_count=10, db=pg_url,
                      reuse=True)
    assert again["ingest_seconds"] is None  # searched the corpus already there
