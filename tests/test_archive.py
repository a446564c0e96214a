"""Cube archives: export, import into a fresh store of the other kind, export again: the same
content; tombstones travel without their text; clashing ids are remapped with their links; a
damaged, foreign or newer archive is refused before anything is written."""

import io
import json
import tarfile

import pytest
from click.testing import CliRunner

from memstack import Memory
from memstack._errors import CorruptArchiveError, InvalidInputError
from memstack.cli import cli

SECRET = "Ann's door code is zebra quartz lantern"


def _fill(mem):
    mem.add([{"role": "user", "content": "I moved to Berlin last May"},
             {"role": "assistant", "content": "Berlin is lovely in spring"}],
            user_id="ann", session_id="s1", observed_at="2024-06-01")
    moved = mem.add("Ann lives in Berlin", user_id="ann", kind="fact").items[0]
    mem.update(moved.id, "Ann lives in Munich", reason="moved again")
    gone = mem.add(SECRET, user_id="ann").items[0]
    mem.delete(gone.id)
    mem.add("Bob plays chess on Sundays", user_id="bob", session_id="s9")
    return moved, gone


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _lines(data):
    return [json.loads(line) for line in data.decode().splitlines()]


def test_export_import_into_the_other_store_and_export_again_is_identical(
        mem, target, tmp_path, embedder, pg_url):
    moved, gone = _fill(mem)
    first = tmp_path / "one.memcube"
    manifest = mem.export_cube("default", first)
    assert manifest["counts"]["items"] == 8 and manifest["embedding"]["dim"] == 384
    other = pg_url if str(target).endswith(".db") else tmp_path / "other.db"
    with Memory(other, embedder=embedder, files=tmp_path / "other-files") as back:
        report = back.import_cube(first)
        assert report["remapped"] == 0 and not report["reembedded"]
        back.export_cube("default", tmp_path / "two.memcube")
        assert back.get(moved.id).content == "Ann lives in Munich"
        assert [v.content for v in back.history(moved.id)] == ["Ann lives in Berlin",
                                                              "Ann lives in Munich"]
        assert back.search("where does Ann live now", user_id="ann")[0].item.id == moved.id
        assert back.store.item_by_id(gone.id)[1].status == "deleted"
        assert back.verify_audit().ok
    one, two = _members(first), _members(tmp_path / "two.memcube")
    for name in ("items.jsonl", "versions.jsonl", "keys.jsonl", "vectors.f32"):
        assert one[name] == two[name], name
    before, after = _lines(one["audit.jsonl"]), _lines(two["audit.jsonl"])
    assert after[:len(before)] == before and after[-1]["action"] == "import_cube"
    for data in one.values():  # the tombstone travelled, its text did not
        assert b"door code" not in data and b"quartz lantern" not in data
    tomb = next(i for i in _lines(one["items.jsonl"]) if i["id"] == gone.id)
    assert tomb["status"] == "deleted" and tomb["content"] is None


def test_an_archive_imported_beside_itself_gets_new_ids_and_keeps_its_links(sqlite_mem,
                                                                             tmp_path):
    _fill(sqlite_mem)
    sqlite_mem.export_cube("default", tmp_path / "c.memcube")
    report = sqlite_mem.import_cube(tmp_path / "c.memcube", as_name="copy")
    assert report["remapped"] == 8
    ids = report["remapped_ids"]
    turns = sqlite_mem.get_all(user_id="ann", kinds=["turn"], cube="copy")
    assert turns and all(t.id in ids.values() for t in turns)
    sessions = {t.parent_id for t in turns}
    assert sessions <= set(ids.values())  # turns point at the copied session, not the first
    hit = sqlite_mem.search("Berlin in spring", user_id="ann", cube="copy")[0]
    assert hit.item.id in ids.values()
    with pytest.raises(InvalidInputError, match="exists"):
        sqlite_mem.import_cube(tmp_path / "c.memcube", as_name="copy")


def test_another_embedding_model_embeds_the_archive_again(sqlite_mem, tmp_path):
    from memstack.embed.bge import BgeSmallEmbedder

    _fill(sqlite_mem)
    sqlite_mem.export_cube("default", tmp_path / "c.memcube")
    with Memory(tmp_path / "bge.db", embedder=BgeSmallEmbedder()) as other:
        report = other.import_cube(tmp_path / "c.memcube")
        assert report["reembedded"] and report["keys"] > 0
        assert other.store.cube("default").embed_model == other.embedder.name
        assert "Munich" in other.search("where does Ann live", user_id="ann")[0].item.content


