"""The memory commands of `memstack`: add, search, get, list, history, update, delete, import,
export, stats, audit, reembed, demo, extract, answer, chat, serve, mcp and keys. Each opens the
memory, calls one library method and prints (see _common.py)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from .. import _errors as errors
from .._memory import Memory
from .._models import AddResult
from ._common import console, emit, err, items_table, json_arg, open_memory, scoped
from .govern import receipt_table


@click.command()
@click.argument("text")
@scoped
@click.option("--role", default="user", show_default=True)
@click.option("--speaker", help="Speaker name (default: the role).")
@click.option("--at", "observed_at", help="When it was said (ISO 8601; default now).")
@click.option("--kind", default="turn", show_default=True)
@click.option("--metadata", help="JSON object.")
@click.option("--infer/--no-infer", default=True, show_default=True,
              help="Extract facts with the LLM (when one is configured).")
@click.option("--ttl", help="Expire after this long (seconds, or 90m, 12h, 30d, 2w): it leaves "
                            "search then; maintenance archives it, and purges it under the "
                            "cube's purge_after rule for its kind.")
@click.option("--expires-at", help="Expire at this time (ISO 8601); instead of --ttl.")
@click.pass_context
def add(ctx, text, user_id, agent_id, session_id, role, speaker, observed_at, kind, metadata,
        infer, ttl, expires_at):
    """Remember TEXT."""
    message = {"role": role, "content": text, **({"name": speaker} if speaker else {})}
    result = open_memory(ctx).add(message, user_id=user_id, agent_id=agent_id,
                                  session_id=session_id, observed_at=observed_at, kind=kind,
                                  metadata=json_arg(metadata), infer=infer, ttl=ttl,
                                  expires_at=expires_at)
    emit(ctx, result.to_dict(), f"added {', '.join(result.ids)}" + "".join(
        f"\n{line}" for line in _fact_lines(result)))
    _exit_if_extraction_failed(ctx, result)


def _fact_lines(result: AddResult) -> list[str]:
    """One line per fact operation, for people."""
    marks = {"ADD": "[green]+ fact[/]", "UPDATE": "[yellow]~ updated[/]",
             "DELETE": "[red]- retracted[/]", "NOOP": "[dim]= already known[/]"}
    lines = []
    for op in result.facts:
        line = f"  {marks[op.event]} {op.text or op.previous_text}"
        if op.event in ("UPDATE", "DELETE"):
            line += f"  [dim](was: {op.previous_text}; {op.previous_id[:8]} superseded)[/]"
        lines.append(line)
    return lines


def _exit_if_extraction_failed(ctx: click.Context, result: AddResult) -> None:
    if result.extraction is not None and not result.extraction.ok:
        err.print(f"[bold red]fact extraction failed[/] (turns stored; retry "
                  f"with `memstack extract {' '.join(result.ids)}`): "
                  f"{escape(str(result.extraction.error))}")
        ctx.exit(6)


@click.command()
@click.argument("query")
@scoped
@click.option("-k", "--top-k", default=10, show_default=True, type=int)
@click.option("--kind", "kinds", multiple=True, help="Repeat for several kinds.")
@click.option("--where", help='JSON filters, e.g. \'{"speaker": "Ann"}\'.')
@click.option("--since")
@click.option("--until")
@click.option("--as-of", help="Search the memory as it was at this time.")
@click.option("--no-feedback", is_flag=True,
              help="Results as if this user had given no feedback (memstack feedback).")
@click.pass_context
def search(ctx, query, user_id, agent_id, session_id, top_k, kinds, where, since, until, as_of,
           no_feedback):
    """Hybrid search (BM25 + vectors)."""
    hits = open_memory(ctx).search(query, user_id=user_id, agent_id=agent_id,
                                   session_id=session_id, top_k=top_k, kinds=list(kinds) or None,
                                   filters=json_arg(where), since=since, until=until, as_of=as_of,
                                   feedback=not no_feedback)
    rows = [h.to_dict() for h in hits]
    emit(ctx, rows, items_table(rows, f"search: {query}", score=True))


@click.command()
@click.argument("memory_id")
@click.pass_context
def get(ctx, memory_id):
    """Show one memory."""
    emit(ctx, open_memory(ctx).get(memory_id).to_dict())


@click.command("list")
@scoped
@click.option("--kind", "kinds", multiple=True)
@click.option("--limit", default=100, show_default=True, type=int)
@click.option("--offset", default=0, type=int)
@click.pass_context
def list_(ctx, user_id, agent_id, session_id, kinds, limit, offset):
    """List memories, oldest first."""
    items = open_memory(ctx).get_all(user_id=user_id, agent_id=agent_id, session_id=session_id,
                                    kinds=list(kinds) or None, limit=limit, offset=offset)
    rows = [i.to_dict() for i in items]
    emit(ctx, rows, items_table(rows, f"{len(rows)} memories"))


@click.command()
@click.argument("memory_id")
@click.pass_context
def history(ctx, memory_id):
    """Every version of a memory."""
    versions = [v.to_dict() for v in open_memory(ctx).history(memory_id)]
    table = Table(title=f"history of {memory_id}")
    for name in ("version", "changed_at", "status", "reason", "actor", "content"):
        table.add_column(name, overflow="fold")
    for v in versions:
        table.add_row(str(v["version"]), v["changed_at"][:19], v["status"], v["reason"],
                      v["actor"], v["content"] or "")
    emit(ctx, versions, table)


@click.command()
@click.argument("memory_id")
@click.argument("text")
@click.option("--reason", default="update", show_default=True)
@click.pass_context
def update(ctx, memory_id, text, reason):
    """Write a new version of a memory."""
    item = open_memory(ctx).update(memory_id, text, reason=reason)
    emit(ctx, item.to_dict(), f"{memory_id} is now version {item.version}")


@click.command()
@click.argument("memory_id")
@click.option("--reason", default="delete", show_default=True)
@click.option("--cascade/--no-cascade", default=True, show_default=True,
              help="Also delete facts derived from it.")
@click.option("--receipt", is_flag=True, help="Check every tier afterwards and print what "
              "was found clean, and which backups and exports still hold it (exit 4 if a "
              "check fails).")
@click.pass_context
def delete(ctx, memory_id, reason, cascade, receipt):
    """Delete a memory (its text is purged; a tombstone remains)."""
    result = open_memory(ctx).delete(memory_id, reason=reason, cascade=cascade, receipt=receipt)
    if receipt:
        emit(ctx, result, receipt_table(result))
        if not result["clean"]:
            ctx.exit(4)
        return
    emit(ctx, {"deleted": memory_id, "items_deleted": result},
         f"deleted {memory_id} ({result} item{'s' if result != 1 else ''} with what it covered)")


@click.command("import")
@click.argument("file", type=click.File("rb"))
@scoped
@click.option("--infer/--no-infer", default=False, show_default=True,
              help="Extract facts with the LLM from each session (slow for big files).")
@click.pass_context
def import_(ctx, file, user_id, agent_id, session_id, infer):
    """Import FILE: a JSON list of messages, or a conversation file (docs/conversations.md)."""
    try:
        data = json.loads(file.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.InvalidInputError(f"{file.name} is not a UTF-8 JSON file: {exc}") from exc
    memory = open_memory(ctx)
    if isinstance(data, list):
        result = memory.add(data, user_id=user_id, agent_id=agent_id, session_id=session_id,
                            infer=infer)
        summary = {"turns": len(result.ids), "sessions": 1}
    else:
        mapping = memory.import_conversation(data, user_id=user_id, agent_id=agent_id,
                                             infer=infer)
        summary = {"turns": len(mapping), "sessions": len(data.get("sessions", []))}
    emit(ctx, summary, f"imported {summary['turns']} turns in {summary['sessions']} sessions")


@click.command()
@click.option("--out", type=click.File("w"), default="-", help="Output file (default stdout).")
@click.pass_context
def export(ctx, out):
    """Export the cube as JSONL, one item per line."""
    for row in open_memory(ctx).export(destination=str(Path(out.name).resolve())
                                       if out.name != "<stdout>" else "(stdout)"):
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


@click.command()
@click.pass_context
def stats(ctx):
    """Counts, size on disk, cubes and the embedder."""
    data = open_memory(ctx).stats()
    table = Table(title=f"memstack {data['path']}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for name, value in data.items():
        table.add_row(name, json.dumps(value, default=str) if not isinstance(value, str) else value)
    emit(ctx, data, table)


@click.command()
@click.pass_context
def reembed(ctx):
    """Recompute the cube's vectors with the current embedder."""
    count = open_memory(ctx).reembed(ctx.obj["cube"])
    emit(ctx, {"reembedded_keys": count}, f"re-embedded {count} keys")


