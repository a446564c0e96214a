"""Governance commands: `audit` (the log, its hash chain's head and verification, and
`audit SHARD` for a LoRA shard), `backup` and `restore`, `cube export/import`, `retention`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from .. import _errors as errors
from ._common import console, emit, err, open_memory
from .tiers import shard_audit

EXIT_TAMPERED = 8  # `audit verify` found the chain broken


class _ShardFallback(click.Group):
    """`memstack audit SHARD` (no subcommand named SHARD) audits that shard, as it always did."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args.insert(0, "shard")
        return super().resolve_command(ctx, args)


@click.group(cls=_ShardFallback, invoke_without_command=True)
@click.option("--limit", default=50, show_default=True, type=int)
@click.pass_context
def audit(ctx: click.Context, limit: int) -> None:
    """The append-only, hash-chained log of writes (its first --limit entries); `audit verify`
    checks its chain, `audit head` exports the chain's head, `audit SHARD` audits a LoRA
    shard."""
    if ctx.invoked_subcommand is not None:
        return
    entries = open_memory(ctx).audit_log(limit=limit)
    table = Table(title="audit log")
    for name in ("seq", "at", "actor", "action", "cube", "item_ids", "hash"):
        table.add_column(name, overflow="fold")
    for e in entries:
        table.add_row(str(e.seq), e.at.isoformat()[:19], e.actor, e.action, e.cube or "",
                      ", ".join(i[:12] for i in e.item_ids[:5]), (e.hash or "")[:12])
    emit(ctx, [e.to_dict() for e in entries], table)


@audit.command("verify")
@click.option("--head", "head_file", type=click.Path(dir_okay=False, exists=True),
              help="A head exported by `audit head`: also prove that no entry up to it was "
                   "cut or rewritten.")
@click.pass_context
def audit_verify(ctx: click.Context, head_file: str | None) -> None:
    """Check the audit chain (exit 8 naming the first broken entry)."""
    head = _read_head(Path(head_file)) if head_file else None
    report = open_memory(ctx).verify_audit(head)
    style = "green" if report.ok else "bold red"
    emit(ctx, report.to_dict(), f"[{style}]{escape(report.message)}[/] ({report.entries} "
         f"entries checked{'' if report.ok else f'; first broken entry: {report.seq}'})")
    if not report.ok:
        ctx.exit(EXIT_TAMPERED)


@audit.command("head")
@click.option("-o", "--out", type=click.Path(dir_okay=False),
              help="Write the head to this file (keep it outside the store).")
@click.pass_context
def audit_head(ctx: click.Context, out: str | None) -> None:
    """The chain's head: the last entry's seq and hash."""
    head = open_memory(ctx).audit_head()
    if out:
        Path(out).write_text(json.dumps(head, indent=1) + "\n", encoding="utf-8")
        err.print(f"audit head (entry {head['seq']}) written to {out}", markup=False)
    emit(ctx, head, f"entry {head['seq']}: {head['hash']}")


@audit.command("shard", hidden=True)
@click.argument("shard")
@click.option("--model", envvar="MEMSTACK_MODEL", default="smollm2", show_default=True,
              help="The shard's base model ('smollm2' or a folder).")
@click.option("--out", type=click.Path(file_okay=False), default="shard-audit",
              show_default=True, help="Folder for audit.json, .md and .png.")
@click.pass_context
def audit_shard(ctx: click.Context, shard: str, model: str, out: str) -> None:
    """Audit a LoRA shard: what it recalls, generalizes, leaves alone, memorized verbatim."""
    shard_audit(ctx, shard, model, Path(out))


