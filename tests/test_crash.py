"""SIGKILL in the middle of a bulk add, many times: every add that returned is complete, none is
partial, and the vector index agrees with the store after reopening."""

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memstack import Memory

HERE = Path(__file__).parent


@pytest.mark.slow
def test_sigkill_during_bulk_add(db_path, embedder):
    rng = random.Random(7)
    acknowledged: list[str] = []
    start = 0
    for round_ in range(8):
        child = subprocess.Popen([sys.executable, str(HERE / "crash_writer.py"), str(db_path),
                                  str(start)], stdout=subprocess.PIPE, text=True)
        done: list[str] = []
        reader = threading.Thread(target=lambda: done.extend(child.stdout), daemon=True)
        reader.start()
        started = time.monotonic()
        while not done and time.monotonic() - started < 600:  # the model load, slow under load
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 3.0))  # then kill at a random moment of the bulk add
        child.send_signal(signal.SIGKILL)
        child.wait()
        reader.join()
        done = [l for l in done if l.endswith("\n")]  # a line cut short never returned
        acknowledged += [i for l in done for i in l.split()]
        assert done, 'the writer was killed before any add returned'
        start += 10_000
        _check(db_path, embedder, acknowledged)
    assert len(acknowledged) > 100  # the test did add and kill in earnest


def _check(db_path, embedder, acknowledged):
    with Memory(db_path, embedder=embedder) as mem:
        conn = mem.store.conn
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for item_id in acknowledged:
            item = mem.get(item_id)  # raises if missing
            assert item.content and item.session_id
        # no partial add: every turn has its keys, its session and a version row
        assert conn.execute("SELECT count(*) FROM items i WHERE NOT EXISTS "
                            "(SELECT 1 FROM keys k WHERE k.item_rowid = i.rowid)").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM items i WHERE i.kind = 'turn' AND NOT EXISTS "
                            "(SELECT 1 FROM items s WHERE s.id = i.parent_id)").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM items i WHERE NOT EXISTS "
                            "(SELECT 1 FROM versions v WHERE v.item_rowid = i.rowid)").fetchone()[0] == 0
        turns = conn.execute("SELECT count(*) FROM items WHERE kind = 'turn'").fetchone()[0]
        assert turns % 2 == 0  # adds are pairs of messages: all or nothing
        fts = conn.execute("SELECT count(*) FROM keys_fts").fetchone()[0]
        assert fts == conn.execute("SELECT count(*) FROM keys").fetchone()[0]
        cube = mem.store.cube("default")
        assert mem.store.indexes.get(cube.id).keys == mem.store.live_keys(cube.id)
        last = acknowledged[-1] if acknowledged else None
        if last:
            # the last acknowledged add is searchable: its own text finds it (a neighbour whose
            # context key holds the same words may rank beside it, so membership, not first place)
            item = mem.get(last)
            hits = mem.search(item.content, user_id=item.user_id, top_k=5)
            assert last in [h.item.id for h in hits]
