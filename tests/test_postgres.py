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


def test_one_connection_for_a_block_follows_the_wall_and_its_transactions(pg_url, embedder,
                                                                          tmp_path):
    """store.session() holds one pooled connection for a block (a search's reads): the wall
    set for the context still applies, a wall widened inside the block applies at once, and a
    transaction inside that rolls back leaves the connection as it found it."""
    with Memory(pg_url, embedder=embedder, files=tmp_path) as mem:
        mem.add("Ann keeps her passport in the red drawer", user_id="ann", cube="ann-cube")
        mem.add("Bob keeps his passport in the blue box", user_id="bob", cube="bob-cube")
        ann, bob = mem.store.cube("ann-cube").id, mem.store.cube("bob-cube").id
        with mem.store.restricted([ann]), mem.store.session() as held:
            assert mem.search("passport", cube="bob-cube") == []
            mem.store.widen(bob)
            assert "blue box" in mem.search("passport", cube="bob-cube")[0].item.content
            with pytest.raises(RuntimeError), mem.store.transaction():
                mem.store.conn.execute("SELECT set_config('memstack.cubes', '', false)")
                raise RuntimeError("roll back")
            assert "blue box" in mem.search("passport", cube="bob-cube")[0].item.content
            with mem.store.session() as inner:  # nests: the same connection
                assert inner is held


def test_a_busy_pool_does_not_check_each_connection_it_lends(pg_url, embedder, tmp_path,
                                                            monkeypatch):
    """The liveness round trip before each borrow is skipped for a connection that served a
    statement within the last second, and made for one idle longer (a restarted database)."""
    import time

    from psycopg_pool import ConnectionPool

    checks = []
    real = ConnectionPool.check_connection
    monkeypatch.setattr(ConnectionPool, "check_connection",
                        staticmethod(lambda conn: (checks.append(conn), real(conn))[1]))
    # no access statistics: their flush every second would borrow too
    with Memory(pg_url, embedder=embedder, files=tmp_path, track_access=False) as mem:
        mem.add("The boiler was serviced in March", user_id="ann")
        checks.clear()
        for _ in range(10):
            assert mem.search("boiler", user_id="ann")
        assert checks == []
        time.sleep(1.2)
        assert mem.search("boiler", user_id="ann")
        assert len(checks) >= 1


