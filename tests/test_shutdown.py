"""`memstack serve` stopped under load and started again on the same SQLite file, several times.

SIGTERM lets the requests in flight finish and refuses the others cleanly: the connection is
refused, or closed or reset before any answer, never a 5xx or a cut body; every add it
committed was answered, and it saves the vector indexes on its way out. SIGKILL (of
every server process) may cut answers, never an acknowledged write: SQLite commits before the
201, and the vector index catches up with the database when it is next opened. Afterwards every
add that got a 201 is there, and each cube's vector index holds exactly its stored vectors.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from memstack import Memory
from memstack.bench.server import free_port, start
from memstack.server.auth import Keys

CLIENTS = 4
PRELOAD = 40
LOAD_SECONDS = 3.0
THINGS = ["a red bicycle", "the garden shed", "a sourdough starter", "the piano lessons",
          "a trip to Lisbon", "the leaking tap", "a chess club", "the vegetable patch"]
VERBS = ["fixed", "talked about", "booked", "cleaned", "sold", "started", "painted", "found"]


@dataclass
class Tally:
    """Every answer of every cycle: outcome counts, and the adds that got a 201."""

    outcomes: dict[int, Counter] = field(default_factory=dict)  # cycle -> outcome -> count
    # (cycle, client, id, text) of each add that got a 201
    acknowledged: list[tuple[int, int, str, str]] = field(default_factory=list)
    odd: list[str] = field(default_factory=list)  # bodies of answers no stop may give
    stop_seconds: dict[int, float] = field(default_factory=dict)

    def count(self, cycle: int, outcome: str) -> None:
        self.outcomes.setdefault(cycle, Counter())[outcome] += 1


@pytest.mark.slow
@pytest.mark.parametrize("workers,stops", [(1, ("SIGTERM", "SIGKILL", "SIGTERM")),
                                           (2, ("SIGKILL", "SIGTERM"))])
def test_stops_under_load_lose_no_acknowledged_write(tmp_path, embedder, workers, stops):
    db = tmp_path / "memory.db"
    tokens = _prepare(db, embedder, tmp_path)
    port, tally = free_port(), Tally()
    for cycle, how in enumerate(stops):
        server = start(str(db), port, workers=workers, files=tmp_path)
        try:
            _all_serving(server, f"http://127.0.0.1:{port}")
            assert asyncio.run(_missing(f"http://127.0.0.1:{port}", tokens, tally)) == []
            asyncio.run(_cycle(server, f"http://127.0.0.1:{port}", tokens, cycle, how, tally))
        finally:
            _kill(server)
        outcomes = tally.outcomes[cycle]
        if how == "SIGTERM":
            assert server.returncode in (0, -signal.SIGTERM), server.log.read_text()[-3000:]
            assert set(outcomes) <= {"ok", "refused", "closed", "reset"}, outcomes
        assert not tally.odd, tally.odd  # no error status, whatever the stop
        assert outcomes["ok"] > 20 and outcomes["refused"] > 0, outcomes
    report = {"workers": workers, "stops": stops, "acknowledged": len(tally.acknowledged),
              "per_cycle": {c: dict(o) for c, o in tally.outcomes.items()},
              "stop_seconds": tally.stop_seconds}
    print(json.dumps(report))  # the counts docs/server.md quotes
    if workers == 1:  # one process saved the indexes last: the files match the database
        _check_saved_indexes(db)
    _check_store(db, embedder, tmp_path, tally, stops)


def _prepare(db: Path, embedder, files: Path) -> list[str]:
    """A key and a cube per client, and PRELOAD memories spread over the cubes."""
    rng = random.Random(0)
    with Memory(db, embedder=embedder, files=files) as memory:
        tokens = [Keys(memory.store).create_key(f"client{n}").token for n in range(CLIENTS)]
        for n in range(CLIENTS):
            memory.create_cube(f"~client{n}", owner=f"client{n}")
        for k in range(PRELOAD):
            memory.add(_text(rng, k % CLIENTS, k), user_id=f"client{k % CLIENTS}",
                       cube=f"~client{k % CLIENTS}", session_id="preload")
    return tokens


def _text(rng: random.Random, client: int, k: int) -> str:
    return f"Client {client} note {k}: I {rng.choice(VERBS)} {rng.choice(THINGS)}."


async def _cycle(server, url: str, tokens: list[str], cycle: int, how: str, tally: Tally
                 ) -> None:
    """Clients add and search for LOAD_SECONDS, then the server gets `how`; they go on until
    it has exited, and half a second longer (those requests are refused)."""
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        clients = [asyncio.create_task(_client(http, n, token, cycle, stop, tally))
                   for n, token in enumerate(tokens)]
        await asyncio.sleep(LOAD_SECONDS)
        started = time.monotonic()
        await asyncio.to_thread(_signal, server, how)
        tally.stop_seconds[cycle] = round(time.monotonic() - started, 2)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)


async def _client(http: httpx.AsyncClient, n: int, token: str, cycle: int,
                  stop: asyncio.Event, tally: Tally) -> None:
    rng, k = random.Random(f"{cycle}-{n}"), 0
    while not stop.is_set():
        k += 1
        text = _text(rng, n, 1000 * (cycle + 1) + k)
        adding = rng.random() < 0.5
        try:
            if adding:
                response = await http.post("/v1/memories", headers=_auth(token), json={
                    "messages": [{"role": "user", "content": text}], "user_id": f"client{n}",
                    "session_id": f"load-{cycle}"})
            else:
                response = await http.post("/v1/search", headers=_auth(token),
                                           json={"query": text, "top_k": 5})
        except httpx.HTTPError as exc:
            tally.count(cycle, _failure(exc))
            await asyncio.sleep(0.05)
            continue
        tally.count(cycle, _outcome(response, tally))
        if adding and response.status_code == 201:
            tally.acknowledged.append((cycle, n, response.json()["results"][0]["id"], text))


def _failure(exc: httpx.HTTPError) -> str:
    """refused: no connection; closed: the server closed the connection before any answer
    (an idle keep-alive connection at shutdown); reset: a connection reset (one the kernel
    had queued and the server never accepted); else the answer was cut or never came."""
    if isinstance(exc, httpx.ConnectError):
        return "refused"
    if isinstance(exc, httpx.RemoteProtocolError) and "without sending a response" in str(exc):
        return "closed"
    if isinstance(exc, httpx.ReadError):
        return "reset"
    return f"broken ({type(exc).__name__}: {exc})"


def _outcome(response: httpx.Response, tally: Tally) -> str:
    if response.is_success:
        response.json()  # the whole body came
        return "ok"
    tally.odd.append(f"{response.status_code} {response.text[:300]}")
    return str(response.status_code)


def _signal(server, how: str) -> None:
    """SIGTERM to the server (a supervisor passes it on to its workers); SIGKILL to every
    process of it, as the kernel's OOM killer or `systemctl kill` would. Waits for them all."""
    family = [server.pid, *_descendants(server.pid)]
    for pid in family if how == "SIGKILL" else family[:1]:
        os.kill(pid, getattr(signal, how))
    server.wait(timeout=90)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in family[1:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in family[1:] if _alive(pid)], "a worker outlived its supervisor"


