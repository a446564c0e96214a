"""`memstack bench ...`: retrieval quality, QA with an LLM, and speed. Each prints a table and
writes JSON + markdown."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..cli import _emit, console


@click.group()
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
    from .cache import CachedEmbedder
    from ..embed import LocalEmbedder

    return CachedEmbedder(LocalEmbedder(), embed_cache) if embed_cache else LocalEmbedder()


def _run_retrieval(ctx, conversations, dataset, out, workdir, embed_cache, context_vectors,
                   plot, top_k, notes):
    from rich.progress import Progress

    from . import report, retrieval

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
    from . import datasets

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
    from . import datasets

    conversations = datasets.load_conversations(data)
    _run_retrieval(ctx, conversations, Path(data).stem, out, workdir, embed_cache,
                   context_vectors, plot, top_k, {})


@bench.command("convert-locomo")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--output", type=click.File("w"), required=True)
def bench_convert_locomo(data, output):
    """Write LoCoMo in the conversation format (turns and questions only)."""
    from . import datasets

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

    from . import speed

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