def test_the_planners_statistics_follow_a_store_that_fills(pg_url, embedder, tmp_path):
    """After a share of new keys the store runs ANALYZE (through the owner's function) in a
    thread: before it, PostgreSQL knows nothing of the table's size (reltuples -1)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        size = "SELECT reltuples FROM pg_class WHERE relname = 'keys'"
        with Memory(pg_url, embedder=embedder, files=tmp_path) as mem:
            assert conn.execute(size).fetchone()[0] < 0  # never analysed
            mem.store.statistics.least = 5
            mem.add([f"note {n} about the garden" for n in range(8)], user_id="ann")
            mem.store.statistics.wait()
            assert mem.store.statistics.runs == 1
            assert conn.execute(size).fetchone()[0] >= 8


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


def test_the_databases_wall_holds_for_mcp_calls_too(pg_url, embedder, tmp_path, monkeypatch):
    import asyncio

    from conftest import RunningServer
    from test_mcp import http_session, payload

    from memstack.server.auth import Keys

    with Memory(pg_url, embedder=embedder, files=tmp_path) as memory:
        running = RunningServer(memory, rate_limit=1000.0)
        try:
            alice, bob = running.key("alice"), running.key("bob")

            async def add(session):
                return payload(await session.call_tool("add_memory", {
                    "text": "alice's safe code is 7712", "user_id": "alice"}))

            async def search(session):
                return payload(await session.call_tool("search_memories", {
                    "query": "safe code", "cube": "~alice"}))

            asyncio.run(http_session(running.url, alice, add))
            monkeypatch.setattr(Keys, "require", lambda self, who, cube, need: None)
            assert asyncio.run(http_session(running.url, bob, search)) == []
            assert asyncio.run(http_session(running.url, alice, search))[0]["content"] \
                .endswith("7712")
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


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_two_servers_as_processes_share_one_database(pg_url, embedder, tmp_path):
    """`memstack serve --workers 2` and a second server on another port, on one database: a
    write one acknowledges is in the other's next search; a key's rate limit and its
    revocation hold in every process (the state is in the database)."""
    import httpx

    from memstack.bench.server import free_port, start
    from memstack.server.auth import Keys

    with Memory(pg_url, embedder=embedder, files=tmp_path) as memory:
        keys = Keys(memory.store)
        writer, reader = keys.create_key("ann"), keys.create_key("ann")
        admin = keys.create_key("root", role="admin")
    one, two = free_port(), free_port()
    servers = [start(pg_url, one, workers=2, rate_limit=0.001, files=tmp_path)]  # a burst of 1
    try:
        servers.append(start(pg_url, two, rate_limit=0.001, files=tmp_path))
        a, b = f"http://127.0.0.1:{one}", f"http://127.0.0.1:{two}"
        added = httpx.post(a + "/v1/memories", headers=_auth(writer.token), timeout=60, json={
            "messages": "The spare key is under the blue flowerpot", "user_id": "ann"})
        assert added.status_code == 201
        found = httpx.post(b + "/v1/search", headers=_auth(reader.token), timeout=60,
                           json={"query": "where is the spare key", "user_id": "ann"})
        assert found.status_code == 200
        assert found.json()["results"][0]["id"] == added.json()["results"][0]["id"]
        again = httpx.post(b + "/v1/search", headers=_auth(writer.token), timeout=60,
                           json={"query": "spare key", "user_id": "ann"})
        assert again.status_code == 429  # the writer's one request was spent on the other server
        revoked = httpx.delete(f"{a}/v1/keys/{reader.key_id}", headers=_auth(admin.token))
        assert revoked.status_code == 200
        refused = httpx.get(b + "/v1/cubes", headers=_auth(reader.token))
        assert refused.status_code == 401
    finally:
        for process in servers:
            process.terminate()
            process.wait(timeout=30)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_server_restarted_under_load_loses_no_acknowledged_write(pg_url, embedder, tmp_path,
                                                                   how):
    """Clients keep adding through two server processes while one is stopped (SIGTERM: a
    graceful stop; SIGKILL: killed mid-request) and started again, twice: every add that got
    a 201 is in the database afterwards, and is found; a killed request left nothing half
    written (each stored turn has its keys and its first version)."""
    import asyncio
    import signal

    import httpx

    from memstack.bench.server import free_port, start
    from memstack.server.auth import Keys

    with Memory(pg_url, embedder=embedder, files=tmp_path) as memory:
        token = Keys(memory.store).create_key("ann").token
    ports = [free_port(), free_port()]
    servers = [start(pg_url, port, files=tmp_path) for port in ports]
    acknowledged: list[str] = []
    answers: dict[int, int] = {}
    odd: list[str] = []

    async def client(n: int, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            k = 0
            while not stop.is_set():
                k += 1
                try:
                    r = await http.post(f"http://127.0.0.1:{ports[k % 2]}/v1/memories",
                                        headers=_auth(token), json={
                                            "messages": f"client {n} note {k}", "user_id": "ann",
                                            "session_id": f"c{n}"})
                    answers[r.status_code] = answers.get(r.status_code, 0) + 1
                    if r.status_code not in (201, 503):
                        odd.append(r.text)
                    if r.status_code == 201:
                        acknowledged.append(r.json()["results"][0]["id"])
                except httpx.HTTPError:  # refused while the server is down
                    answers[0] = answers.get(0, 0) + 1
                    await asyncio.sleep(0.05)

    async def load() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(client(n, stop)) for n in range(4)]
        for _ in range(2):
            await asyncio.sleep(3)
            servers[0].send_signal(getattr(signal, how))
            await asyncio.to_thread(servers[0].wait, 30)
            odd.append(servers[0].log.read_text()[-3000:])
            servers[0] = await asyncio.to_thread(start, pg_url, ports[0], files=tmp_path)
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(load())
    finally:
        for process in servers:
            process.terminate()
            process.wait(timeout=30)
            odd.append(process.log.read_text()[-3000:])
    assert len(acknowledged) > 20 and answers.get(201) == len(acknowledged), (answers, odd[:3])
    assert set(answers) <= {0, 201, 503}, odd  # refused, or failed whole: never half done
    with Memory(pg_url, embedder=embedder, files=tmp_path) as memory:
        stored = {i.id: i for i in memory.get_all(user_id="ann", cube="~ann", limit=100_000)}
        assert not [i for i in acknowledged if i not in stored]
        turns = [i for i in stored.values() if i.kind == "turn"]
        if how == "SIGTERM":
            assert len(turns) == len(acknowledged)  # a graceful stop answers what it committed
        else:  # a kill may cut the answer of a committed add: never the add itself
            assert len(turns) >= len(acknowledged)
        with psycopg.connect(pg_url) as conn:  # a superuser: row-level security aside
            half = conn.execute(
                "SELECT count(*) FROM items i WHERE i.kind = 'turn' AND (NOT EXISTS (SELECT 1 "
                "FROM keys k WHERE k.item_rowid = i.rowid AND k.role = 'body' AND k.vec IS NOT "
                "NULL) OR NOT EXISTS (SELECT 1 FROM versions v WHERE v.item_rowid = i.rowid))"
            ).fetchone()[0]
        assert half == 0
        last = memory.search(stored[acknowledged[-1]].content, user_id="ann", cube="~ann",
                             top_k=1)
        assert last[0].item.id == acknowledged[-1]


def test_losing_the_database_mid_run_fails_calls_cleanly_and_reconnects(embedder, tmp_path):
    """PostgreSQL stops under a running store and server: calls fail with
    StoreUnavailableError (503 store_unavailable over REST), nothing is half-written; once it is
    back the pool reconnects by itself and every acknowledged write is there."""
    import time

    import httpx
    import pgserver
    from conftest import RunningServer

    from memstack import StoreUnavailableError

    database = pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")  # a server of its own
    try:
        url = database.get_uri("postgres")
        with Memory(url, embedder=embedder, files=tmp_path / "files") as memory:
            server = RunningServer(memory, rate_limit=1000.0)
            try:
                key = _auth(server.key("ann"))
                kept = [memory.add("The boiler was serviced in March", user_id="ann").ids[0]]
                pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=database.pgdata,
                                user=database.system_user)
                with pytest.raises(StoreUnavailableError):
                    memory.add("This write cannot happen now", user_id="ann")
                with pytest.raises(StoreUnavailableError):
                    memory.search("boiler", user_id="ann")
                down = httpx.post(server.url + "/v1/memories", headers=key, timeout=60,
                                  json={"messages": "Nor can this one", "user_id": "ann"})
                assert down.status_code == 503
                assert down.json()["error"]["code"] == "store_unavailable"
                database.ensure_postgres_running()
                # the pool reconnects by itself, after its back-off (seconds): the same Memory
                # and server, no restart of either
                deadline = time.monotonic() + 90
                while True:
                    try:
                        kept.append(memory.add("The gutters were cleaned in May",
                                               user_id="ann").ids[0])
                        break
                    except StoreUnavailableError:
                        assert time.monotonic() < deadline, "the pool never reconnected"
                up = httpx.post(server.url + "/v1/memories", headers=key, timeout=60,
                                json={"messages": "The roof was checked in June", "user_id": "ann"})
                assert up.status_code == 201
                kept.append(up.json()["results"][0]["id"])
                assert all(memory.get(i).content for i in kept)
                with psycopg.connect(url) as conn:  # a superuser: row-level security aside
                    turns = conn.execute("SELECT content FROM items WHERE kind = 'turn'").fetchall()
                assert sorted(t for (t,) in turns) == sorted(memory.get(i).content for i in kept)
                assert memory.search("boiler service", user_id="ann")[0].item.id == kept[0]
            finally:
                server.stop()
    finally:
        database.cleanup()


def test_a_read_replica_serves_reads_and_refuses_writes(embedder, tmp_path):
    """A real streaming replica (pg_basebackup -R of a primary, both from pgserver): a Memory
    opened on it with read_only=True finds what the primary stored, sees the primary's later
    writes after replay, and refuses writes with ReadOnlyStoreError."""
    import os
    import pwd
    import time
    from urllib.parse import parse_qs, urlparse

    import pgserver

    from memstack import ReadOnlyStoreError

    primary = pgserver.get_server(tmp_path / "primary", cleanup_mode="stop")
    replica = None
    try:
        url = primary.get_uri("postgres")
        with Memory(url, embedder=embedder, files=tmp_path / "files") as mem:
            kept = mem.add("The spare tyre is in the boot", user_id="ann").ids[0]
        copy = tmp_path / "replica"
        copy.mkdir(mode=0o700)
        if primary.system_user:  # as root, pgserver runs PostgreSQL as a user of its own
            entry = pwd.getpwnam(primary.system_user)
            os.chown(copy, entry.pw_uid, entry.pw_gid)
        host = parse_qs(urlparse(url).query)["host"][0]
        pgserver.pg_basebackup(["-D", str(copy), "-R", "-X", "stream", "-c", "fast", "-h",
                                host, "-U", "postgres"], user=primary.system_user)
        for stale in copy.glob(".s.PGSQL.*"):  # the primary's socket lock (its socket dir is
            stale.unlink()                     # its data directory), copied with the files
        replica = pgserver.get_server(copy, cleanup_mode="stop")
        with psycopg.connect(replica.get_uri("postgres")) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]  # a standby
        with pytest.raises(ReadOnlyStoreError, match="read_only=True"):
            Memory(replica.get_uri("postgres"), embedder=embedder, files=tmp_path / "files")
        with Memory(replica.get_uri("postgres"), embedder=embedder, files=tmp_path / "files",
                    read_only=True) as ro:
            assert ro.search("where is the spare tyre", user_id="ann")[0].item.id == kept
            with pytest.raises(ReadOnlyStoreError, match="primary"):
                ro.add("This goes nowhere", user_id="ann")
            with pytest.raises(ReadOnlyStoreError):
                ro.delete(kept)
            with Memory(url, embedder=embedder, files=tmp_path / "files") as mem:
                later = mem.add("The jack is under the back seat", user_id="ann").ids[0]
            deadline = time.monotonic() + 30
            while not [i for i in ro.get_all(user_id="ann") if i.id == later]:
                assert time.monotonic() < deadline, "the replica never replayed the write"
                time.sleep(0.2)
            assert ro.search("where is the jack", user_id="ann")[0].item.id == later
    finally:
        if replica is not None:
            replica.cleanup()
        primary.cleanup()