def _read_head(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.InvalidInputError(f"{path} is not an audit head (JSON from `memstack "
                                       f"audit head -o FILE`): {exc}") from exc
    if not isinstance(value, dict):
        raise errors.InvalidInputError(f"{path} is not an audit head: a JSON object expected")
    return value


@click.group()
def cube() -> None:
    """Cube archives: one portable file per cube (docs/governance.md)."""


@cube.command("export")
@click.argument("name")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="The new archive file (.memcube).")
@click.option("--tiers", is_flag=True, help="Also the cube's KV blocks and LoRA shards.")
@click.pass_context
def cube_export(ctx: click.Context, name: str, out: str, tiers: bool) -> None:
    """Write cube NAME into an archive: items with every version, tombstones, provenance,
    its audit entries, retention rules and its vectors with the embedding model's identity
    (with --tiers, its KV blocks and LoRA shards too)."""
    manifest = open_memory(ctx).export_cube(name, out, tiers=tiers)
    counts = manifest["counts"]
    extra = f", {counts['kv_blocks']} KV blocks, {counts['shards']} shards" if tiers else ""
    emit(ctx, manifest, f"cube {name}: {counts['items']} items, {counts['versions']} versions, "
         f"{counts['keys']} vectors, {counts['audit_entries']} audit entries{extra} -> {out}")


@cube.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("--as", "as_name", help="Import under this cube name (default: the archive's).")
@click.pass_context
def cube_import(ctx: click.Context, file: str, as_name: str | None) -> None:
    """Import a cube archive as a new cube, after checking every member's sha256."""
    report = open_memory(ctx).import_cube(file, as_name=as_name)
    tiers = f", {report['kv_blocks']} KV blocks, {report['shards']} shards" \
        if "shards" in report else ""
    emit(ctx, report, f"cube {report['cube']}: {report['items']} items, {report['keys']} keys"
         f"{' (embedded again: another model)' if report['reembedded'] else ''}, "
         f"{report['remapped']} ids remapped{tiers}")


@click.command()
@click.argument("dest", type=click.Path(file_okay=False))
@click.pass_context
def backup(ctx: click.Context, dest: str) -> None:
    """Back the store up into the new folder DEST while it is in use (KV blocks and shards
    too; a manifest of sha256 sums)."""
    report = open_memory(ctx).backup(dest)
    emit(ctx, report, f"backup of {report['files']} files ({report['bytes']:,} bytes, audit "
         f"entry {report['audit_head']['seq']}) in {report['dest']}, {report['seconds']} s")


@click.command()
@click.argument("src", type=click.Path(file_okay=False, exists=True))
@click.pass_context
def restore(ctx: click.Context, src: str) -> None:
    """Restore the backup folder SRC into --db (a new SQLite file or an empty PostgreSQL
    database), after checking every file; then check the restored store (exit 4 if a check
    fails)."""
    from .._memory import Memory

    report = Memory.restore(src, ctx.obj["db"], files=ctx.obj.get("files"))
    checks = report["checks"]
    verdict = "all checks passed" if checks["ok"] else f"checks FAILED: {checks['problems']}"
    emit(ctx, report, f"restored {src} (backup of {report['created_at']}) into "
         f"{report['target']} in {report['seconds']} s: {verdict}")
    if not checks["ok"]:
        ctx.exit(4)


def receipt_table(receipt: dict[str, Any]) -> Table:
    """A deletion receipt for people: one row per item and check."""
    verdict = "[green]clean[/]" if receipt["clean"] else "[bold red]NOT clean[/]"
    table = Table(title=f"deletion receipt: {len(receipt['deleted'])} items, {verdict}")
    for name in ("item", "kind", "row", "versions", "full text", "vectors", "KV blocks",
                 "shards"):
        table.add_column(name, overflow="fold")
    for item_id, r in receipt["items"].items():
        def mark(name: str, note: str = "") -> str:
            return ("clean" if r[f"{name}_clean"] else "[bold red]FOUND[/]") + note
        table.add_row(item_id[:12], r["kind"], mark("row"),
                      mark("versions", f" ({r['versions_checked']})"),
                      mark("full_text", f" ({r['words_checked']} words)"),
                      mark("vector_index", f" ({r['vectors_checked']})"),
                      mark("kv_blocks", f" ({len(r['kv_blocks_dropped'])} dropped)"),
                      mark("shards", f" ({len(r['shards_stale'])} stale)"))
    copies = receipt["copies_still_holding"]
    table.caption = ("copies written while it existed, which still hold it: " + "; ".join(
        f"{c['action']} {c['file']} ({c['at'][:19]})" for c in copies)) if copies else \
        "no backup or export was written while it existed"
    return table