def _damaged(path, how):
    data = path.read_bytes()
    if how == "flipped byte":
        members = _members(path)
        offset = data.index(members["items.jsonl"][:40])  # inside a member, not a header
        data = data[:offset + 10] + bytes([data[offset + 10] ^ 0x20]) + data[offset + 11:]
    elif how == "truncated":
        data = data[:len(data) // 2]
    elif how == "not an archive":
        data = b"PK\x03\x04 a zip file, or anything else"
    else:
        members = _members(path)
        manifest = json.loads(members["manifest.json"])
        manifest.update({"version": 99} if how == "newer format" else {"format": "other"})
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for name, body in [("manifest.json", json.dumps(manifest).encode()),
                               *[(n, b) for n, b in members.items() if n != "manifest.json"]]:
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        data = out.getvalue()
    broken = path.with_name(f"{how.replace(' ', '-')}.memcube")
    broken.write_bytes(data)
    return broken


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "not an archive",
                                 "newer format", "foreign format"])
def test_a_damaged_or_foreign_archive_is_refused_and_nothing_is_written(sqlite_mem, tmp_path,
                                                                         embedder, how):
    _fill(sqlite_mem)
    sqlite_mem.export_cube("default", tmp_path / "c.memcube")
    broken = _damaged(tmp_path / "c.memcube", how)
    with Memory(tmp_path / "fresh.db", embedder=embedder) as fresh:
        with pytest.raises(CorruptArchiveError):
            fresh.import_cube(broken)
        assert fresh.cubes() == [] and fresh.audit_log() == []


