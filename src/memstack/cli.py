"""The `memstack` command: each command opens the store, calls one library method, prints.

Tables for people by default, --json for machines. Errors map to exit codes in one place:
2 invalid input, 3 not found, 4 store problem, 5 embedding problem, 1 any other memstack error.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import _errors as errors
from ._memory import Memory

EXIT_CODES: list[tuple[type[errors.MemstackError], int]] = [
    (errors.InvalidInputError, 2), (errors.NotFoundError, 3), (errors.StoreError, 4),
    (errors.EmbeddingError, 5), (errors.MemstackError, 1),
]
console = Console()


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.MemstackError as exc:
            code = next(c for t, c in EXIT_CODES if isinstance(exc, t))
            if ctx.obj and ctx.obj.get("json"):
                click.echo(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
            else:
                Console(stderr=True).print(f"[bold red]{type(exc).__name__}:[/] {exc}")
            ctx.exit(code)


@click.group(cls=_Group)
@click.option("--db", envvar="MEMSTACK_DB", default="memstack.db", show_default=True,
              type=click.Path(dir_okay=False), help="SQLite file (env MEMSTACK_DB).")
@click.option("--cube", envvar="MEMSTACK_CUBE", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_context
def cli(ctx: click.Context, db: str, cube: str, as_json: bool) -> None:
    """memstack: memory for LLM applications and agents."""
    ctx.obj = {"db": db, "cube": cube, "json": as_json}


def _open(ctx: click.Context, db: str | None = None) -> Memory:
    memory = Memory(db or ctx.obj["db"], cube=ctx.obj["cube"])
    ctx.call_on_close(memory.close)
    return memory


def _emit(ctx: click.Context, data: Any, table: Table | str | None = None) -> None:
    if ctx.obj["json"] or table is None:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        console.print(table)


def _items_table(rows: list[dict[str, Any]], title: str, score: bool = False) -> Table:
    table = Table(title=title, show_lines=False)
    if score:
        table.add_column("score", justify="right")
        table.add_column("ranks")
    for name in ("id", "kind", "speaker", "observed", "content"):
        table.add_column(name, overflow="fold", max_width=70 if name == "content" else None)
    for row in rows:
        cells = [row["id"][:8], row["kind"], row.get("speaker") or "",
                 (row.get("observed_at") or "")[:10], row.get("content") or ""]
        if score:
            cells = [f"{row['score']:.4f}", " ".join(f"{k}:{v}" for k, v in row["ranks"].items())
                     ] + cells
        table.add_row(*cells)
    return table


_scope_options = [
    click.option("--user", "user_id"), click.option("--agent", "agent_id"),
    click.option("--session", "session_id"),
]


def scoped(fn):
    for option in reversed(_scope_options):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("text")
@scoped
@click.option("--role", default="user", show_default=True)
@click.option("--speaker", help="Speaker name (default: the role).")
@click.option("--at", "observed_at", help="When it was said (ISO 8601; default now).")
@click.option("--kind", default="turn", show_default=True)
@click.option("--metadata", help="JSON object.")
@click.pass_context
def add(ctx, text, user_id, agent_id, session_id, role, speaker, observed_at, kind, metadata):
    """Remember TEXT."""
    message = {"role": role, "content": text, **({"name": speaker} if speaker else {})}
    result = _open(ctx).add(message, user_id=user_id, agent_id=agent_id, session_id=session_id,
                            observed_at=observed_at, kind=kind, metadata=_json_arg(metadata))
    _emit(ctx, result.to_dict(), f"added {', '.join(result.ids)}")


@cli.command()
@click.argument("query")
@scoped
@click.option("-k", "--top-k", default=10, show_default=True, type=int)
@click.option("--kind", "kinds", multiple=True, help="Repeat for several kinds.")
@click.option("--where", help='JSON filters, e.g. \'{"speaker": "Ann"}\'.')
@click.option("--since")
@click.option("--until")
@click.option("--as-of", help="Search the memory as it was at this time.")
@click.pass_context
def search(ctx, query, user_id, agent_id, session_id, top_k, kinds, where, since, until, as_of):
    """Hybrid search (BM25 + vectors)."""
    hits = _open(ctx).search(query, user_id=user_id, agent_id=agent_id, session_id=session_id,
                             top_k=top_k, kinds=list(kinds) or None, filters=_json_arg(where),
                             since=since, until=until, as_of=as_of)
    rows = [h.to_dict() for h in hits]
    _emit(ctx, rows, _items_table(rows, f"search: {query}", score=True))


@cli.command()
@click.argument("memory_id")
@click.pass_context
def get(ctx, memory_id):
    """Show one memory."""
    _emit(ctx, _open(ctx).get(memory_id).to_dict())


@cli.command("list")
@scoped
@click.option("--kind", "kinds", multiple=True)
@click.option("--limit", default=100, show_default=True, type=int)
@click.option("--offset", default=0, type=int)
@click.pass_context
def list_(ctx, user_id, agent_id, session_id, kinds, limit, offset):
    """List memories, oldest first."""
    items = _open(ctx).get_all(user_id=user_id, agent_id=agent_id, session_id=session_id,
                               kinds=list(kinds) or None, limit=limit, offset=offset)
    rows = [i.to_dict() for i in items]
    _emit(ctx, rows, _items_table(rows, f"{len(rows)} memories"))


@cli.command()
@click.argument("memory_id")
@click.pass_context
def history(ctx, memory_id):
    """Every version of a memory."""
    versions = [v.to_dict() for v in _open(ctx).history(memory_id)]
    table = Table(title=f"history of {memory_id}")
    for name in ("version", "changed_at", "status", "reason", "actor", "content"):
        table.add_column(name, overflow="fold")
    for v in versions:
        table.add_row(str(v["version"]), v["changed_at"][:19], v["status"], v["reason"],
                      v["actor"], v["content"] or "")
    _emit(ctx, versions, table)


@cli.command()
@click.argument("memory_id")
@click.argument("text")
@click.option("--reason", default="update", show_default=True)
@click.pass_context
def update(ctx, memory_id, text, reason):
    """Write a new version of a memory."""
    item = _open(ctx).update(memory_id, text, reason=reason)
    _emit(ctx, item.to_dict(), f"{memory_id} is now version {item.version}")


@cli.command()
@click.argument("memory_id")
@click.option("--reason", default="delete", show_default=True)
@click.pass_context
def delete(ctx, memory_id, reason):
    """Delete a memory (its text is purged; a tombstone remains)."""
    _open(ctx).delete(memory_id, reason=reason)
    _emit(ctx, {"deleted": memory_id}, f"deleted {memory_id}")


@cli.command("import")
@click.argument("file", type=click.File("rb"))
@scoped
@click.pass_context
def import_(ctx, file, user_id, agent_id, session_id):
    """Import FILE: a JSON list of messages, or a conversation file (docs/conversations.md)."""
    try:
        data = json.loads(file.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.InvalidInputError(f"{file.name} is not a UTF-8 JSON file: {exc}") from exc
    memory = _open(ctx)
    if isinstance(data, list):
        result = memory.add(data, user_id=user_id, agent_id=agent_id, session_id=session_id)
        summary = {"turns": len(result.ids), "sessions": 1}
    else:
        mapping = memory.import_conversation(data, user_id=user_id, agent_id=agent_id)
        summary = {"turns": len(mapping), "sessions": len(data.get("sessions", []))}
    _emit(ctx, summary, f"imported {summary['turns']} turns in {summary['sessions']} sessions")


@cli.command()
@click.option("--out", type=click.File("w"), default="-", help="Output file (default stdout).")
@click.pass_context
def export(ctx, out):
    """Export the cube as JSONL, one item per line."""
    for row in _open(ctx).export():
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


@cli.command()
@click.pass_context
def stats(ctx):
    """Counts, size on disk, cubes and the embedder."""
    data = _open(ctx).stats()
    table = Table(title=f"memstack {data['path']}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for name, value in data.items():
        table.add_row(name, json.dumps(value, default=str) if not isinstance(value, str) else value)
    _emit(ctx, data, table)


@cli.command()
@click.option("--limit", default=50, show_default=True, type=int)
@click.pass_context
def audit(ctx, limit):
    """The append-only log of writes."""
    rows = [e.to_dict() for e in _open(ctx).audit_log(limit=limit)]
    table = Table(title="audit log")
    for name in ("seq", "at", "actor", "action", "cube", "item_ids"):
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(str(r["seq"]), r["at"][:19], r["actor"], r["action"], r["cube"] or "",
                      ", ".join(i[:12] for i in r["item_ids"][:5]))
    _emit(ctx, rows, table)


@cli.command()
@click.pass_context
def reembed(ctx):
    """Recompute the cube's vectors with the current embedder."""
    count = _open(ctx).reembed(ctx.obj["cube"])
    _emit(ctx, {"reembedded_keys": count}, f"re-embedded {count} keys")


