"""Cube archives: one portable file holding a cube, to move it to another store (SQLite or
PostgreSQL) and back.

A `.memcube` file is a tar archive (uncompressed: most of it is float32 vectors) of

    manifest.json   format and version, the cube (name, owner, created), the embedding model
                    (name and dimensions), counts, and every other member with its size and
                    sha256; always the first member
    items.jsonl     every item of the cube with every field: ids, versions, validity windows,
                    provenance links (source_ids, parent_id, superseded_by); tombstones as
                    tombstones (their text was purged, so it never travels)
    versions.jsonl  every version of those items (a purged version without its text)
    keys.jsonl      per item with search keys, their roles, in the order of the vectors
    vectors.f32     those keys' vectors, float32 rows of the model's dimensions
    audit.jsonl     the cube's entries in the audit log
    tiers.jsonl     only on request (`tiers`): the cube's KV blocks and LoRA shards, a row
                    each, naming their files, which follow as kv/<file> and
                    shards/<folder>/<file> (a shard's folder holds its adapter and manifest)

Export streams: items and vectors are read and written a page at a time (memory does not grow
with the cube). Import extracts into a scratch folder and checks every member against the
manifest before it writes anything; then it writes the cube in one transaction: its ids kept,
or remapped where they clash with items already in the store (links follow), its vectors kept
when the embedding model matches and re-embedded when not, session turns' context keys made
again, and its audit entries appended (their original time and actor kept) followed by an
`import_cube` entry. KV blocks and LoRA shards travel only on request (they are derived:
without them, `memstack maintain` / `consolidate` rebuilds them); imported, they keep their
model identity (a block or shard made for another model is never used) and are dropped or
marked stale by the same rules as any other when their items change.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from .._errors import CorruptArchiveError, InvalidInputError
from .._models import ITEM_TIMES, Item, Version
from ..store.base import CubeRow, Store
from ..store.migrate import TABLES, pair_vectors
from ..store.rows import ITEM_COLUMNS
from ..store.selection import Selection
from ..write.drafts import stored_keys
from .retention import Retention, check_kind, duration

FORMAT = "memcube"
VERSION = 1
MANIFEST = "manifest.json"
MEMBERS = ("items.jsonl", "versions.jsonl", "keys.jsonl", "vectors.f32", "audit.jsonl")
TIERS = "tiers.jsonl"  # and the files under kv/ and shards/ (with `tiers`)
_TIER_FILES = ("kv/", "shards/")
_PAGE = 1000
_LINKS = ("parent_id", "superseded_by")  # item fields that name another item
_LOCAL = ("cube", "kv_blocks", "shards")  # item fields that belong to the store, not the cube
VERSION_COLUMNS = TABLES["versions"]
_ITEM_COLUMNS = tuple(c for c in ITEM_COLUMNS if c not in _LOCAL)
_VERSION_FIELDS = tuple(f.name for f in dataclasses.fields(Version))


# export ---------------------------------------------------------------------------------------
def export(store: Store, cube: CubeRow, dest: Path, tiers: bool = False) -> dict[str, Any]:
    """Write the cube `cube` into the new archive file `dest` (with `tiers`, its KV blocks
    and LoRA shards too). Returns the manifest."""
    if dest.exists():
        raise InvalidInputError(f"{dest} exists; an archive goes into a new file")
    if not dest.parent.is_dir() or not os.access(dest.parent, os.W_OK):
        raise InvalidInputError(f"cannot write into {dest.parent}: no such folder, or no "
                                "permission")
    with tempfile.TemporaryDirectory(prefix=".memcube-", dir=dest.parent) as scratch:
        folder = Path(scratch)
        with _Writers(folder) as out:
            counts = _write_items(store, cube, out)
            counts["audit_entries"] = _write_audit(store, cube.name, out["audit.jsonl"])
            if tiers:
                counts.update(_write_tiers(store, cube, out))
        manifest = {"format": FORMAT, "version": VERSION,
                    "cube": {"name": cube.name, "owner": cube.owner,
                             "created_at": cube.created_at},
                    "embedding": {"model": cube.embed_model, "dim": cube.embed_dim},
                    "counts": counts, "source": store.location,
                    "retention": [_rule(r) for r in store.retention_rules(cube.id)],
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                    "members": out.digests()}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        partial = folder / "archive.partial"
        with tarfile.open(partial, "w") as tar:
            for name in (MANIFEST, *out.names):
                tar.add(folder / name, arcname=name)
        os.replace(partial, dest)
    return manifest


_RULE_PARTS = ("expire_after", "archive_unused", "purge_after")


def _rule(rule: Any) -> dict[str, Any]:
    """A retention rule as the manifest keeps it (the importer becomes its setter)."""
    return {"kind": rule.kind, **{p: getattr(rule, p) for p in _RULE_PARTS}}


class _Writers:
    """The member files, each hashed as it is written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: list[str] = list(MEMBERS)
        self.files: dict[str, IO[bytes]] = {}
        self.hashes = {name: hashlib.sha256() for name in MEMBERS}

    def __enter__(self) -> "_Writers":
        self.files = {name: (self.folder / name).open("wb") for name in MEMBERS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for f in self.files.values():
            f.close()

    def __getitem__(self, name: str) -> Callable[[bytes], None]:
        if name not in self.files:  # a member on request (tiers.jsonl)
            self.names.append(name)
            self.hashes[name] = hashlib.sha256()
            self.files[name] = (self.folder / name).open("wb")

        def write(data: bytes) -> None:
            self.files[name].write(data)
            self.hashes[name].update(data)
        return write

    def line(self, name: str, value: Any) -> None:
        self[name]((json.dumps(value, ensure_ascii=False, sort_keys=True) + "\n")
                   .encode("utf-8"))

    def copy(self, name: str, source: Path) -> None:
        """A file as the member `name`, hashed as it is copied."""
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with source.open("rb") as f, target.open("wb") as out:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        self.names.append(name)
        self.hashes[name] = digest

    def digests(self) -> dict[str, dict[str, Any]]:
        """Sizes and hashes of every member (after the files were closed)."""
        return {name: {"bytes": (self.folder / name).stat().st_size,
                       "sha256": self.hashes[name].hexdigest()} for name in self.names}


def _write_items(store: Store, cube: CubeRow, out: _Writers) -> dict[str, int]:
    counts = {"items": 0, "versions": 0, "keys": 0}
    sel = Selection(cube_ids=(cube.id,), status="any")
    after = 0
    while page := store.select_items(sel, limit=_PAGE, after_rowid=after):
        after = page[-1][0]
        versions = store.versions_of({rowid: item.id for rowid, item in page})
        vectors = store.key_vectors_of([rowid for rowid, _ in page])
        for rowid, item in page:
            out.line("items.jsonl", _item_out(item))
            for version in versions[rowid]:
                out.line("versions.jsonl", _version_out(version))
                counts["versions"] += 1
            keys = vectors[rowid]
            if keys:
                out.line("keys.jsonl", {"item": item.id, "roles": [r for r, _ in keys]})
                out["vectors.f32"](b"".join(np.asarray(v, "<f4").tobytes() for _, v in keys))
                counts["keys"] += len(keys)
            counts["items"] += 1
    return counts


def _item_out(item: Item) -> dict[str, Any]:
    values = item.to_dict()
    for name in (*_LOCAL, "memory"):
        values.pop(name, None)
    return values


def _version_out(version: Version) -> dict[str, Any]:
    values = {name: getattr(version, name) for name in _VERSION_FIELDS}
    for name in ("valid_from", "valid_to", "changed_at"):
        values[name] = values[name].isoformat() if values[name] is not None else None
    return values


def _write_audit(store: Store, cube: str, write: Callable[[bytes], None]) -> int:
    count, after = 0, 0
    while entries := store.audit_log(5000, after):
        for e in entries:
            if e.cube == cube:
                write((json.dumps({"at": e.at.timestamp(), "actor": e.actor, "action": e.action,
                                   "item_ids": e.item_ids, "detail": e.detail},
                                  ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
                count += 1
        after = entries[-1].seq
    return count


def _write_tiers(store: Store, cube: CubeRow, out: _Writers) -> dict[str, int]:
    """The cube's KV blocks and active shards: a row each in tiers.jsonl, then their files.
    A stale shard stays out (its weights may hold what was since changed or deleted), and so
    does a block whose file went meanwhile (evicted) or a file that is not a regular file
    inside the tier's folder."""
    counts = {"kv_blocks": 0, "shards": 0, "tiers_skipped": 0}
    out[TIERS]  # the member exists even when the cube has neither
    for block in store.blocks(cube_id=cube.id):
        source = store.kv_dir / block.file
        if not _regular(source, store.kv_dir):
            counts["tiers_skipped"] += 1
            continue
        name = f"kv/{block.model_key}/{block.id}.safetensors"
        out.copy(name, source)
        out.line(TIERS, {"tier": "kv", **_tier_row(block), "files": [name]})
        counts["kv_blocks"] += 1
    for shard in store.shards("active"):
        if shard.cube_id != cube.id:
            continue
        folder = store.shard_dir / shard.folder
        files = sorted(p for p in folder.rglob("*") if _regular(p, store.shard_dir)) \
            if _inside(folder, store.shard_dir) else []
        if not files:
            counts["tiers_skipped"] += 1
            continue
        names = [f"shards/{shard.id}/{p.relative_to(folder).as_posix()}" for p in files]
        for name, path in zip(names, files):
            out.copy(name, path)
        out.line(TIERS, {"tier": "shard", **_tier_row(shard), "folder": shard.id,
                         "files": names})
        counts["shards"] += 1
    return counts


def _regular(path: Path, base: Path) -> bool:
    return path.is_file() and not path.is_symlink() and _inside(path, base)


def _tier_row(row: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(row).items() if k != "cube_id"}


# import ---------------------------------------------------------------------------------------
@dataclass
class Opened:
    """An archive extracted into a scratch folder and checked against its manifest."""

    folder: Path
    manifest: dict[str, Any]

    def lines(self, name: str) -> Iterator[dict[str, Any]]:
        with (self.folder / name).open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    yield json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise CorruptArchiveError(f"{name} line {n} is not JSON") from exc


def open_archive(path: Path, scratch: Path) -> Opened:
    """Extract `path` into `scratch` and check every member's size and sha256 against the
    manifest: a corrupt, truncated, foreign or newer archive is an error, and nothing has
    been written to any store."""
    if not path.is_file():
        raise InvalidInputError(f"{path} is not a file")
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            if not names or names[0] != MANIFEST:
                raise CorruptArchiveError(f"{path} is not a memstack cube archive (no manifest)")
            manifest = _manifest(tar.extractfile(members[0]), path)
            expected = set(manifest["members"])
            if set(names[1:]) != expected or len(names) != len(expected) + 1 or \
                    any(not m.isfile() or m.issparse() for m in members) or any(
                        m.size != manifest["members"][m.name]["bytes"] for m in members[1:]):
                raise CorruptArchiveError(f"{path} does not hold the members its manifest lists "
                                        "(truncated or edited)")
            for member in members[1:]:
                _extract(tar, member, scratch / member.name, manifest["members"][member.name],
                         path)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptArchiveError(f"{path} is not a readable cube archive (truncated or not an "
                                f"archive): {exc}") from exc
    return Opened(scratch, manifest)


def _manifest(raw: IO[bytes] | None, path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.read().decode("utf-8")) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptArchiveError(f"{path}: its manifest is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptArchiveError(f"{path} is not a memstack cube archive (another format)")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise CorruptArchiveError(f"{path} is a cube archive of format version "
                                f"{manifest.get('version')}, newer than this memstack reads "
                                f"({VERSION}): pip install -U memstack")
    members = set(manifest.get("members", {}))
    extra = members - set(MEMBERS) - {TIERS}
    if not set(MEMBERS) <= members or any(not _tier_file(n) for n in extra) or \
            (extra and TIERS not in members):
        raise CorruptArchiveError(f"{path}: its manifest lists other members than a cube "
                                "archive has")
    return manifest


def _tier_file(name: str) -> bool:
    """A KV block's or shard's file, named as export names them: under kv/ or shards/, no
    part that climbs out of the scratch folder."""
    parts = name.split("/")
    return name.startswith(_TIER_FILES) and len(parts) >= 2 and \
        all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path,
             want: dict[str, Any], path: Path) -> None:
    digest, size = hashlib.sha256(), 0
    source = tar.extractfile(member)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != want["bytes"] or digest.hexdigest() != want["sha256"]:
        raise CorruptArchiveError(f"{path}: {member.name} differs from the manifest's sha256 "
                                "(the archive was edited or damaged); nothing was imported")


def remap(store: Store, archive: Opened, fresh: bool = False) -> dict[str, str]:
    """New ids for the archive's items whose ids are taken in this store (`fresh`: for all of
    them; a server's request cannot see other tenants' ids, and must not learn them)."""
    ids = [line["id"] for line in archive.lines("items.jsonl")]
    if fresh:
        return {old: uuid.uuid4().hex for old in ids}
    taken: set[str] = set()
    for start in range(0, len(ids), _PAGE):
        taken |= set(store.items_by_id(ids[start:start + _PAGE]))
    return {old: uuid.uuid4().hex for old in ids if old in taken}


def item_row(line: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    """An archived item as the row fields insert_items takes, ids remapped. Only item columns
    are taken (a key of the JSON line never becomes SQL)."""
    if not isinstance(line, dict) or not isinstance(line.get("id"), str):
        raise CorruptArchiveError("an item of items.jsonl is not an object with an id")
    row = {name: line.get(name) for name in _ITEM_COLUMNS}
    for name in ("metadata",):
        row[name] = row[name] if isinstance(row[name], dict) else {}
    for name in ("tags", "source_ids"):
        row[name] = row[name] if isinstance(row[name], list) else []
    row["id"] = ids.get(row["id"], row["id"])
    for name in _LINKS:
        if row.get(name):
            row[name] = ids.get(row[name], row[name])
    row["source_ids"] = [ids.get(i, i) for i in row.get("source_ids", [])]
    for name in ITEM_TIMES:
        row[name] = dt.datetime.fromisoformat(row[name]) if row.get(name) else None
    row["kv_blocks"], row["shards"] = [], []
    return row


def version_row(line: dict[str, Any], rowid: int, ids: dict[str, str]) -> tuple[Any, ...]:
    """An archived version as a row of the versions table (store/migrate.py's columns)."""
    def epoch(value: str | None) -> float | None:
        return dt.datetime.fromisoformat(value).timestamp() if value else None
    return (rowid, line["version"], line["content"], json.dumps(line["metadata"]),
            line["status"], epoch(line["valid_from"]), epoch(line["valid_to"]),
            epoch(line["changed_at"]), line["reason"], line["actor"],
            ids.get(line["superseded_by"], line["superseded_by"]),
            json.dumps([ids.get(i, i) for i in line.get("source_ids", [])]))


def stored_vectors(archive: Opened) -> Iterator[tuple[str, dict[str, list[np.ndarray]]]]:
    """(item id, its vectors by role) in archive order."""
    dim = archive.manifest["embedding"]["dim"]
    with (archive.folder / "vectors.f32").open("rb") as f:
        for line in archive.lines("keys.jsonl"):
            block = np.frombuffer(f.read(4 * dim * len(line["roles"])), "<f4")
            if block.size != dim * len(line["roles"]):
                raise CorruptArchiveError("vectors.f32 ends before keys.jsonl does")
            by_role: dict[str, list[np.ndarray]] = {}
            for role, vector in zip(line["roles"], block.reshape(-1, dim)):
                by_role.setdefault(role, []).append(vector.astype(np.float32))
            yield line["item"], by_role


def audit_entry(line: dict[str, Any], ids: dict[str, str]) -> tuple[Any, ...]:
    """(actor, action, item_ids, detail, at) of an archived audit entry, ids remapped."""
    return (line["actor"], line["action"], [ids.get(i, i) for i in line["item_ids"]],
            line["detail"], float(line["at"]))


def load(store: Store, archive: Opened, name: str, embedder: Any,
         refresh_context: Callable[[str, list[int]], None], actor: str,
         source: str, owner: str | None = None, fresh_ids: bool = False) -> dict[str, Any]:
    """Write the checked archive into the store as the new cube `name` (owned by `owner`, or
    the archived cube's owner), in one transaction. `refresh_context(session id, turn
    rowids)` makes the turns' context keys again. A line of the archive that is not what
    export writes (its hashes only prove it is what the manifest lists) is CorruptArchiveError,
    and nothing is written."""
    try:
        return _load(store, archive, name, embedder, refresh_context, actor, source, owner,
                     fresh_ids)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptArchiveError(f"{source}: a line of the archive is not what memstack "
                                  f"writes ({type(exc).__name__}: {exc}); nothing was "
                                  "imported") from exc


def _load(store: Store, archive: Opened, name: str, embedder: Any,
          refresh_context: Callable[[str, list[int]], None], actor: str, source: str,
          owner: str | None, fresh_ids: bool) -> dict[str, Any]:
    ids = remap(store, archive, fresh_ids)
    want = archive.manifest["embedding"]
    same_model = (want["model"], want["dim"]) == (embedder.name, embedder.dim)
    copied: list[Path] = []  # tier files put beside the store: removed if the import fails
    try:
        with store.transaction():
            cube = store.insert_cube(name, owner or archive.manifest["cube"]["owner"],
                                     embedder.name, embedder.dim)
            store.widen(cube.id)  # a server request's wall did not know it
            rowids = _insert_items(store, cube.id, archive, ids)
            _insert_versions(store, archive, rowids, ids)
            keys = _insert_keys(store, archive, rowids, None if same_model else embedder)
            for session_id, turns in _sessions(store, cube.id).items():
                refresh_context(session_id, turns)
            tiers = _insert_tiers(store, cube.id, archive, ids, set(rowids), copied) \
                if TIERS in archive.manifest["members"] else {}
            for line in archive.lines("audit.jsonl"):
                entry_actor, action, item_ids, detail, at = audit_entry(line, ids)
                if fresh_ids:  # an uploader's history: kept, never taken for this store's
                    action, detail = f"imported:{action}", {**detail, "imported_by": actor}
                store.audit(entry_actor, action, name, item_ids, detail, at=at)
            rules = _insert_rules(store, cube, archive, actor)
            store.bump_generation(cube.id)
            report = {"cube": name, "items": len(rowids), "keys": keys, "remapped": len(ids),
                      "reembedded": not same_model, "file": source, **tiers, **rules,
                      "audit_entries": archive.manifest["counts"]["audit_entries"]}
            store.audit(actor, "import_cube", name, [], report)
    except BaseException:
        for path in reversed(copied):  # files, then the folders made for them
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else \
                path.unlink(missing_ok=True)
        raise
    return {**report, "remapped_ids": ids}


def _insert_rules(store: Store, cube: CubeRow, archive: Opened, actor: str
                  ) -> dict[str, Any]:
    """The archived cube's retention rules, each audited as retention_set. Rules that would
    take every item of the imported cube out of search at the next run are not installed
    (that needs a confirmation: `memstack retention set ... --yes`) and are reported."""
    rules = [(check_kind(r["kind"]), {p: duration(r[p], p) for p in _RULE_PARTS})
             for r in archive.manifest.get("retention", [])]
    for kind, values in rules:
        store.set_retention(cube.id, kind, set_by=actor, **values)
    if rules and Retention(store, None, actor).would_remove_everything(cube):
        for kind, _ in rules:
            store.set_retention(cube.id, kind, None, None, None, set_by=actor)
        return {"retention_rules": 0, "retention_not_installed": [k for k, _ in rules]}
    for kind, values in rules:
        store.audit(actor, "retention_set", cube.name, [],
                    {"kind": kind, **values, "imported": True})
    return {"retention_rules": len(rules)}


def _insert_items(store: Store, cube_id: int, archive: Opened, ids: dict[str, str]
                  ) -> dict[str, int]:
    rowids: dict[str, int] = {}
    for page in _pages(archive.lines("items.jsonl")):
        new = store.insert_items(cube_id, [item_row(line, ids) for line in page])
        rowids.update(zip((line["id"] for line in page), new))
    return rowids


def _insert_versions(store: Store, archive: Opened, rowids: dict[str, int],
                     ids: dict[str, str]) -> None:
    for page in _pages(archive.lines("versions.jsonl")):
        store.load_rows("versions", VERSION_COLUMNS,
                        [version_row(v, rowids[v["item_id"]], ids) for v in page])


def _insert_keys(store: Store, archive: Opened, rowids: dict[str, int],
                 embedder: Any | None) -> int:
    """The items' own keys: with the archived vectors, or (`embedder`: another model than the
    archive's) embedded again. Context keys come from refresh_context."""
    count = 0
    pairs = stored_vectors(archive) if embedder is None else \
        ((line["item"], None) for line in archive.lines("keys.jsonl"))
    for page in _pages(pairs):
        items = store.items_by_rowid([rowids[old] for old, _ in page])
        groups = []
        for old, by_role in page:
            rowid = rowids[old]
            texts, roles = stored_keys(items[rowid])
            vectors = pair_vectors(old, roles, by_role) if by_role is not None else \
                np.asarray(embedder.embed(texts), np.float32)
            groups.append((rowid, texts, roles, vectors))
            count += len(texts)
        store.insert_keys(groups)
    return count


_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # used with fullmatch


def _insert_tiers(store: Store, cube_id: int, archive: Opened, ids: dict[str, str],
                  archived: set[str], copied: list[Path]) -> dict[str, int]:
    """The archive's KV blocks and shards into this store. Nothing in tiers.jsonl names a
    path here: every block and shard gets a new id, its files go to kv/<model key>/<new
    id>.safetensors and shards/<new id>/<file> beside the store (new paths, checked to stay
    inside those folders), and its items must be items of the archive. A KV block whose items
    got new ids is left out (its file names the old ones, so it could never be used)."""
    from ..store.kvblocks import BlockRow
    from ..store.shards import ShardRow

    lines = list(archive.lines(TIERS))
    named = [name for line in lines for name in line["files"]]
    if len({line["id"] for line in lines}) != len(lines) or len(set(named)) != len(named):
        raise CorruptArchiveError("tiers.jsonl names a block, a shard or a file twice")
    new_ids = {line["id"]: f"{'kv' if line['tier'] == 'kv' else 'shard'}_{uuid.uuid4().hex[:16]}"
               for line in lines}
    counts = {"kv_blocks": 0, "shards": 0, "kv_blocks_skipped": 0}
    for line in lines:
        items = line["item_ids"] + line.get("changed_items", [])
        if line["tier"] not in ("kv", "shard") or any(i not in archived for i in items):
            raise CorruptArchiveError("tiers.jsonl has a row of another tier or naming items "
                                      "the archive does not hold")
        if line["tier"] == "kv" and any(i in ids for i in line["item_ids"]):
            counts["kv_blocks_skipped"] += 1
            continue
        new = new_ids[line["id"]]
        row = {k: v for k, v in line.items() if k not in ("tier", "files")}
        row.update(id=new, cube_id=cube_id, item_ids=[ids.get(i, i) for i in row["item_ids"]])
        if line["tier"] == "kv":
            if not _SAFE_ID.fullmatch(str(row["model_key"])) or len(line["files"]) != 1:
                raise CorruptArchiveError("tiers.jsonl: a KV block with a malformed model key")
            row["file"] = f"{row['model_key']}/{new}.safetensors"
            _copy_in(archive, line["files"][0], store.kv_dir, row["file"], copied)
            store.insert_block(BlockRow(**row))
            counts["kv_blocks"] += 1
            continue
        prefix = f"shards/{line['folder']}/"
        if not _SAFE_ID.fullmatch(str(line["folder"])) or not line["files"] or \
                any(not f.startswith(prefix) for f in line["files"]):
            raise CorruptArchiveError("tiers.jsonl: a shard's files are not in its folder")
        row.update(folder=new, parent=new_ids.get(row["parent"]) if row["parent"] else None,
                   changed_items=[ids.get(i, i) for i in row["changed_items"]])
        for name in line["files"]:
            _copy_in(archive, name, store.shard_dir, f"{new}/{name[len(prefix):]}", copied)
        store.insert_shard(ShardRow(**row))
        counts["shards"] += 1
    return counts


def _copy_in(archive: Opened, name: str, base: Path, relative: str, copied: list[Path]
             ) -> None:
    """Copy the member `name` to base/relative, a new file that must stay inside `base`;
    `copied` gets the folders this makes and the file before it is written (a failed import
    removes them, a partial copy too)."""
    target = base / relative
    if not _tier_file(name) or name not in archive.manifest["members"] or \
            not _inside(target, base) or target.exists():
        raise CorruptArchiveError(f"tiers.jsonl names {name!r}, which the manifest does not "
                                  "list or which cannot be placed")
    copied += [p for p in reversed(target.parents) if not p.exists()]  # outermost first
    target.parent.mkdir(parents=True, exist_ok=True)
    copied.append(target)
    shutil.copyfile(archive.folder / name, target)


def _inside(path: Path, base: Path) -> bool:
    return path.resolve().is_relative_to(base.resolve())


def _sessions(store: Store, cube_id: int) -> dict[str, list[int]]:
    sessions = store.select_items(Selection(cube_ids=(cube_id,), status="live",
                                            kinds=("session",)))
    return {item.id: [r for r, _ in store.select_items(Selection(status="any",
                                                                 parent_id=item.id))]
            for _, item in sessions}


def _pages(values: Any) -> Iterator[list[Any]]:
    page: list[Any] = []
    for value in values:
        page.append(value)
        if len(page) == _PAGE:
            yield page
            page = []
    if page:
        yield page
