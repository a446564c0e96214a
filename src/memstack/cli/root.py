"""The `memstack` group: the global options, and every command of core.py, bench.py and tiers.py
attached to it. This module imports the command modules; none of them imports it."""

from __future__ import annotations

import click

from . import bench, core, govern, learn, tiers
from ._common import Group


@click.group(cls=Group)
@click.option("--db", envvar="MEMSTACK_DB", default="memstack.db", show_default=True,
              type=click.Path(dir_okay=False),
              help="SQLite file, or a PostgreSQL URL postgresql://user:password@host/db "
                   "(env MEMSTACK_DB).")
@click.option("--files", envvar="MEMSTACK_FILES", type=click.Path(file_okay=False),
              help="Folder for the files kept beside a PostgreSQL store (KV blocks, LoRA "
                   "shards); default ./memstack-files (env MEMSTACK_FILES). SQLite keeps them "
                   "beside its file.")
@click.option("--read-only", is_flag=True, envvar="MEMSTACK_READ_ONLY",
              help="Open a PostgreSQL read replica: searches and reads only, writes refused "
                   "(env MEMSTACK_READ_ONLY).")
@click.option("--cube", envvar="MEMSTACK_CUBE", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--llm-url", envvar="MEMSTACK_LLM_URL",
              help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1 (env "
                   "MEMSTACK_LLM_URL). With it, add extracts facts and answer/chat work.")
@click.option("--llm-model", envvar="MEMSTACK_LLM_MODEL",
              help="Model id (env MEMSTACK_LLM_MODEL; default: the server's first model).")
@click.option("--llm-key", envvar="MEMSTACK_LLM_API_KEY",
              help="API key (env MEMSTACK_LLM_API_KEY).")
@click.option("--llm-timeout", envvar="MEMSTACK_LLM_TIMEOUT", default=120.0, show_default=True,
              type=float, help="Seconds per LLM call.")
@click.pass_context
def cli(ctx: click.Context, db: str, files: str | None, read_only: bool, cube: str, as_json: bool, llm_url: str | None,
        llm_model: str | None, llm_key: str | None, llm_timeout: float) -> None:
    """memstack: memory for LLM applications and agents."""
    ctx.obj = {"db": db, "files": files, "read_only": read_only, "cube": cube, "json": as_json,
               "llm": {"url": llm_url, "model": llm_model, "key": llm_key,
                       "timeout": llm_timeout}}


for command in (core.add, core.search, core.get, core.list_, core.history, core.update,
                core.delete, core.import_, core.export, core.stats, govern.audit, core.reembed,
                core.migrate, core.scrub, govern.backup, govern.restore, govern.cube, govern.retention,
                core.demo, core.extract, core.answer, core.chat, core.serve, core.mcp, core.keys,
                bench.bench, tiers.generate, tiers.kv, tiers.consolidate, tiers.maintain,
                tiers.merge, tiers.shards, tiers.ask, learn.feedback, learn.reflect, learn.dedupe):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="memstack")