@cli.command()
@click.option("--db", "demo_db", type=click.Path(dir_okay=False),
              help="Keep the demo memory in this file (default: a temporary one).")
@click.pass_context
def demo(ctx, demo_db):
    """Build a memory from a small synthetic conversation and run a few searches."""
    from .demo import DEMO_CONVERSATION, DEMO_QUERIES

    path = demo_db or str(Path(tempfile.mkdtemp(prefix="memstack-demo-")) / "demo.db")
    memory = _open(ctx, path)
    with console.status("embedding the demo conversation..."):
        mapping = memory.import_conversation(DEMO_CONVERSATION, user_id="maya")
    console.print(f"[green]stored[/] {len(mapping)} turns in "
                  f"{len(DEMO_CONVERSATION['sessions'])} sessions at {path}")
    results = {}
    for query in DEMO_QUERIES:
        hits = memory.search(query, user_id="maya", top_k=3)
        results[query] = [h.to_dict() for h in hits]
        if not ctx.obj["json"]:
            console.print(_items_table(results[query], query, score=True))
    if ctx.obj["json"]:
        click.echo(json.dumps({"db": path, "results": results}, default=str))


@cli.group()
def bench():
    """Benchmarks: retrieval quality and speed. Each prints a table and writes JSON + markdown."""