@click.command()
@click.argument("source")
@click.argument("target")
@click.pass_context
def migrate(ctx, source, target):
    """Copy the whole store SOURCE into the empty store TARGET (SQLite file or postgresql://
    URL, either way): items with ids, versions, audit log, vectors, users, keys and grants."""
    counts = open_memory(ctx, source).migrate(target)
    emit(ctx, counts, ", ".join(f"{table} {n}" for table, n in counts.items()))


@click.command()
@click.pass_context
def scrub(ctx):
    """Remove what is left of deleted memories from the store's files (on PostgreSQL: VACUUM
    FULL of the tables that held text, WAL switched and checkpointed; see docs/scaling.md)."""
    report = open_memory(ctx).scrub()
    emit(ctx, report, ("complete: " if report["complete"] else "incomplete (set wal_recycle = "
                       "off on the server): ") + "; ".join(report["ran"]))


@click.command()
@click.option("--db", "demo_db", type=click.Path(dir_okay=False),
              help="Keep the demo memory in this file (default: a temporary one).")
@click.pass_context
def demo(ctx, demo_db):
    """Build a memory from a small synthetic conversation and run a few searches."""
    from ..demo import DEMO_CONVERSATION, DEMO_QUERIES

    path = demo_db or str(Path(tempfile.mkdtemp(prefix="memstack-demo-")) / "demo.db")
    memory = open_memory(ctx, path)
    with console.status("embedding the demo conversation..."):
        mapping = memory.import_conversation(DEMO_CONVERSATION, user_id="maya")
    console.print(f"[green]stored[/] {len(mapping)} turns in "
                  f"{len(DEMO_CONVERSATION['sessions'])} sessions at {path}")
    results = {}
    for query in DEMO_QUERIES:
        hits = memory.search(query, user_id="maya", top_k=3)
        results[query] = [h.to_dict() for h in hits]
        if not ctx.obj["json"]:
            console.print(items_table(results[query], query, score=True))
    if ctx.obj["json"]:
        click.echo(json.dumps({"db": path, "results": results}, default=str))


