"""Question answering from memory: token F1 (LoCoMo's scoring) and an LLM judge, per category.

Each conversation is ingested into a fresh cube through Memory.add_many (one add per session,
with fact extraction when asked), then every question goes through Memory.answer. Scoring:
- token F1 as LoCoMo's evaluation.py computes it: lower case, no punctuation, no articles or
  "and", Porter-stemmed tokens; multi-hop answers are split on commas and each gold part takes its
  best predicted part; open-domain answers keep the part before ";"; adversarial questions score 1
  when the reply says the thing was not mentioned;
- an LLM judge at temperature 0 answering {"label": "CORRECT" | "WRONG"} (generous about wording,
  as in the mem0 and Zep evaluations).
"""

from __future__ import annotations

import re
import statistics
import string
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel

from .._errors import LLMError, MissingExtraError
from .._memory import Memory
from ..embed import Embedder
from ..ingest.conversation import sessions
from ..llm import ChatModel
from ..llm.structured import ask
from .retrieval import ADVERSARIAL, _pct, machine, remove_db

NOT_MENTIONED = ("no information available", "not mentioned")


# LoCoMo's token F1 ----------------------------------------------------------------------------
def _stem():
    try:
        from nltk.stem import PorterStemmer
    except ImportError as exc:
        raise MissingExtraError("the QA benchmark needs nltk: pip install 'memstack[bench]'") \
            from exc
    return PorterStemmer().stem


def normalise_answer(text: str) -> str:
    text = str(text).replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the|and)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str, stem: Callable[[str], str]) -> float:
    predicted = [stem(w) for w in normalise_answer(prediction).split()]
    wanted = [stem(w) for w in normalise_answer(gold).split()]
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def locomo_f1(category: str, prediction: str, gold: str, stem: Callable[[str], str]) -> float:
    if category == ADVERSARIAL:
        return float(any(phrase in prediction.lower() for phrase in NOT_MENTIONED))
    if category == "multi-hop":
        parts = [p.strip() for p in prediction.split(",")]
        return statistics.fmean(max(token_f1(p, g.strip(), stem) for p in parts)
                                for g in gold.split(","))
    if category == "open-domain":
        gold = gold.split(";")[0].strip()
    return token_f1(prediction, gold, stem)


# the judge --------------------------------------------------------------------------------------
class Verdict(BaseModel):
    label: Literal["CORRECT", "WRONG"]


JUDGE_PROMPT = """Label an answer to a question as CORRECT or WRONG, given the gold answer.
Be generous: an answer that names the same thing as the gold answer is CORRECT even if it is \
longer or worded differently; a date in another format, or a relative date that means the same \
day, is CORRECT. An answer about something else, or that says it does not know, is WRONG.
Question: {question}
Gold answer: {gold}
Answer: {answer}
Reply with only JSON: {{"label": "CORRECT"}} or {{"label": "WRONG"}}"""

ADVERSARIAL_GOLD = ("The conversation does not say this; the right reply is that it was not "
                    "mentioned. Any specific answer is WRONG.")


def judge(llm: ChatModel, question: str, gold: str, answer: str) -> bool:
    prompt = JUDGE_PROMPT.format(question=question, gold=gold, answer=answer)
    reply = ask(llm, [{"role": "user", "content": prompt}], Verdict, max_tokens=20)
    return reply.value.label == "CORRECT"


# the run ----------------------------------------------------------------------------------------
@dataclass
class QARun:
    id: str
    category: str
    question: str
    gold: str
    prediction: str
    f1: float
    correct: bool | None
    context_tokens: int
    prompt_tokens: int
    answer_ms: float
    judge_ms: float | None
    memory_ids: list[str]
    error: str | None = None
    control_correct: bool | None = None  # the judge on a deliberately wrong answer

    def to_dict(self) -> dict[str, Any]:
        """Without the dataset's own text (questions, gold answers): it stays where it is."""
        out = asdict(self)
        del out["question"], out["gold"]
        return out


@dataclass
class IngestStats:
    adds: int = 0
    turns: int = 0
    seconds: float = 0.0
    llm_calls: list[int] = field(default_factory=list)
    failed: int = 0
    operations: Counter = field(default_factory=Counter)
    dropped_unsupported: int = 0

    def to_dict(self) -> dict[str, Any]:
        calls = self.llm_calls
        return {"adds": self.adds, "turns": self.turns, "seconds": round(self.seconds, 1),
                "llm_calls_per_add": round(statistics.fmean(calls), 2) if calls else 0.0,
                "llm_calls_per_add_max": max(calls, default=0),
                "failed_extractions": self.failed,
                "operations": dict(self.operations),
                "dropped_unsupported": self.dropped_unsupported}


