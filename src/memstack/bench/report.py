"""Print and save benchmark results: a rich table, JSON, markdown and an optional PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .retrieval import KS, METRICS


# the columns of a table by category, when there are too many categories to be columns
SUMMARY = ("recall_any@5", "recall_any@10", "recall_all@10", "ndcg@10", "session_recall_any@5")


def retrieval_table(result: dict[str, Any]) -> Table:
    metrics = result["metrics"]
    table = Table(title=f"{result['dataset']}: retrieval ({result['questions']} questions, "
                        f"{result['turns']} turns)")
    if len(metrics) > 5:  # BEAM's ten question types: one row each (all metrics in the JSON)
        table.add_column("category", no_wrap=True)
        table.add_column("n", justify="right")
        for key in SUMMARY:
            table.add_column(key.replace("session_", "session "), justify="right")
        for name, row in metrics.items():
            table.add_row(name, str(row["count"]), *[_cell(row.get(key), "{:.3f}")
                                                     for key in SUMMARY])
        return table
    table.add_column("metric", no_wrap=True)
    for name in metrics:
        table.add_column(f"{name}\nn={metrics[name]['count']}", justify="right")
    for metric in METRICS:
        for k in KS:
            key = f"{metric}@{k}"
            table.add_row(key, *[_cell(metrics[c].get(key), "{:.3f}") for c in metrics])
    return table


def retrieval_markdown(result: dict[str, Any]) -> str:
    metrics = result["metrics"]
    names = list(metrics)
    header = " | ".join(f"{n} (n={metrics[n]['count']})" for n in names)
    lines = [f"| metric | {header} |",
             "|---|" + "---:|" * len(names)]
    for metric in METRICS:
        for k in KS:
            key = f"{metric}@{k}"
            lines.append(f"| {key} | " + " | ".join(_cell(metrics[n].get(key), "{:.3f}")
                                                    for n in names) + " |")
    lat = result["search_latency"]
    lines += ["", f"Ingest: {result['turns']} turns in {result['ingest_seconds']} s "
                  f"({result['ingest_turns_per_second']} turns/s). Search latency: "
                  f"p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms."]
    return "\n".join(lines) + "\n"


QA_COLUMNS = (("n", "count", "{:d}"), ("token F1", "f1", "{:.3f}"), ("judge", "judge", "{:.3f}"),
              ("judge false +", "judge_false_positive", "{:.3f}"),
              ("context tokens", "context_tokens", "{:.0f}"),
              ("prompt tokens", "prompt_tokens", "{:.0f}"),
              ("answer p50 ms", "answer_p50_ms", "{:.0f}"),
              ("answer p95 ms", "answer_p95_ms", "{:.0f}"), ("judge p50 ms", "judge_p50_ms",
                                                           "{:.0f}"))


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def qa_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"locomo QA: {result['questions']} questions, answered by "
                        f"{result['answer_llm']}, judged by {result['judge_llm'] or 'nobody'}")
    table.add_column("category", no_wrap=True)
    for title, _, _ in QA_COLUMNS:
        table.add_column(title, justify="right")
    for name, row in result["metrics"].items():
        table.add_row(name, *[_cell(row[key], fmt) for _, key, fmt in QA_COLUMNS])
    return table


def qa_ingest_line(result: dict[str, Any]) -> str:
    ing = result["ingest"]
    extraction = (f"{ing['llm_calls_per_add']} LLM calls per add (max "
                  f"{ing['llm_calls_per_add_max']}), {ing['failed_extractions']} failed "
                  f"extractions, operations {ing['operations']}, "
                  f"{ing['dropped_unsupported']} unsupported facts dropped"
                  if result["extract"] else "no fact extraction")
    return (f"Ingest: {ing['turns']} turns in {ing['adds']} adds, {ing['seconds']} s; "
            f"{extraction}.")


def qa_markdown(result: dict[str, Any]) -> str:
    lines = ["| category | " + " | ".join(t for t, _, _ in QA_COLUMNS) + " |",
             "|---|" + "---:|" * len(QA_COLUMNS)]
    for name, row in result["metrics"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[key], fmt)
                                                  for _, key, fmt in QA_COLUMNS) + " |")
    lines += ["", qa_ingest_line(result),
              f"Answering: {result['answer_llm']}; judge: {result['judge_llm']}; top_k "
              f"{result['top_k']}, context budget {result['max_context_tokens']} tokens."]
    return "\n".join(lines) + "\n"


def save(result: dict[str, Any], out: Path, stem: str, markdown: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(markdown)
    return paths


def plot_recall(result: dict[str, Any], path: Path) -> Path:
    try:
        import matplotlib
    except ImportError as exc:
        from .._errors import MissingExtraError

        raise MissingExtraError("--plot needs matplotlib: pip install 'memstack[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    turns = all("recall_any@1" in v for v in result["metrics"].values())
    metric = "recall_any" if turns else "session_recall_any"  # LongMemEval may name sessions only
    for name, values in result["metrics"].items():
        ax.plot(KS, [values[f"{metric}@{k}"] for k in KS], marker="o", label=name)
    ax.set_xlabel("k")
    ax.set_ylabel(f"{'turn' if turns else 'session'} recall_any@k")
    ax.set_xticks(list(KS))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result['dataset']}: recall against k")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(table: Table) -> None:
    Console().print(table)