@click.command()
@click.argument("memory_ids", nargs=-1, required=True)
@click.pass_context
def extract(ctx, memory_ids):
    """Extract facts again from stored turns of one session (needs --llm-url)."""
    extraction = open_memory(ctx).extract(list(memory_ids))
    result = AddResult([], None, extraction)
    emit(ctx, extraction.to_dict(), "\n".join(_fact_lines(result)) or "no facts")
    _exit_if_extraction_failed(ctx, result)


@click.command()
@click.argument("question")
@scoped
@click.option("--max-context-tokens", default=2000, show_default=True, type=int)
@click.option("--as-of", help="Answer from the memory as it was at this time.")
@click.pass_context
def answer(ctx, question, user_id, agent_id, session_id, max_context_tokens, as_of):
    """Answer QUESTION from memory with the LLM (needs --llm-url)."""
    reply = open_memory(ctx).answer(question, user_id=user_id, agent_id=agent_id,
                                   session_id=session_id, max_context_tokens=max_context_tokens,
                                   as_of=as_of)
    data = {k: v for k, v in reply.to_dict().items() if k != "hits"}
    emit(ctx, data, f"{reply.text}\n[dim]from {len(reply.memory_ids)} memories, "
                    f"{reply.context_tokens} context tokens, {reply.seconds} s; answer "
                    f"{reply.id} (memstack feedback {reply.id} positive|negative)[/]")