_bench_options = [
    click.option("--out", type=click.Path(file_okay=False), default="bench-results",
                 show_default=True, help="Folder for JSON, markdown and plots."),
    click.option("--workdir", type=click.Path(file_okay=False),
                 help="Where the benchmark databases go (default: a temporary folder)."),
    click.option("--embed-cache", type=click.Path(file_okay=False),
                 help="Reuse embeddings between runs (kept by text hash in this folder)."),
    click.option("--context-vectors", is_flag=True, help="Embed context keys too."),
]


def bench_options(fn):
    for option in reversed(_bench_options):
        fn = option(fn)
    return fn


def _bench_embedder(embed_cache: str | None):
    from .bench.cache import CachedEmbedder
    from .embed import LocalEmbedder

    return CachedEmbedder(LocalEmbedder(), embed_cache) if embed_cache else LocalEmbedder()


def _run_retrieval(ctx, conversations, dataset, out, workdir, embed_cache, context_vectors,
                   plot, top_k, notes):
    from rich.progress import Progress

    from .bench import report, retrieval

    embedder = _bench_embedder(embed_cache)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"{dataset}: ingest and ask", total=None)
        result = retrieval.run(conversations, dataset=dataset, embedder=embedder, top_k=top_k,
                               workdir=workdir, memory_options={"context_vectors": context_vectors},
                               progress=lambda d, t: bar.update(task, completed=d, total=t))
    if embed_cache:
        embedder.save()
    data = {**result.to_dict(), **notes, "context_vectors": context_vectors, "top_k": top_k}
    paths = report.save(data, Path(out), dataset, report.retrieval_markdown(data))
    if plot:
        paths.append(report.plot_recall(data, Path(out) / f"{dataset}-recall.png"))
    if ctx.obj["json"]:
        click.echo(json.dumps(data, indent=2))
    else:
        console.print(report.retrieval_table(data))
        lat = data["search_latency"]
        console.print(f"ingest {data['turns']} turns in {data['ingest_seconds']} s; search p50 "
                      f"{lat['p50_ms']} ms, p95 {lat['p95_ms']} ms; wrote "
                      f"{', '.join(map(str, paths))}")


