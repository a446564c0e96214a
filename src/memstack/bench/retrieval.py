"""Retrieval quality on long conversations: recall, ndcg and session recall per category.

Every conversation is ingested into a fresh cube through Memory.import_conversation (turns only,
each session's date as its turns' time) and every question is asked through Memory.search.
"""

from __future__ import annotations

import math
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .._memory import Memory
from ..embed import Embedder

KS = (1, 5, 10, 20)
METRICS = ("recall_any", "recall_all", "ndcg", "session_recall_any", "session_recall_all",
           "session_ndcg")
ADVERSARIAL = "adversarial"


@dataclass
class QuestionRun:
    id: str
    category: str
    evidence: list[str]
    retrieved: list[str]
    latency_ms: float
    evidence_sessions: list[str] = field(default_factory=list)  # else the evidence turns'

    @property
    def wanted_sessions(self) -> set[str]:
        return set(self.evidence_sessions) or {session_of(t) for t in self.evidence}


@dataclass
class RetrievalReport:
    dataset: str
    questions: list[QuestionRun]
    ingest_seconds: float
    turns: int
    notes: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict[str, float]]:
        groups: dict[str, list[QuestionRun]] = defaultdict(list)
        for q in self.questions:
            if not q.evidence and not q.evidence_sessions:
                continue
            groups[q.category].append(q)
            if q.category != ADVERSARIAL:
                groups["1-4 combined" if self.dataset == "locomo" else "all"].append(q)
        return {name: _aggregate(qs) for name, qs in sorted(groups.items())}

    def latency(self) -> dict[str, float]:
        lat = sorted(q.latency_ms for q in self.questions)
        return {"p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99)}

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "date": datetime.now(timezone.utc).isoformat(),
                "machine": machine(), "turns": self.turns,
                "questions": len(self.questions),
                "questions_without_evidence": sum(1 for q in self.questions if not q.evidence),
                "ingest_seconds": round(self.ingest_seconds, 2),
                "ingest_turns_per_second": round(self.turns / max(self.ingest_seconds, 1e-9), 1),
                "search_latency": self.latency(), "metrics": self.metrics(), **self.notes}


def run(conversations: list[dict[str, Any]], *, dataset: str, embedder: Embedder | None = None,
        top_k: int = 50, workdir: str | Path | None = None,
        memory_options: dict[str, Any] | None = None, db: str | None = None,
        progress: Callable[[int, int], None] | None = None) -> RetrievalReport:
    """`db`: a PostgreSQL URL of an empty database to run on (default: a fresh SQLite file
    in `workdir`)."""
    folder = Path(workdir or tempfile.mkdtemp(prefix="memstack-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    if db is None:
        db = folder / "bench.db"  # type: ignore[assignment]
        remove_db(folder, "bench.db")
    runs, ingest, turns = [], 0.0, 0
    total = sum(len(c["questions"]) for c in conversations)
    with Memory(db, embedder=embedder, track_access=False, files=folder,  # type: ignore[arg-type]
                **(memory_options or {})) as memory:
        require_empty(memory)
        for conv in conversations:
            cube = str(conv["id"])
            start = time.perf_counter()
            mapping = memory.import_conversation(conv, cube=cube)
            ingest += time.perf_counter() - start
            turns += len(mapping)
            runs += [_ask(memory, cube, q, top_k) for q in conv["questions"]]
            if progress:
                progress(len(runs), total)
    return RetrievalReport(dataset, runs, ingest, turns)


def _ask(memory: Memory, cube: str, question: dict[str, Any], top_k: int) -> QuestionRun:
    start = time.perf_counter()
    hits = memory.search(question["question"], cube=cube, top_k=top_k, kinds=["turn"])
    latency = (time.perf_counter() - start) * 1000
    retrieved = list(dict.fromkeys(h.item.metadata.get("turn_id") for h in hits))
    return QuestionRun(str(question["id"]), str(question.get("category", "all")),
                       list(question.get("evidence", [])), [r for r in retrieved if r],
                       latency, [str(s) for s in question.get("evidence_sessions") or []])


def session_of(turn_id: str) -> str:
    """'D3:7' -> 'D3' (LoCoMo); any id with a colon maps to its part before the last colon."""
    return turn_id.rsplit(":", 1)[0]


def question_metrics(q: QuestionRun) -> dict[str, float]:
    """Turn metrics when the question names evidence turns; session metrics (over the
    sessions of the retrieved turns, in order) when it names turns or sessions."""
    evidence, wanted = set(q.evidence), q.wanted_sessions
    sessions = list(dict.fromkeys(session_of(t) for t in q.retrieved))
    out = {}
    for k in KS:
        if evidence:
            top = q.retrieved[:k]
            found = evidence & set(top)
            out[f"recall_any@{k}"] = float(bool(found))
            out[f"recall_all@{k}"] = float(found == evidence)
            out[f"ndcg@{k}"] = _ndcg(top, evidence, k)
        if wanted:
            top_sessions = set(sessions[:k])
            out[f"session_recall_any@{k}"] = float(bool(wanted & top_sessions))
            out[f"session_recall_all@{k}"] = float(wanted <= top_sessions)
            out[f"session_ndcg@{k}"] = _ndcg(sessions[:k], wanted, k)
    return out


def _ndcg(ranked: list[str], relevant: set[str], k: int) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, t in enumerate(ranked) if t in relevant)
    return dcg / sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))


def _aggregate(questions: list[QuestionRun]) -> dict[str, float]:
    rows = [question_metrics(q) for q in questions]
    names = list(dict.fromkeys(name for r in rows for name in r))
    out: dict[str, float] = {name: round(statistics.fmean(r[name] for r in rows if name in r), 4)
                             for name in names}
    out["count"] = len(rows)
    return out


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, math.ceil(pct / 100 * len(values)) - 1))
    return round(values[index], 2)


def require_empty(memory: Memory) -> None:
    """A benchmark starts from an empty store (it never deletes a database it was given)."""
    if memory.cubes():
        from .._errors import InvalidInputError

        raise InvalidInputError(f"{memory.location} holds cubes already; benchmarks run on an "
                                "empty database (create one: CREATE DATABASE ...)")


def remove_db(folder: Path, name: str) -> None:
    """Delete a benchmark database with its WAL files and vector index folder."""
    for path in folder.glob(f"{name}*"):
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()


def machine() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