@click.command()
@click.option("--user", "user_id", required=True, help="Whose memory this is.")
@click.option("--agent", "agent_id")
@click.option("--session", "session_id", help="Session id (default: a new one).")
@click.pass_context
def chat(ctx, user_id, agent_id, session_id):
    """Talk with a model that remembers: each question is answered from memory, and each
    exchange is stored (facts extracted, superseded, recalled). /facts lists current facts,
    /history ID shows a memory's versions, /quit ends."""
    import uuid

    memory = open_memory(ctx)
    if memory.llm is None:
        raise errors.InvalidInputError("chat needs an LLM: pass --llm-url (or MEMSTACK_LLM_URL)")
    session_id = session_id or f"chat-{uuid.uuid4().hex[:8]}"
    console.print(f"[dim]memstack chat: user {user_id}, session {session_id}, model "
                  f"{memory.llm.name}. /facts, /history ID, /quit[/]")
    while True:
        try:
            line = console.input("[bold]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if line in ("/quit", "/exit"):
            break
        if line:
            _chat_turn(memory, line, user_id, agent_id, session_id)


def _chat_turn(memory: Memory, line: str, user_id: str, agent_id: str | None,
               session_id: str) -> None:
    if line == "/facts":
        for item in memory.get_all(user_id=user_id, agent_id=agent_id,
                                   kinds=["fact", "procedure"]):
            console.print(f"  {item.id[:8]} [dim]{item.valid_from:%Y-%m-%d}[/] {item.content}")
        return
    if line.startswith("/history "):
        item_id = line.split(maxsplit=1)[1]
        matches = [i.id for i in memory.get_all(user_id=user_id, include_inactive=True,
                                                limit=100_000) if i.id.startswith(item_id)]
        for v in memory.history(matches[0] if len(matches) == 1 else item_id):
            console.print(f"  v{v.version} {v.status} {v.content} [dim]{v.reason}[/]")
        return
    try:
        reply = memory.answer(line, user_id=user_id, agent_id=agent_id)
        text = reply.text or "(no answer)"
        console.print(f"[bold cyan]assistant>[/] {text} [dim]({len(reply.memory_ids)} "
                      f"memories)[/]")
    except errors.LLMError as exc:
        text = None
        console.print(f"[red]the LLM did not answer: {exc}[/]")
    messages = [{"role": "user", "name": user_id, "content": line}]
    if text:
        messages.append({"role": "assistant", "content": text})
    result = memory.add(messages, user_id=user_id, agent_id=agent_id, session_id=session_id)
    for fact_line in _fact_lines(result):
        console.print(fact_line)
    if result.extraction is not None and not result.extraction.ok:
        console.print(f"  [red]fact extraction failed (turns kept): {result.extraction.error}[/]")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--rate-limit", default=100.0, show_default=True, type=float,
              help="Requests per second per key (bursts of twice that); 0 turns it off.")
