"""Backups of a whole store, taken while it is in use, and their restore.

A backup is a folder:

    DEST/memstack.db           the store as one SQLite file (of an SQLite store: SQLite's online
                               backup API; of a PostgreSQL store: a logical copy through the
                               Store inside one repeatable-read snapshot)
    DEST/memstack.db.kv/       KV block files, as beside the store
    DEST/memstack.db.shards/   LoRA shard folders
    DEST/manifest.json         every file with its size and sha256, the audit chain's head in
                               the copy, the source, the time, the format's version

It holds every write committed before it began (and, on SQLite, nothing half-written after).
`restore` checks the manifest and every file's hash before it writes anything, restores into
a new SQLite file or an empty PostgreSQL database, then checks the result: the database's own
integrity, the consistency counts, the vector index against the vectors, and the audit chain
against the head in the manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .._errors import CorruptArchiveError, InvalidInputError
from ..store.base import Store
from . import chain

FORMAT = "memstack-backup"
VERSION = 1
DB = "memstack.db"
MANIFEST = "manifest.json"
FOLDERS = (DB + ".kv", DB + ".shards")


def backup(store: Store, dest: Path, copy_rows: Callable[[Path], None],
           open_copy: Callable[[Path], Store]) -> dict[str, Any]:
    """Write a backup of `store` into the new folder `dest`. `copy_rows(path)` writes the
    store's rows into a new SQLite file (used when the store cannot copy itself);
    `open_copy(path)` opens the copied file, to read its head and check it."""
    started = time.perf_counter()
    _check_new(dest)
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        copier = getattr(store, "copy_to", None)
        copier(partial / DB) if copier else copy_rows(partial / DB)
        _copy_folders(store.path, partial / DB)
        copy = open_copy(partial / DB)
        try:
            head, checks = chain.head(copy), copy.integrity()
        finally:
            copy.close()
        _keep_only(partial, (DB, *FOLDERS))  # what opening the copy left (its vector index)
        manifest = _manifest(partial, store.location, head)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    size = sum(f["bytes"] for f in manifest["files"].values())
    return {"dest": str(dest), "files": len(manifest["files"]), "bytes": size,
            "audit_head": head, "integrity": checks,
            "seconds": round(time.perf_counter() - started, 2)}


def check_backup(src: Path) -> dict[str, Any]:
    """The manifest of the backup folder `src`, once every file it lists has its size and
    hash (a truncated, edited or foreign backup is an error naming the file)."""
    manifest = _read_manifest(src)
    for name, want in manifest["files"].items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or (name != DB and parts[0] not in FOLDERS):
            raise CorruptArchiveError(f"{src}: its manifest names {name!r}, which is not a "
                                      "file of a backup")
        path = src / name
        if not path.is_file() or path.stat().st_size != want["bytes"] or \
                _sha256(path) != want["sha256"]:
            raise CorruptArchiveError(f"{path} is missing or differs from the backup's manifest "
                                    "(truncated or edited): this backup cannot be restored")
    return manifest


def restore_files(src: Path, manifest: dict[str, Any], target_db: Path | None,
                  target_files: Path) -> None:
    """Put the backup's database file (for an SQLite target) and the files of its folders
    that the manifest lists into place, beside `target_files` (the store's path, from which
    its .kv and .shards folders are named)."""
    for name in manifest["files"]:
        if name == DB:
            continue
        folder, rest = name.split("/", 1)
        target = target_files.with_name(target_files.name + folder[len(DB):]) / rest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, target)
    if target_db is not None:
        partial = target_db.with_name(f"{target_db.name}.partial-{os.getpid()}")
        shutil.copyfile(src / DB, partial)
        os.replace(partial, target_db)


def check_store_empty(store: Store) -> None:
    """A database restored into holds nothing yet: no cube, no audit entry, no tier files."""
    folders = [store.path.with_name(store.path.name + f[len(DB):]) for f in FOLDERS]
    if store.cube_count() or store.audit_last() is not None or any(
            f.is_dir() and any(f.iterdir()) for f in folders):
        raise InvalidInputError(f"{store.location} is not empty (cubes, audit entries or tier "
                                "files): restore writes into an empty store")


def check_target_free(path: Path) -> None:
    """An SQLite target must not exist yet (nor its .kv and .shards folders)."""
    for candidate in (path, *(path.with_name(path.name + f[len(DB):]) for f in FOLDERS)):
        if candidate.exists():
            raise InvalidInputError(f"{candidate} exists; restore writes a new store (choose "
                                    "another --db, or move it away first)")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise InvalidInputError(f"cannot write into {path.parent}: no such folder, or no "
                                "permission")


def verify_restored(store: Store, manifest: dict[str, Any]) -> dict[str, Any]:
    """The restored store's integrity and audit chain (against the backup's head)."""
    checks = store.integrity()
    report = chain.verify(store, manifest["audit_head"])
    checks["audit_chain"] = report.message
    problems = [k for k, v in checks.items() if isinstance(v, int) and v] + \
        ([] if checks["database"] == "ok" else ["database"]) + \
        ([] if checks.get("full_text", "ok") == "ok" else ["full_text"]) + \
        [f"vector index of cube {c}" for c, v in checks.get("vector_index", {}).items()
         if not v["match"]] + ([] if report.ok else ["audit_chain"])
    checks["ok"] = not problems
    checks["problems"] = problems
    return checks


# helpers --------------------------------------------------------------------------------------
def _check_new(dest: Path) -> None:
    if dest.exists():
        raise InvalidInputError(f"{dest} exists; a backup goes into a new folder")
    if not dest.parent.is_dir() or not os.access(dest.parent, os.W_OK):
        raise InvalidInputError(f"cannot write into {dest.parent}: no such folder, or no "
                                "permission")


def _keep_only(folder: Path, names: tuple[str, ...]) -> None:
    for path in folder.iterdir():
        if path.name not in names:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _copy_folders(source_db: Path, target_db: Path) -> None:
    for suffix in (f[len(DB):] for f in FOLDERS):
        folder = source_db.with_name(source_db.name + suffix)
        if folder.is_dir():
            shutil.copytree(folder, target_db.with_name(target_db.name + suffix),
                            ignore=shutil.ignore_patterns("*.partial*"), dirs_exist_ok=True,
                            copy_function=_copy_if_there)


def _copy_if_there(source: str, target: str) -> None:
    """A block or shard file dropped while the backup runs is no error: the store dropped it
    (its row may still be in the copy, which then treats it as a missing block)."""
    try:
        shutil.copy2(source, target)
    except FileNotFoundError:
        pass


def _manifest(folder: Path, source: str, head: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size,
                                                     "sha256": _sha256(path)}
    return {"format": FORMAT, "version": VERSION, "source": source,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "audit_head": {"seq": head["seq"], "hash": head["hash"]}, "files": files}


def _read_manifest(src: Path) -> dict[str, Any]:
    path = src / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptArchiveError(f"{src} is not a memstack backup (no {MANIFEST}); make one "
                                "with `memstack backup DEST`") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptArchiveError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptArchiveError(f"{src} is not a memstack backup (its manifest is of another "
                                "format)")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise CorruptArchiveError(f"{src} is a backup of format version "
                                f"{manifest.get('version')}, newer than this memstack reads "
                                f"({VERSION}): pip install -U memstack")
    if DB not in manifest.get("files", {}) or "audit_head" not in manifest:
        raise CorruptArchiveError(f"{path} lists no database or no audit head: not a complete "
                                "backup")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