def test_the_cli_exports_and_imports_and_refuses_an_existing_file(sqlite_mem, db_path,
                                                                  tmp_path):
    _fill(sqlite_mem)
    runner = CliRunner()
    out = tmp_path / "c.memcube"
    result = runner.invoke(cli, ["--db", str(db_path), "cube", "export", "default", "-o",
                                 str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and out.exists()
    again = runner.invoke(cli, ["--db", str(db_path), "cube", "export", "default", "-o",
                                str(out)], catch_exceptions=False)
    assert again.exit_code == 2 and "exists" in again.output
    result = runner.invoke(cli, ["--json", "--db", str(tmp_path / "new.db"), "cube", "import",
                                 str(out), "--as", "team"], catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.output)["cube"] == "team"
    exports = [e for e in sqlite_mem.audit_log(limit=1000) if e.action == "export_cube"]
    assert exports[-1].detail["dest"] == str(out.resolve())


def test_an_owner_downloads_the_archive_and_imports_it_over_rest(server):
    import httpx

    ann = {"Authorization": f"Bearer {server.key('ann')}"}
    bob = {"Authorization": f"Bearer {server.key('bob')}"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/memories", headers=ann, json={
            "messages": "Ann keeps bees", "user_id": "ann", "cube": "~ann"}).status_code == 201
        assert http.get("/v1/cubes/~ann/archive", headers=bob).status_code in (403, 404)
        archive = http.get("/v1/cubes/~ann/archive", headers=ann)
        assert archive.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            assert tar.getnames()[0] == "manifest.json"
        made = http.post("/v1/cubes/import?as=ann-copy", headers=ann, content=archive.content)
        assert made.status_code == 201 and made.json()["items"] >= 1, made.text
        assert http.get("/v1/cubes/ann-copy", headers=ann).json()["owner"] == "ann"
        copied = [e for e in server.memory.audit_log(limit=1000) if e.cube == "ann-copy"]
        assert "imported:add" in [e.action for e in copied] and copied[-1].action == "import_cube"
        assert all(e.action.startswith("imported:") for e in copied[:-1])
        bad = http.post("/v1/cubes/import?as=ann-other", headers=ann,
                        content=archive.content[:300])
        assert bad.status_code == 400 and "archive" in bad.json()["error"]["message"], bad.text
        squat = http.post("/v1/cubes/import?as=%20~bob", headers=ann, content=archive.content)
        assert squat.status_code == 403  # " ~bob" is bob's personal cube name
        taken = http.post("/v1/cubes/import?as=ann-copy", headers=ann, content=archive.content)
        assert taken.status_code == 400


def _forged(path, change):
    """The archive with items.jsonl rewritten by `change` and the manifest's sums made to
    match (what someone who read govern/archive.py could send)."""
    import hashlib

    members = _members(path)
    members["items.jsonl"] = change(members["items.jsonl"])
    manifest = json.loads(members["manifest.json"])
    manifest["members"]["items.jsonl"] = {"bytes": len(members["items.jsonl"]),
                                          "sha256": hashlib.sha256(members["items.jsonl"])
                                          .hexdigest()}
    members["manifest.json"] = json.dumps(manifest).encode()
    forged = path.with_name("forged.memcube")
    with tarfile.open(forged, "w") as tar:
        for name in ("manifest.json", *[n for n in members if n != "manifest.json"]):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return forged


def test_keys_of_a_forged_item_never_reach_the_sql_and_broken_lines_write_nothing(
        sqlite_mem, tmp_path, embedder):
    _fill(sqlite_mem)
    sqlite_mem.export_cube("default", tmp_path / "c.memcube")
    evil = "content) SELECT 1,2,3 WHERE ? IS NOT NULL RETURNING rowid --"

    def inject(data):
        lines = _lines(data)
        lines[0][evil] = "x"
        return "".join(json.dumps(l) + "\n" for l in lines).encode()

    with Memory(tmp_path / "fresh.db", embedder=embedder) as fresh:
        report = fresh.import_cube(_forged(tmp_path / "c.memcube", inject))
        assert report["items"] == 8
        assert fresh.cubes()[0].item_count == 7  # every item but the tombstone, nothing else

    def broken(data):
        lines = _lines(data)
        del lines[3]["id"]
        return "".join(json.dumps(l) + "\n" for l in lines).encode()

    with Memory(tmp_path / "other.db", embedder=embedder) as other:
        with pytest.raises(CorruptArchiveError):
            other.import_cube(_forged(tmp_path / "c.memcube", broken))
        assert other.cubes() == []


@pytest.mark.parametrize("name", ["kv/../../escaped", "kv/a/../../../escaped", "/etc/escaped",
                                  "shards//x", "other/file"])
def test_a_tier_member_that_would_leave_the_scratch_folder_is_refused(sqlite_mem, tmp_path,
                                                                      embedder, name):
    """A forged archive whose manifest lists (with a correct sha256) a tier file named to
    climb out of the scratch folder, or outside kv/ and shards/: refused before extraction."""
    import hashlib

    _fill(sqlite_mem)
    sqlite_mem.export_cube("default", tmp_path / "c.memcube")
    members = _members(tmp_path / "c.memcube")
    manifest = json.loads(members.pop("manifest.json"))
    body = b"not a block"
    members.update({"tiers.jsonl": b"", name: body})
    for member in ("tiers.jsonl", name):
        manifest["members"][member] = {"bytes": len(members[member]),
                                       "sha256": hashlib.sha256(members[member]).hexdigest()}
    out = tmp_path / "forged.memcube"
    with tarfile.open(out, "w") as tar:
        for member, data in [("manifest.json", json.dumps(manifest).encode()),
                             *members.items()]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with Memory(tmp_path / "fresh.db", embedder=embedder) as fresh:
        with pytest.raises(CorruptArchiveError):
            fresh.import_cube(out)
        assert fresh.cubes() == []
    assert not list(tmp_path.rglob("escaped"))


def _fake_tiers(mem):
    """A KV block row and a shard row with files (not made by a model: the archive only moves
    bytes and rows), over the items of the default cube."""
    from memstack.store.kvblocks import BlockRow
    from memstack.store.shards import ShardRow

    cube = mem.store.cube("default")
    ids = [i.id for i in mem.get_all(user_id="ann")]
    (mem.store.kv_dir / "m1").mkdir(parents=True, exist_ok=True)
    (mem.store.kv_dir / "m1" / "kv_a.safetensors").write_bytes(b"block bytes")
    (mem.store.shard_dir / "shard_a").mkdir(parents=True, exist_ok=True)
    (mem.store.shard_dir / "shard_a" / "adapter.bin").write_bytes(b"adapter bytes")
    (mem.store.shard_dir / "shard_a" / "manifest.json").write_text("{}")
    with mem.store.transaction():
        mem.store.insert_block(BlockRow("kv_a", cube.id, "m1", "ann", None,
                                        "m1/kv_a.safetensors", ids[:1], 10, 11, 1.0, None, 0))
        mem.store.insert_shard(ShardRow("shard_a", cube.id, "m1", "shard_a", ids, None,
                                        "active", [], 1.0))
    return ids


def _rewrite(path, out, edit):
    """The archive with tiers.jsonl's lines passed through `edit`, the manifest's hashes
    made to match (a forger can always do that: the manifest is not signed)."""
    import hashlib

    members = _members(path)
    manifest = json.loads(members.pop("manifest.json"))
    members["tiers.jsonl"] = "".join(json.dumps(edit(line)) + "\n" for line in
                                     _lines(members["tiers.jsonl"])).encode()
    for name, data in members.items():
        manifest["members"][name] = {"bytes": len(data),
                                     "sha256": hashlib.sha256(data).hexdigest()}
    with tarfile.open(out, "w") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_tiers_travel_with_new_ids_inside_the_stores_folders(sqlite_mem, tmp_path, embedder):
    _fill(sqlite_mem)
    ids = _fake_tiers(sqlite_mem)
    manifest = sqlite_mem.export_cube("default", tmp_path / "t.memcube", tiers=True)
    assert (manifest["counts"]["kv_blocks"], manifest["counts"]["shards"]) == (1, 1)
    with Memory(tmp_path / "fresh.db", embedder=embedder) as fresh:
        report = fresh.import_cube(tmp_path / "t.memcube")
        assert (report["kv_blocks"], report["shards"]) == (1, 1)
        block, = fresh.store.blocks()
        shard, = fresh.store.shards()
        assert block.id != "kv_a" and shard.id != "shard_a"  # always new ids
        assert (fresh.store.kv_dir / block.file).read_bytes() == b"block bytes"
        assert (fresh.store.shard_dir / shard.folder / "adapter.bin").read_bytes() == \
            b"adapter bytes"
        assert block.item_ids == ids[:1] and sorted(shard.item_ids) == sorted(ids)
        fresh.delete(ids[0])  # the invalidation rules hold for imported tiers
        assert fresh.store.blocks() == [] and fresh.store.shards()[0].status == "stale"
    # a stale shard stays out of an export (its weights may hold what changed)
    sqlite_mem.delete(ids[0])
    again = sqlite_mem.export_cube("default", tmp_path / "t2.memcube", tiers=True)
    assert again["counts"]["shards"] == 0 and again["counts"]["kv_blocks"] == 0


@pytest.mark.parametrize("forgery", [
    {"tier": "kv", "model_key": "../../evil"},
    {"tier": "shard", "folder": ".."},
    {"tier": "shard", "files": ["shards/shard_a/../../../evil"]},
    {"tier": "shard", "item_ids": ["an id of another cube"]},
    {"tier": "kv", "files": ["kv/m1/kv_a.safetensors", "kv/m1/kv_a.safetensors"]},
])
def test_forged_tier_rows_never_place_a_file_outside_the_store(sqlite_mem, tmp_path, embedder,
                                                               forgery):
    _fill(sqlite_mem)
    _fake_tiers(sqlite_mem)
    sqlite_mem.export_cube("default", tmp_path / "t.memcube", tiers=True)
    tier = forgery["tier"]
    forged = _rewrite(tmp_path / "t.memcube", tmp_path / "forged.memcube",
                      lambda line: {**line, **forgery} if line["tier"] == tier else line)
    (tmp_path / "victim").mkdir()
    with Memory(tmp_path / "victim" / "fresh.db", embedder=embedder) as fresh:
        with pytest.raises(CorruptArchiveError):
            fresh.import_cube(forged)
        assert fresh.cubes() == [] and fresh.store.blocks() == []
        placed = [p for folder in (fresh.store.kv_dir, fresh.store.shard_dir)
                  if folder.exists() for p in folder.rglob("*") if p.is_file()]
        assert placed == []  # what was copied before the refusal was removed
    assert not list(tmp_path.rglob("evil"))