@click.option("--max-body-bytes", default=2_000_000, show_default=True, type=int)
@click.option("--body-timeout", default=30.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds a client may take to send a request body (each piece within 10 s "
                   "of the last); a slower one is answered 408 and disconnected.")
@click.option("--threads", default=16, show_default=True, type=int,
              help="Threads running requests in each worker.")
@click.option("--shutdown-timeout", default=30.0, show_default=True,
              type=click.FloatRange(min=0),
              help="On SIGTERM or Ctrl-C: seconds the requests in flight get to finish (new "
                   "connections are refused meanwhile); then the indexes are saved and the "
                   "server exits.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker processes [default: one per core, up to 4; 1 with --model]. On "
                   "SQLite each worker keeps its own rate limits; on PostgreSQL every process "
                   "shares them.")
@click.option("--query-cache", default=4096, show_default=True, type=click.IntRange(min=0),
              help="Query vectors kept per worker, so a repeated search is not encoded "
                   "again; 0 turns it off.")
@click.option("--queries", type=click.Choice(["int8", "fp32"]), default="int8",
              show_default=True,
              help="How the local model encodes search queries: int8 is 2.3x cheaper "
                   "(recall within 0.005 on LoCoMo); stored texts are always fp32.")
@click.option("--model", envvar="MEMSTACK_MODEL",
              help="Serve /v1/generate and /v1/ask with this local model: 'smollm2' or a "
                   "transformers model folder, loaded once per worker (env MEMSTACK_MODEL).")
@click.option("--maintain-every", default=3600.0, show_default=True, type=float,
              help="With --model: run the KV scheduler and retrain stale shards in the "
                   "background every this many seconds (the first run one interval after "
                   "start); 0 turns it off. One process at a time (a lock in the store).")
@click.option("--maintain-quiet", default=60.0, show_default=True, type=float,
              help="Start a run only after this many seconds without a request.")
@click.option("--maintain-window", help="Start runs only inside this daily window, "
                                        "HH:MM-HH:MM in UTC (e.g. 01:00-05:00).")
@click.option("--maintain-cpu", type=float,
              help="CPU seconds a run may use; then it starts no new work.")
@click.option("--log-json", is_flag=True,
              help="One JSON line per request on stderr (request id, route, status, duration, "
                   "key id), and errors as JSON lines with their traceback.")
@click.option("--public-metrics", is_flag=True,
              help="Serve /metrics without a key (by default it needs an admin key once keys "
                   "exist): for a scraper on a private network.")
@click.pass_context
def serve(ctx, host, port, rate_limit, max_body_bytes, body_timeout, threads,
          shutdown_timeout, workers,
          query_cache, queries, model, maintain_every, maintain_quiet, maintain_window, maintain_cpu,
          log_json, public_metrics):
    """Serve the REST API (/docs, /openapi.json), MCP (/mcp) and the web page (/ui).

    Requests need an API key (memstack keys create). With no key at all the server runs open
    as a local admin, which is allowed only on a loopback address."""
    from ..server.guards import raise_open_files
    from ..server.run import default_workers
    from ..server.run import serve as run_server

    if ctx.obj.get("read_only"):
        raise click.UsageError("serve writes (keys' use, rate limits, adds): point it at the "
                               "primary; read replicas serve the library and read commands")
    memory = open_memory(ctx)
    workers = workers or default_workers(model)
    banner = f"memstack serving {memory.location} on http://{host}:{port} (/docs, /mcp, /ui)"
    if log_json:  # every line on stderr is JSON
        from ..server.observe import json_line

        click.echo(json_line(banner, "memstack.cli"), err=True)
    else:
        err.print(banner, markup=False)
    if workers > 1 and ctx.obj["llm"]["url"]:  # the workers read the LLM from the environment
        for name, value in (("URL", ctx.obj["llm"]["url"]), ("MODEL", ctx.obj["llm"]["model"]),
                            ("API_KEY", ctx.obj["llm"]["key"])):
            if value:
                os.environ[f"MEMSTACK_LLM_{name}"] = value
    raise_open_files()  # each connection, even an idle one, holds a file descriptor
    run_server(memory, host=host, port=port, rate_limit=rate_limit,
               max_body_bytes=max_body_bytes, body_timeout=body_timeout, threads=threads,
               shutdown_timeout=shutdown_timeout,
               workers=workers, model=model, query_cache=query_cache,
               queries=queries,
               maintenance={"every": maintain_every, "quiet": maintain_quiet,
                            "window": maintain_window, "cpu_seconds": maintain_cpu},
               log_json=log_json, public_metrics=public_metrics)


@click.command()
@click.option("--key", envvar="MEMSTACK_API_KEY", help="API key the MCP client acts with "
                                                       "(env MEMSTACK_API_KEY).")
@click.option("--model", envvar="MEMSTACK_MODEL",
              help="Also offer generate_from_memory and ask_shard with this local model: "
                   "'smollm2' or a transformers model folder (env MEMSTACK_MODEL).")
@click.pass_context
def mcp(ctx, key, model):
    """Serve MCP over stdio (for assistants that start memstack as a subprocess)."""
    from ..server.run import serve_stdio

    serve_stdio(open_memory(ctx), key, model)


@click.group()
def keys():
    """API keys for the server: create (shown once), list, revoke."""


@keys.command("create")
@click.option("--user", required=True)
@click.option("--role", type=click.Choice(["admin", "user"]), help="Default: user (new users).")
@click.option("--cubes", help="Comma-separated cubes this key is limited to (created for the "
                              "user if missing).")
@click.option("--label")
@click.pass_context
def keys_create(ctx, user, role, cubes, label):
    """Create a key for USER; prints it once."""
    from ..server.auth import Keys

    memory = open_memory(ctx)
    names = [c.strip() for c in cubes.split(",") if c.strip()] if cubes else None
    new = Keys(memory.store).create_key(user, role=role, cubes=names, label=label)
    for name in names or []:
        if name not in {c.name for c in memory.cubes()}:
            memory.create_cube(name, owner=user)
    emit(ctx, {"key_id": new.key_id, "token": new.token, "user": new.user, "role": new.role},
         f"{new.token}\n[dim]key {new.key_id} for {new.user} ({new.role}); shown only now[/]")


@keys.command("list")
@click.option("--user")
@click.pass_context
def keys_list(ctx, user):
    """Keys (never their secrets)."""
    from ..server.auth import Keys

    rows = Keys(open_memory(ctx).store).keys(user)
    table = Table(title="API keys")
    for name in ("id", "user", "cubes", "label", "revoked"):
        table.add_column(name)
    for r in rows:
        table.add_row(r["id"], r["user"], ",".join(r["cubes"] or []) or "all",
                      r["label"] or "", "yes" if r["revoked"] else "")
    emit(ctx, rows, table)


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx, key_id):
    """Revoke a key at once."""
    from ..server.auth import Keys

    Keys(open_memory(ctx).store).revoke(key_id)
    emit(ctx, {"revoked": key_id}, f"revoked {key_id}")