@click.group()
def retention() -> None:
    """Retention rules of a cube (the global --cube): `show`, `set`, `apply`."""


@retention.command("show")
@click.option("--all", "every", is_flag=True, help="The rules of every cube.")
@click.pass_context
def retention_show(ctx: click.Context, every: bool) -> None:
    """The cube's rules, per kind ("*": the kinds without a rule of their own)."""
    rules = open_memory(ctx).retention(None if every else ctx.obj["cube"])
    table = Table(title=f"retention rules ({len(rules)})")
    for name in ("cube", "kind", "expire after", "archive unused", "purge after", "set by",
                 "set at"):
        table.add_column(name)
    for r in rules:
        table.add_row(r.cube, r.kind, _days(r.expire_after), _days(r.archive_unused),
                      _days(r.purge_after), r.set_by or "",
                      r.set_at.isoformat()[:19] if r.set_at else "")
    emit(ctx, [r.to_dict() for r in rules], table)


@retention.command("set")
@click.argument("kind", default="*")
@click.option("--expire-after", help="Items expire this long after they were recorded "
                                     "(seconds, or 90m, 12h, 30d, 2w).")
@click.option("--archive-unused", help="Archive items nobody read (get or search hit) for this "
                                       "long.")
@click.option("--purge-after", help="Purge archived or expired items this long after (as "
                                    "delete does: every tier).")
@click.option("--clear", is_flag=True, help="Remove the rule for KIND.")
@click.option("--yes", is_flag=True, help="Confirm a rule set that takes every item of the "
                                          "cube out of search.")
@click.pass_context
def retention_set(ctx: click.Context, kind: str, expire_after: str | None,
                  archive_unused: str | None, purge_after: str | None, clear: bool,
                  yes: bool) -> None:
    """Set the cube's rule for KIND (a kind, or * for the kinds without their own rule) and
    show what the next maintenance run will do under it. Exit 2 without --yes when the rules
    would take every item out of search."""
    given = (expire_after, archive_unused, purge_after)
    if clear == any(v is not None for v in given):
        raise errors.InvalidInputError("give --expire-after, --archive-unused or --purge-after,"
                                       " or --clear to remove the rule")
    out = open_memory(ctx).set_retention(ctx.obj["cube"], kind, expire_after=expire_after,
                                         archive_unused=archive_unused,
                                         purge_after=purge_after, confirm=yes)
    counts = out["next_run"]["counts"]
    emit(ctx, out, (f"rule for {kind!r} set" if out["rule"] else f"rule for {kind!r} removed")
         + "; the next run would expire {expired}, archive {archived} and purge {purged} "
           "items".format(**counts))


@retention.command("apply")
@click.option("--dry-run", is_flag=True, help="Only say what would be done.")
@click.option("--all", "every", is_flag=True, help="Every cube (default: the --cube).")
@click.pass_context
def retention_apply(ctx: click.Context, dry_run: bool, every: bool) -> None:
    """Expire, archive and purge now what the rules and the items' expiry say (`memstack
    maintain` and the server's maintenance do this too)."""
    report = open_memory(ctx).apply_retention(cube=None if every else ctx.obj["cube"],
                                              dry_run=dry_run)
    counts = report.counts()
    emit(ctx, report.to_dict(), ("would " if dry_run else "") + ", ".join(
        f"{'purge' if k == 'purged' else k[:-1]} {n}" for k, n in counts.items()) + " items")


def _days(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds / 86400:g} d" if seconds >= 86400 else f"{seconds:g} s"
