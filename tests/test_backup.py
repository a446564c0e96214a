"""Backup while the store is in use, and restore: every write acknowledged before the backup
began comes back, the restored store passes its checks, and a damaged backup is refused
before anything is written."""

import json
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from memstack import Memory
from memstack._errors import CorruptArchiveError, InvalidInputError
from memstack.cli import cli


def _writing(target, embedder, tmp_path):
    """Another writer (its own store connection, as another process would have) adding
    memories until stopped; `acked` holds the ids whose add returned."""
    stop, acked = threading.Event(), []

    def run():
        with Memory(target, embedder=embedder, files=tmp_path / "files") as other:
            n = 0
            while not stop.is_set():
                acked.append(other.add(f"note {n}: the heron came back to the pond",
                                       user_id="ann").items[0].id)
                n += 1

    thread = threading.Thread(target=run)
    thread.start()
    return stop, acked, thread


def test_a_backup_under_concurrent_writes_restores_every_acknowledged_write(
        mem, target, embedder, tmp_path):
    for n in range(5):
        mem.add(f"Ann's fact number {n} about sailing", user_id="ann")
    stop, acked, thread = _writing(target, embedder, tmp_path)
    try:
        while len(acked) < 5:
            threading.Event().wait(0.05)
        before = list(acked)  # acknowledged before the backup began
        report = mem.backup(tmp_path / "backup")
        assert report["integrity"]["orphan_keys"] == 0
    finally:
        stop.set()
        thread.join()
    restored = tmp_path / "restored.db"
    result = Memory.restore(tmp_path / "backup", restored, embedder=embedder)
    checks = result["checks"]
    assert checks["ok"], checks
    assert all(v["match"] and v["indexed"] == v["keys"] for v in checks["vector_index"].values())
    with Memory(restored, embedder=embedder) as back:
        for memory_id in before:
            assert back.get(memory_id).content.startswith("note ")
        assert "sailing" in back.search("sailing facts", user_id="ann")[0].item.content
        assert back.verify_audit(report["audit_head"]).ok
        actions = [e.action for e in back.audit_log(limit=10_000)]
        assert actions[-1] == "restore"
    # the source's log says where its backups went (for deletion receipts)
    backups = [e for e in mem.audit_log(limit=10_000) if e.action == "backup"]
    assert backups[-1].detail["dest"] == str((tmp_path / "backup").resolve())


def test_a_backup_holds_the_tier_files_and_restores_into_postgres(sqlite_mem, embedder,
                                                                   tmp_path, pg_url):
    sqlite_mem.add("Ann keeps bees", user_id="ann")
    # the KV and shard folders are copied as they are: a stand-in file here (building real
    # blocks and shards needs the local LLM: test_kv.py and test_parametric.py do that)
    kv = sqlite_mem.store.kv_dir
    kv.mkdir(parents=True, exist_ok=True)
    (kv / "block-1.safetensors").write_bytes(os.urandom(4096))
    sqlite_mem.backup(tmp_path / "backup")
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"memstack.db", "memstack.db.kv/block-1.safetensors"}
    result = Memory.restore(tmp_path / "backup", pg_url, files=tmp_path / "pg-files",
                            embedder=embedder)
    assert result["checks"]["ok"], result["checks"]
    with Memory(pg_url, embedder=embedder, files=tmp_path / "pg-files") as back:
        assert back.search("bees", user_id="ann")[0].item.content == "Ann keeps bees"
        assert (back.store.kv_dir / "block-1.safetensors").read_bytes() == \
            (kv / "block-1.safetensors").read_bytes()


def _backup(sqlite_mem, tmp_path) -> Path:
    sqlite_mem.add("Ann keeps bees", user_id="ann")
    sqlite_mem.backup(tmp_path / "backup")
    return tmp_path / "backup"


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no manifest",
                                    "foreign manifest", "newer format"])
def test_a_damaged_backup_is_refused_before_anything_is_written(sqlite_mem, embedder,
                                                                 tmp_path, damage):
    folder = _backup(sqlite_mem, tmp_path)
    db, manifest = folder / "memstack.db", folder / "manifest.json"
    if damage == "flipped byte":
        data = bytearray(db.read_bytes())
        data[5000] ^= 0xFF
        db.write_bytes(bytes(data))
    elif damage == "truncated":
        db.write_bytes(db.read_bytes()[:-4096])
    elif damage == "no manifest":
        manifest.unlink()
    else:
        value = json.loads(manifest.read_text())
        value.update({"format": "other"} if damage == "foreign manifest" else {"version": 99})
        manifest.write_text(json.dumps(value))
    with pytest.raises(CorruptArchiveError):
        Memory.restore(folder, tmp_path / "restored.db", embedder=embedder)
    assert not list(tmp_path.glob("restored.db*"))


def test_existing_or_unwritable_targets_are_refused_over_the_cli(sqlite_mem, db_path, tmp_path):
    folder = _backup(sqlite_mem, tmp_path)
    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli, [*args], catch_exceptions=False)

    result = run("--db", str(db_path), "backup", str(folder))  # the backup folder exists
    assert result.exit_code == 2 and "exists" in result.output
    result = run("--db", str(db_path), "restore", str(folder))  # the store exists
    assert result.exit_code == 2 and "exists" in result.output
    result = run("--db", str(db_path), "backup", str(tmp_path / "no" / "such" / "folder"))
    assert result.exit_code == 2 and "cannot write" in result.output
    result = run("--json", "--db", str(tmp_path / "new.db"), "restore", str(folder))
    assert result.exit_code == 0 and json.loads(result.output)["checks"]["ok"]
