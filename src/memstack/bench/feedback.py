"""Does feedback help the next, differently worded question? (`memstack bench feedback`)

Pairs of questions of one conversation that share an evidence turn (the first asked earlier,
worded differently). On each pair's first question the user gives feedback the way a user would:
negative on the best hit that is not evidence, positive on each evidence turn. Then the second
questions are asked with the feedback (several settings) and without; so are control questions
whose evidence no feedback named, positive or negative (they must not lose recall). "Without" is
measured with the feedback already stored (search(feedback=False)): feedback items hold no words
in the full-text index, so the baseline is what a search saw before any feedback. The pairs and the controls are
split into two halves at random (fixed seed): a setting is chosen on half A (the best recall@5
gain on A's second questions with A's controls losing at most `max_control_drop`) and reported
on half B, which played no part in choosing it.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .._memory import Memory
from ..embed import Embedder
from ..retrieve.feedback import FeedbackSettings
from .retrieval import machine, remove_db, require_empty

KS = (1, 5, 10)
TOP_K = 10  # hits the user sees when giving feedback, and the deepest recall measured
MAX_CONTROL_DROP = 0.005
GRID = [FeedbackSettings(),  # the defaults: weight 1, similarity 0.6 / 0.6, relative
        FeedbackSettings(weight=2.0),
        FeedbackSettings(similarity=0.7),
        FeedbackSettings(relative=False, similarity=0.7),
        FeedbackSettings(relative=False, weight=0.5)]


def plan(conversations: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Pairs (first, second) sharing evidence, and controls, each with its half ("A"/"B")."""
    rng = random.Random(seed)
    pairs, controls = [], []
    for conv in conversations:
        qs = [q for q in conv["questions"] if q.get("evidence") and
              q.get("category") != "adversarial"]
        used: set[str] = set()
        for n, first in enumerate(qs):
            if first["id"] in used:
                continue
            second = next((q for q in qs[n + 1:] if q["id"] not in used
                           and set(q["evidence"]) & set(first["evidence"])
                           and _words(q["question"]) != _words(first["question"])), None)
            if second is not None:
                used |= {first["id"], second["id"]}
                pairs.append({"cube": str(conv["id"]), "first": first, "second": second,
                              "half": rng.choice("AB")})
        controls += [{"cube": str(conv["id"]), "question": q, "half": rng.choice("AB")}
                     for q in qs if q["id"] not in used]
    return {"pairs": pairs, "controls": controls}


def unnamed(controls: list[dict[str, Any]], named: dict[str, set[str]]
            ) -> list[dict[str, Any]]:
    """The controls whose evidence no feedback named (positive or negative)."""
    return [c for c in controls if not set(c["question"]["evidence"]) & named[c["cube"]]]