def _all_serving(server, url: str, seconds: float = 240) -> None:
    """start() returns once one worker answers; the others may still be loading the model.
    Each worker that serves takes some of many connections opened at once."""
    workers = [pid for pid in _descendants(server.pid)
               if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    deadline = time.monotonic() + seconds
    while workers:
        before = {pid: _sockets(pid) for pid in workers}
        with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: http.get("/v1/health"), range(32)))
            if all(_sockets(pid) - before[pid] for pid in workers):
                return
        assert time.monotonic() < deadline, "a worker did not start serving"
        time.sleep(1)


def _sockets(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.add(os.readlink(fd))
        except FileNotFoundError:  # closed meanwhile
            pass
    return {f for f in found if f.startswith("socket:")}


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split()
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _kill(server) -> None:
    """After a failure: nothing of the server may outlive the test."""
    if server.poll() is None:
        for pid in [server.pid, *_descendants(server.pid)]:
            os.kill(pid, signal.SIGKILL)
        server.wait()


async def _missing(url: str, tokens: list[str], tally: Tally) -> list[str]:
    """The acknowledged adds a restarted server does not give back, with their text, by id."""
    limit = asyncio.Semaphore(8)

    async def one(http: httpx.AsyncClient, n: int, item_id: str, text: str) -> str | None:
        async with limit:
            response = await http.get(f"/v1/memories/{item_id}", headers=_auth(tokens[n]))
        ok = response.status_code == 200 and response.json()["content"] == text
        return None if ok else f"{item_id}: {response.status_code} {response.text[:200]}"

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        found = await asyncio.gather(*(one(http, n, i, t) for _, n, i, t in tally.acknowledged))
    return [f for f in found if f is not None]


def _check_saved_indexes(db: Path) -> None:
    """After the last SIGTERM the index files are the ones the server saved at its close: each
    lists exactly the cube's vectors at the cube's generation (no repair needed at next open)."""
    import sqlite3

    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        for cube_id, generation in conn.execute("SELECT id, generation FROM cubes"):
            live = {r[0] for r in conn.execute(
                "SELECT k.rowid FROM keys k JOIN items i ON i.rowid = k.item_rowid "
                "WHERE i.cube_id = ? AND k.vec IS NOT NULL", (cube_id,))}
            header = Path(f"{db}.vec") / f"cube-{cube_id}.json"
            if not live:
                continue
            saved = json.loads(header.read_text())
            assert (saved["generation"], set(saved["live"])) == (generation, live), cube_id
    finally:
        conn.close()


def _check_store(db: Path, embedder, files: Path, tally: Tally, stops: tuple[str, ...]) -> None:
    """Every acknowledged add is stored with its text; a graceful stop answered every add it
    committed; the store is sound and each cube's index holds exactly its stored vectors, each
    found by a search for itself."""
    with Memory(db, embedder=embedder, files=files) as memory:
        for _, _, item_id, text in tally.acknowledged:
            assert memory.get(item_id).content == text
        stored = Counter(item.session_id for n in range(CLIENTS) for item in memory.get_all(
            user_id=f"client{n}", cube=f"~client{n}", kinds=["turn"], limit=100_000))
        answered = Counter(f"load-{cycle}" for cycle, *_ in tally.acknowledged)
        for cycle, how in enumerate(stops):
            if how == "SIGTERM":  # nothing committed and left unanswered
                assert stored[f"load-{cycle}"] == answered[f"load-{cycle}"], cycle
            else:  # a kill may cut the answer of a committed add: never the add itself
                assert stored[f"load-{cycle}"] >= answered[f"load-{cycle}"], cycle
        checks = memory.store.integrity()
        assert checks["database"] == "ok" and checks["full_text"] == "ok", checks
        assert all(v["match"] for v in checks["vector_index"].values()), checks["vector_index"]
        for cube in memory.cubes():
            _check_index(memory.store, memory.store.cube(cube.name).id)


def _check_index(store, cube_id: int) -> None:
    """The graph itself, not only its list of keys: each stored vector finds its own key."""
    index = store.indexes.get(cube_id)
    for keys, vectors in store.vectors(cube_id, None):
        for key, vector in zip(keys, vectors):
            assert int(key) in [k for k, _ in index.search(vector, 10)], (cube_id, int(key))


def test_workers_saving_one_index_at_once_leave_a_whole_one(tmp_path):
    """Two workers stop at once and each saves its own view of a cube's index (the same count
    of keys, not the same keys): whichever save is on disk, the index opened from it and
    caught up with the store finds every stored vector (a header listing the keys of the
    other worker's graph would leave some unfindable, and say nothing)."""
    import multiprocessing

    from memstack.index import HnswIndex

    vectors = _unit(np.random.default_rng(0).standard_normal((800, 64)))  # key k: row k - 1
    views = [list(range(1, 601)) + list(range(601, 701)),   # what each worker has seen
             list(range(1, 601)) + list(range(701, 801))]
    path = tmp_path / "cube-1.hnsw"
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(3)
    workers = [spawn.Process(target=_save_rounds, args=(path, view, vectors, barrier, 15))
               for view in views]
    for worker in workers:
        worker.start()
    try:
        for _ in range(15):
            barrier.wait(60)  # both save at once
            barrier.wait(60)  # both saved
            index = HnswIndex(path, 64)
            index.open(set(range(1, 801)), 1, lambda keys: iter([(np.array(keys),
                                                                  vectors[np.array(keys) - 1])]))
            lost = [k for k in range(1, 801) if k not in [h for h, _ in index.search(
                vectors[k - 1], 5)]]
            assert not lost, f"{len(lost)} stored vectors are not in the index"
    finally:
        barrier.abort()  # a worker still waiting stops
        for worker in workers:
            worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0], "a save failed"


def _save_rounds(path: Path, keys: list[int], vectors, barrier, rounds: int) -> None:
    from memstack.index import HnswIndex

    index = HnswIndex(path, vectors.shape[1])
    index.open(set(), 0, lambda keys: iter(()))
    index.add(np.array(keys), vectors[np.array(keys) - 1])
    failed = 0
    for _ in range(rounds):
        barrier.wait(60)
        index.add(np.array(keys[:1]), vectors[keys[0] - 1:keys[0]])  # changed: saved again
        try:
            index.save()
        except OSError:  # another save took the file away: counted, and the rounds go on
            failed += 1
        barrier.wait(60)
    sys.exit(1 if failed else 0)


def _unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