@bench.command("locomo")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              default="../shared/data/locomo/locomo10.json", show_default=True)
@click.option("--conversations", "limit", type=int, help="Only the first N conversations.")
@click.option("--plot", is_flag=True, help="Also draw recall against k (PNG).")
@click.option("--top-k", default=50, show_default=True, type=int)
@bench_options
@click.pass_context
def bench_locomo(ctx, data, limit, plot, top_k, out, workdir, embed_cache, context_vectors):
    """Retrieval on LoCoMo: turns only, each session's date as its turns' time."""
    from .bench import datasets

    converted = datasets.convert_locomo(data)
    conversations = converted.conversations[:limit] if limit else converted.conversations
    notes = {"evidence_ids_dropped": converted.dropped_evidence,
             "evidence_ids_normalised": converted.malformed_evidence}
    _run_retrieval(ctx, conversations, "locomo", out, workdir, embed_cache, context_vectors,
                   plot, top_k, notes)


@bench.command("conversations")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), required=True,
              help="A conversation file (docs/conversations.md).")
@click.option("--plot", is_flag=True)
@click.option("--top-k", default=50, show_default=True, type=int)
@bench_options
@click.pass_context
def bench_conversations(ctx, data, plot, top_k, out, workdir, embed_cache, context_vectors):
    """The same retrieval metrics on any dataset in the conversation format."""
    from .bench import datasets

    conversations = datasets.load_conversations(data)
    _run_retrieval(ctx, conversations, Path(data).stem, out, workdir, embed_cache,
                   context_vectors, plot, top_k, {})


@bench.command("convert-locomo")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--output", type=click.File("w"), required=True)
def bench_convert_locomo(data, output):
    """Write LoCoMo in the conversation format (turns and questions only)."""
    from .bench import datasets

    converted = datasets.convert_locomo(data)
    json.dump(converted.conversations, output, ensure_ascii=False)
    console.print(f"{len(converted.conversations)} conversations; "
                  f"{converted.dropped_evidence} evidence ids dropped")


@bench.command("speed")
@click.option("--items", type=int, multiple=True, default=[10_000], show_default=True,
              help="Repeat for several sizes, e.g. --items 10000 --items 100000.")
@click.option("--queries", "queries_count", default=300, show_default=True, type=int)
@click.option("--reuse", is_flag=True,
              help="Search a database of the same size left in --workdir by an earlier run "
                   "instead of ingesting again (the ingest figures are the earlier run's).")
@bench_options
@click.pass_context
def bench_speed(ctx, items, queries_count, reuse, out, workdir, embed_cache, context_vectors):
    """Ingest rate, search latency (query embedding included), disk and memory at scale."""
    from rich.progress import Progress

    from .bench import speed

    embedder = _bench_embedder(embed_cache)
    table = Table(title="memstack speed")
    for name in ("items", "ingest items/s", "p50 ms", "p95 ms", "p99 ms", "disk MB", "peak RSS MB"):
        table.add_column(name, justify="right")
    results = []
    for n in items:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"ingest {n:,} items", total=n)
            result = speed.run(n, embedder=embedder, workdir=workdir, queries_count=queries_count,
                               memory_options={"context_vectors": context_vectors},
                               progress=lambda d, t: bar.update(task, completed=d), reuse=reuse)
        previous = Path(out) / f"speed-{n}.json"
        if result["ingest_seconds"] is None and previous.exists():
            earlier = json.loads(previous.read_text())
            for key in ("ingest_seconds", "ingest_items_per_second"):
                result[key] = earlier.get(key)
            result["ingest_measured"] = earlier.get("ingest_measured", earlier["date"])
        if embed_cache:
            embedder.save()
        result["embed_cache"] = bool(embed_cache)
        speed.save(result, Path(out))
        results.append(result)
        lat = result["search_latency_ms"]
        table.add_row(f"{n:,}", str(result["ingest_items_per_second"]), str(lat["p50"]),
                      str(lat["p95"]), str(lat["p99"]), f"{result['disk_bytes'] / 1e6:.1f}",
                      str(result["peak_rss_mb"]))
    _emit(ctx, results, table)


def _json_arg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.InvalidInputError(f"not valid JSON: {text!r} ({exc})") from exc


def main() -> None:
    cli(prog_name="memstack")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
