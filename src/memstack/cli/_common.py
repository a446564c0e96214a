"""What every command module of the CLI shares: the consoles, the error -> exit code mapping,
opening the Memory from the global options, the scope options and printing (JSON or a table).
The command modules import this one; it imports none of them."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import _errors as errors
from .._memory import Memory
from ..llm import OpenAIChat
from ..llm.client import from_options
from ..write.repair import summary

EXIT_CODES: list[tuple[type[errors.MemstackError], int]] = [
    (errors.InvalidInputError, 2), (errors.NotFoundError, 3), (errors.StoreError, 4),
    (errors.EmbeddingError, 5), (errors.LLMError, 6), (errors.LockHeldError, 7),
    (errors.MemstackError, 1),
]
# messages and errors are never hard-wrapped: a path or an id stays whole at any terminal
# width, and output read by a program does not depend on the width (tables still fit it);
# piped into a file, a table keeps its columns whole (rich would fold it to 80 columns)
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get(
    "COLUMNS") else 200)
err = Console(stderr=True, soft_wrap=True)


class Group(click.Group):
    """The root group: a memstack error from any command becomes a message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.MemstackError as exc:
            code = next(c for t, c in EXIT_CODES if isinstance(exc, t))
            if ctx.obj and ctx.obj.get("json"):
                click.echo(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
            else:
                err.print(f"[bold red]{type(exc).__name__}:[/] {escape(str(exc))}",
                              highlight=False)
            ctx.exit(code)


def open_memory(ctx: click.Context, db: str | None = None) -> Memory:
    memory = Memory(db or ctx.obj["db"], cube=ctx.obj["cube"], llm=llm_client(ctx.obj["llm"]),
                    files=ctx.obj.get("files"), read_only=ctx.obj.get("read_only", False))
    ctx.call_on_close(memory.close)
    for report in memory.repaired:
        err.print(f"memstack: {memory.location}: {summary(report)}", markup=False)
    return memory


def llm_client(options: dict[str, Any]) -> OpenAIChat | None:
    return from_options(options["url"], options["model"], options["key"], options["timeout"])


def emit(ctx: click.Context, data: Any, table: Table | str | None = None) -> None:
    if ctx.obj["json"] or table is None:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        console.print(table, soft_wrap=isinstance(table, str))


def items_table(rows: list[dict[str, Any]], title: str, score: bool = False) -> Table:
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


def json_arg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.InvalidInputError(f"not valid JSON: {text!r} ({exc})") from exc