def run(conversations: list[dict[str, Any]], *, embedder: Embedder | None = None,
        workdir: str | Path | None = None, grid: list[FeedbackSettings] | None = None,
        memory_options: dict[str, Any] | None = None, dataset: str = "locomo",
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    folder = Path(workdir or tempfile.mkdtemp(prefix="memstack-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    remove_db(folder, "feedback.db")
    grid = grid or GRID
    planned = plan(conversations)
    say = progress or (lambda _: None)
    with Memory(folder / "feedback.db", embedder=embedder, track_access=False, files=folder,
                **(memory_options or {})) as memory:
        require_empty(memory)
        start = time.perf_counter()
        ids: dict[str, dict[str, str]] = {}
        for conv in conversations:
            ids[str(conv["id"])] = memory.import_conversation(conv, cube=str(conv["id"]))
        ingest = time.perf_counter() - start
        say("before")
        before = _measure(memory, planned, feedback=False)  # before any feedback exists
        say("feedback")
        given, named = _give(memory, planned["pairs"], ids)
        planned["controls"] = unnamed(planned["controls"], named)
        kept = {c["question"]["id"] for c in planned["controls"]}
        before["control"] = [r for r in before["control"] if r[0] in kept]
        rows = []
        for settings in grid:
            say(f"weight {settings.weight}, similarity {settings.similarity}")
            memory.searcher.feedback = settings
            rows.append({"settings": asdict(settings),
                         **_gains(before, _measure(memory, planned, feedback=True))})
    chosen = choose(rows)
    return {"dataset": dataset, "machine": machine(), "embedder": memory.embedder.name,
            "pairs": {h: sum(p["half"] == h for p in planned["pairs"]) for h in "AB"},
            "controls": {h: sum(c["half"] == h for c in planned["controls"]) for h in "AB"},
            "feedback_given": given, "ingest_seconds": round(ingest, 1),
            "before": _summary(before), "grid": rows, "chosen": chosen,
            "default": asdict(FeedbackSettings()),
            "default_row": next((r for r in rows if r["settings"] == asdict(
                FeedbackSettings())), None),
            "max_control_drop": MAX_CONTROL_DROP}


def _words(text: str) -> str:
    return " ".join(text.lower().split())


def _retrieved(memory: Memory, cube: str, question: str, feedback: bool) -> list[str]:
    hits = memory.search(question, cube=cube, top_k=TOP_K, kinds=["turn"], feedback=feedback)
    return [t for t in dict.fromkeys(h.item.metadata.get("turn_id") for h in hits) if t]


Measured = dict[str, list[tuple[str, str, dict[str, float]]]]  # group: (id, half, recalls)


def _measure(memory: Memory, planned: dict[str, Any], feedback: bool) -> Measured:
    """(question id, half, recall_any@k) of every second question and every control."""
    out: Measured = {"second": [], "control": []}
    for pair in planned["pairs"]:
        q = pair["second"]
        out["second"].append((q["id"], pair["half"], _recall(
            _retrieved(memory, pair["cube"], q["question"], feedback), q["evidence"])))
    for control in planned["controls"]:
        q = control["question"]
        out["control"].append((q["id"], control["half"], _recall(
            _retrieved(memory, control["cube"], q["question"], feedback), q["evidence"])))
    return out


def _recall(retrieved: list[str], evidence: list[str]) -> dict[str, float]:
    return {f"recall@{k}": float(bool(set(retrieved[:k]) & set(evidence))) for k in KS}


def _give(memory: Memory, pairs: list[dict[str, Any]], ids: dict[str, dict[str, str]]
          ) -> tuple[dict[str, int], dict[str, set[str]]]:
    """Feedback on each first question, as a user would give it; the turns it named."""
    count = {"negative": 0, "positive": 0}
    named: dict[str, set[str]] = {cube: set() for cube in ids}
    for pair in pairs:
        first, cube = pair["first"], pair["cube"]
        hits = memory.search(first["question"], cube=cube, top_k=TOP_K, kinds=["turn"],
                             feedback=False)
        wrong = next((h for h in hits if h.item.metadata.get("turn_id")
                      not in first["evidence"]), None)
        if wrong is not None:
            memory.feedback(wrong.item.id, "negative", query=first["question"])
            count["negative"] += 1
            named[cube].add(wrong.item.metadata["turn_id"])
        for turn in first["evidence"]:
            if turn in ids[cube]:
                memory.feedback(ids[cube][turn], "positive", query=first["question"])
                count["positive"] += 1
                named[cube].add(turn)
    return count, named


def _mean(rows: list[tuple[str, str, dict[str, float]]], half: str | None, key: str
          ) -> float:
    values = [r[key] for _, h, r in rows if half is None or h == half]
    return round(statistics.fmean(values), 4) if values else 0.0


def _summary(measured: Measured) -> dict[str, Any]:
    return {group: {half or "all": {f"recall@{k}": _mean(rows, half, f"recall@{k}") for k in KS}
                    for half in ("A", "B", None)} for group, rows in measured.items()}


def _gains(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    b, a = _summary(before), _summary(after)
    return {"after": a, "gain": {group: {half: {k: round(a[group][half][k] - b[group][half][k], 4)
                                                for k in a[group][half]}
                                         for half in a[group]} for group in a}}


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The setting with the best recall@5 gain on half A's second questions (ties: recall@1,
    then the controls) among those whose half-A controls lose at most MAX_CONTROL_DROP at
    recall@5; with its half-B figures."""
    ok = [r for r in rows if r["gain"]["control"]["A"]["recall@5"] >= -MAX_CONTROL_DROP]
    if not ok:
        return None
    best = max(ok, key=lambda r: (r["gain"]["second"]["A"]["recall@5"],
                                  r["gain"]["second"]["A"]["recall@1"],
                                  r["gain"]["control"]["A"]["recall@5"]))
    return {"settings": best["settings"], "on_A": {g: best["gain"][g]["A"] for g in best["gain"]},
            "on_B": {g: best["gain"][g]["B"] for g in best["gain"]}}
