"""Commands of memory that improves with use: feedback, dedupe, reflect."""

from __future__ import annotations

import click
from rich.markup import escape

from ._common import emit, open_memory  # noqa: F401
from ._common import err


@click.command()
@click.argument("target")
@click.argument("signal", type=click.Choice(["positive", "negative"]))
@click.option("--query", help="The query TARGET was a hit for (an answer's own question by "
                              "default); without one, rankings do not move.")
@click.option("--correction", help="What is right instead: kept as a memory ranked ahead of "
                                   "the corrected one (with --llm-url: said to the fact "
                                   "manager, which may update the fact).")
@click.option("--user", "user_id", help="Whose searches it moves, as `search --user` (an "
                                        "answer's own user by default).")
@click.option("--agent", "agent_id")
@click.pass_context
def feedback(ctx, target, signal, query, correction, user_id, agent_id):
    """Say whether memory TARGET (or the memories of answer/generation TARGET) helped.

    Later searches of the same user for similar queries rank those memories up (positive) or
    down (negative), within a bound, fading over 90 days. Delete the feedback's id to undo it."""
    result = open_memory(ctx).feedback(target, signal, query=query, correction=correction,
                                       user_id=user_id, agent_id=agent_id)
    moved = "moves searches like: " + result.query if result.query else \
        "moves no ranking (no --query)"
    lines = [f"feedback {result.id}: {signal} on {len(result.item_ids)} memories; {moved}"]
    if result.correction_id:
        lines.append(f"correction stored as {result.correction_id}")
    lines += [f"  {op.event} {op.id or op.previous_id}: {op.text}" for op in result.operations]
    emit(ctx, result.to_dict(), "\n".join(lines))


@click.command()
@click.option("--user", "user_id", help="Whose sessions to learn from.")
@click.option("--agent", "agent_id", help="Or an agent's.")
@click.option("--sessions", default=5, show_default=True, type=int,
              help="How many of the newest sessions to read.")
@click.option("--dry-run", is_flag=True, help="Ask the LLM, show what it found, write nothing.")
@click.pass_context
def reflect(ctx, user_id, agent_id, sessions, dry_run):
    """Distil insights and procedures from the newest sessions with the LLM (needs --llm-url):
    what the user prefers, what worked. Each cites the turns and facts it came from; repeats
    of existing insights are skipped. At most 4 LLM calls; on an LLM failure the message is
    printed, nothing stored is changed, and the exit code is 6."""
    report = open_memory(ctx).reflect(user_id=user_id, agent_id=agent_id, sessions=sessions,
                                      dry_run=dry_run)
    verb = "would add" if dry_run else "added"
    lines = [f"  [green]+ {i.kind}[/] {escape(i.text)}  [dim]({len(i.source_ids)} sources)[/]"
             for i in report.insights]
    lines += [f"  [dim]= already known ({i.duplicate_of[:8]}): {escape(i.text)}[/]"
              for i in report.duplicates]
    lines.append(f"[dim]{verb} {len(report.insights)}, skipped {len(report.duplicates)} "
                 f"repeats, dropped {report.dropped} ungrounded; read {report.lines_read} turns "
                 f"of {report.sessions_read} sessions ({report.unread_lines} unread) in "
                 f"{report.llm_calls} LLM calls, {report.seconds} s[/]")
    emit(ctx, report.to_dict(), "\n".join(lines))
    if not report.ok:
        err.print(f"[bold red]reflect failed[/] (what was stored is unchanged"
                  f"{'; the insights above were kept' if report.insights else ''}): "
                  f"{escape(str(report.error))}")
        ctx.exit(6)


@click.command()
@click.option("--dry-run", is_flag=True, help="Only show the groups that would be merged.")
@click.option("--user", "user_id", help="Only this user's facts, insights and procedures.")
@click.option("--all", "every", is_flag=True, help="Every cube (default: the --cube).")
@click.pass_context
def dedupe(ctx, dry_run, user_id, every):
    """Merge facts, insights and procedures that say the same thing within one scope (never
    across users or cubes; never turns): the oldest keeps the union of provenance, the others
    are superseded by it and leave search (`history` shows it). `maintain` runs it too."""
    from rich.table import Table

    report = open_memory(ctx).dedupe(cube=None if every else ctx.obj["cube"], user_id=user_id,
                                     dry_run=dry_run)
    counts = report.counts()
    table = Table(title=f"{'would merge' if dry_run else 'merged'} {counts['merged']} items "
                        f"into {counts['groups']} (of {counts['scanned']} scanned)")
    for name in ("cube", "kind", "user", "kept", "merged", "similarity", "text"):
        table.add_column(name)
    for g in report.groups:
        table.add_row(g.cube, g.kind, g.user_id or "", g.kept, "\n".join(g.merged),
                      f"{g.similarity:.3f}", escape(g.content or ""))
    emit(ctx, report.to_dict(), table)