def run(conversations: list[dict[str, Any]], *, answer_llm: ChatModel,
        judge_llm: ChatModel | None, embedder: Embedder | None = None, extract: bool = True,
        top_k: int = 30, max_context_tokens: int = 2000, per_category: int | None = None,
        workdir: str | Path | None = None,
        progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Ingest, answer and score; returns the report as a dict (see metrics())."""
    stem = _stem()
    folder = Path(workdir or tempfile.mkdtemp(prefix="memstack-qa-"))
    folder.mkdir(parents=True, exist_ok=True)
    remove_db(folder, "qa.db")
    chosen = [(c, pick(c["questions"], per_category)) for c in conversations]
    total, runs, ingest = sum(len(qs) for _, qs in chosen), [], IngestStats()
    with Memory(folder / "qa.db", embedder=embedder, llm=answer_llm,
                track_access=False) as memory:
        for conv, questions in chosen:
            _ingest(memory, conv, extract, ingest)
            for n, q in enumerate(questions):
                control = questions[n - 1].get("answer") if len(questions) > 1 else None
                runs.append(_answer(memory, conv, q, judge_llm, stem, top_k, max_context_tokens,
                                    control))
                if progress:
                    progress(len(runs), total)
    return report(runs, ingest, extract=extract, answer_llm=answer_llm.name,
                  judge_llm=judge_llm.name if judge_llm else None, top_k=top_k,
                  max_context_tokens=max_context_tokens)


def pick(questions: list[dict[str, Any]], per_category: int | None) -> list[dict[str, Any]]:
    """The first `per_category` questions of each category, in the dataset's order."""
    if per_category is None:
        return list(questions)
    seen: Counter = Counter()
    out = []
    for q in questions:
        if seen[q.get("category")] < per_category:
            seen[q.get("category")] += 1
            out.append(q)
    return out


def _ingest(memory: Memory, conv: dict[str, Any], extract: bool, stats: IngestStats) -> None:
    cube, user = str(conv["id"]), str(conv["id"])
    parsed = sessions(conv)
    start = time.perf_counter()
    results = memory.add_many({"messages": s.messages, "user_id": user, "session_id": s.id,
                               "observed_at": s.date, "cube": cube, "metadata": s.metadata,
                               "infer": extract} for s in parsed)
    stats.seconds += time.perf_counter() - start
    for result in results:
        stats.adds += 1
        stats.turns += len(result.items)
        if result.extraction is not None:
            stats.llm_calls.append(result.extraction.llm_calls)
            stats.failed += int(not result.extraction.ok)
            stats.dropped_unsupported += result.extraction.dropped_unsupported
            stats.operations.update(op.event for op in result.facts)


def _answer(memory: Memory, conv: dict[str, Any], q: dict[str, Any],
            judge_llm: ChatModel | None, stem: Callable[[str], str], top_k: int,
            max_context_tokens: int, control: str | None) -> QARun:
    """Answer one question, score it, and (with a judge) also judge a control: the gold answer
    of another question given as the answer to this one, which a sound judge calls WRONG."""
    category, gold = str(q.get("category", "all")), str(q.get("answer", ""))
    start = time.perf_counter()
    try:
        reply = memory.answer(q["question"], cube=str(conv["id"]), user_id=str(conv["id"]),
                              top_k=top_k, max_context_tokens=max_context_tokens, max_tokens=60)
    except LLMError as exc:
        return QARun(str(q["id"]), category, q["question"], gold, "", 0.0, False if judge_llm
                     else None, 0, 0, (time.perf_counter() - start) * 1000, None, [], str(exc))
    answer_ms = (time.perf_counter() - start) * 1000
    correct, judge_ms, control_correct = None, None, None
    if judge_llm is not None:
        gold_for_judge = ADVERSARIAL_GOLD if category == ADVERSARIAL else gold
        start = time.perf_counter()
        correct = _judged(judge_llm, q["question"], gold_for_judge, reply.text)
        judge_ms = (time.perf_counter() - start) * 1000
        if control and category != ADVERSARIAL and normalise_answer(control) != \
                normalise_answer(gold):
            control_correct = _judged(judge_llm, q["question"], gold_for_judge, str(control))
    return QARun(str(q["id"]), category, q["question"], gold, reply.text,
                 locomo_f1(category, reply.text, gold, stem), correct, reply.context_tokens,
                 reply.prompt_tokens, answer_ms, judge_ms, reply.memory_ids, None,
                 control_correct)


def _judged(llm: ChatModel, question: str, gold: str, answer: str) -> bool:
    try:
        return judge(llm, question, gold, answer)
    except LLMError:
        return False  # an unjudgeable answer counts against us, never for us


def report(runs: list[QARun], ingest: IngestStats, **settings: Any) -> dict[str, Any]:
    groups: dict[str, list[QARun]] = defaultdict(list)
    for r in runs:
        groups[r.category].append(r)
        if r.category != ADVERSARIAL:
            groups["1-4 combined"].append(r)
    return {"dataset": "locomo", "date": datetime.now(timezone.utc).isoformat(),
            "machine": machine(), **settings, "questions": len(runs),
            "ingest": ingest.to_dict(),
            "metrics": {name: _aggregate(rs) for name, rs in sorted(groups.items())},
            "answers": [r.to_dict() for r in runs]}


def _aggregate(runs: list[QARun]) -> dict[str, float]:
    judged = [r.correct for r in runs if r.correct is not None]
    controls = [r.control_correct for r in runs if r.control_correct is not None]
    answer_ms = sorted(r.answer_ms for r in runs)
    judge_ms = sorted(r.judge_ms for r in runs if r.judge_ms is not None)
    return {"count": len(runs), "f1": round(statistics.fmean(r.f1 for r in runs), 4),
            "judge": round(statistics.fmean(judged), 4) if judged else None,
            "judge_false_positive": round(statistics.fmean(controls), 4) if controls else None,
            "context_tokens": round(statistics.fmean(r.context_tokens for r in runs), 1),
            "prompt_tokens": round(statistics.fmean(r.prompt_tokens for r in runs), 1),
            "answer_p50_ms": _pct(answer_ms, 50), "answer_p95_ms": _pct(answer_ms, 95),
            "judge_p50_ms": _pct(judge_ms, 50) if judge_ms else None,
            "errors": sum(r.error is not None for r in runs)}
