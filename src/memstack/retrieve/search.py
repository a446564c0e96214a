"""Hybrid search: BM25 candidates from FTS5 and vector candidates from the ANN index, fused.

Each retriever ranks items (an item's best key counts). Fusion is reciprocal rank fusion, then
boosts (SearchSettings): a named speaker's turns, the user's own words for first-person
questions, strong sessions, and (an option) items whose time matches a time cue ("last May").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

import numpy as np

from .._errors import InvalidInputError
from .._models import Hit
from ..ingest.rules import NOT_THE_USER, ROLES  # roles, not names of speakers
from ..store.base import ItemField, Store
from ..store.selection import Selection
from .fusion import rrf
from .query import Query, analyse

__all__ = ["SearchSettings", "analyse", "hybrid"]

@dataclass(frozen=True)
class SearchSettings:
    """How hybrid search fuses its rankings and boosts the result. Each setting is measured on
    LoCoMo and BEAM side by side (docs/benchmarks.md, "retrieval settings across datasets").

    Rankings (weights of reciprocal rank fusion; 0 leaves one out): `bm25` and `vector` over an
    item's own keys, `bm25_context` and `vector_context` over a turn with its neighbours.
    `rrf_k`: a small k trusts the head of each ranking. `speaker_boost`: items said by a
    speaker the query names ("what did Ann say..."; a role such as "user" is not a name).
    `user_boost`: when the query is in the first person ("what did I say..."), everything but
    the assistant's (system's, tool's) turns: the user's words and the facts drawn from them.
    `session_weight`: share of a session's evidence (its best `session_top` candidates) added
    to each of its turns. `time_boost`: items whose time matches a time cue in the query
    ("last May"). `directive_boost`: the user's turns that state a preference or instruction
    ("always...", "I prefer...": ingest/rules.py), which later questions rely on unsaid."""

    bm25: float = 2.0
    vector: float = 1.0
    bm25_context: float = 2.0
    vector_context: float = 1.5
    rrf_k: float = 10.0
    speaker_boost: float = 2.0
    user_boost: float = 2.0
    session_weight: float = 0.3
    session_top: int = 3
    time_boost: float = 1.0  # an option: +0.0007 on LoCoMo, 0 on BEAM (docs/benchmarks.md)
    directive_boost: float = 1.25  # LoCoMo +0.006, BEAM-8 +0.014 any@10 (docs/benchmarks.md)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or (f.name in ("rrf_k", "session_top") and value < 1) \
                    or (f.name.endswith("_boost") and value < 1):
                raise InvalidInputError(
                    f"search setting {f.name} must be a number >= 0 (rrf_k, session_top and "
                    f"boosts >= 1), got {value!r}")

    def weights(self) -> dict[str, float]:
        return {"bm25": self.bm25, "vector": self.vector, "bm25_context": self.bm25_context,
                "vector_context": self.vector_context}

    @classmethod
    def parse(cls, pairs: Sequence[str], base: "SearchSettings | None" = None
              ) -> "SearchSettings":
        """From "name=value" strings (the CLI's --set), on top of `base` (the defaults)."""
        names = {f.name: f.type for f in fields(cls)}
        changes: dict[str, Any] = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise InvalidInputError(f"--set takes name=value with a name among "
                                        f"{', '.join(names)}; got {pair!r}")
            try:
                changes[name] = int(value) if name == "session_top" else float(value)
            except ValueError:
                raise InvalidInputError(f"--set {name}: {value!r} is not a number") from None
        return replace(base or cls(), **changes)


def candidates_needed(top_k: int) -> int:
    return max(50, 4 * top_k)


def hybrid(store: Store, query: Query, qvec: np.ndarray, sel: Selection, top_k: int,
           settings: SearchSettings = SearchSettings(),
           adjust: Callable[[dict[int, float]], dict[int, float]] | None = None) -> list[Hit]:
    """The `top_k` best items of the selection for a query and its embedding `qvec`;
    `adjust` changes the fused scores last (feedback, retrieve/feedback.py)."""
    n = candidates_needed(top_k)
    bm25 = store.fts(query.words, sel, n)
    vector = store.vector_candidates(qvec, sel, n)
    lists = {"bm25": bm25[False], "bm25_context": bm25[True], "vector": vector[False],
             "vector_context": vector[True]}
    weights = settings.weights()  # a ranking of weight 0 is left out, also from the hits' ranks
    rankings = {name: [r for r, _ in ranked] for name, ranked in lists.items()
                if ranked and weights[name]}
    raw = {name: dict(ranked) for name, ranked in lists.items()}  # similarities: all of them
    fused = rrf(rankings, k=settings.rrf_k, weights=weights)
    fused = _boosted(store, fused, query, settings)
    if adjust is not None:
        fused = adjust(fused)
    order = sorted(fused, key=lambda r: (-fused[r], r))[:top_k]
    items = store.items_by_rowid(order)
    ranks = {name: {r: n for n, r in enumerate(ranked, 1)} for name, ranked in rankings.items()}
    return [Hit(items[r], fused[r], {k: v[r] for k, v in ranks.items() if r in v},
                {k: v[r] for k, v in raw.items() if r in v}) for r in order]


def _boosted(store: Store, fused: dict[int, float], query: Query,
             settings: SearchSettings) -> dict[int, float]:
    """The fused scores after the speaker, user, directive, session and time boosts."""
    if not fused:
        return fused
    rowids = list(fused)
    f = store.item_fields(rowids, _fields_needed(query, settings))
    if settings.speaker_boost != 1.0:
        named = {sp for sp in set(f["speaker"].values())
                 if sp and sp.lower() in query.words and sp.lower() not in ROLES}
        fused = _scaled(fused, {r for r, sp in f["speaker"].items() if sp in named},
                        settings.speaker_boost)
    if settings.user_boost != 1.0 and query.first_person:
        fused = _scaled(fused, {r for r in rowids if f["role"].get(r) not in NOT_THE_USER},
                        settings.user_boost)
    if settings.directive_boost != 1.0:
        fused = _scaled(fused, {r for r, flag in f["directive"].items() if flag},
                        settings.directive_boost)
    if settings.session_weight:
        fused = _session_boost(fused, f["session"], settings.session_weight,
                               settings.session_top)
    if query.time_range is not None and settings.time_boost != 1.0:
        fused = _scaled(fused, {r for r in rowids if _in_range(
            f["observed_at"].get(r), f["resolved_dates"].get(r), query.time_range)},
                        settings.time_boost)
    return fused


def _fields_needed(query: Query, settings: SearchSettings) -> list[ItemField]:
    wanted = {"speaker": settings.speaker_boost != 1.0,
              "role": settings.user_boost != 1.0 and query.first_person,
              "directive": settings.directive_boost != 1.0,
              "session": bool(settings.session_weight),
              "observed_at": query.time_range is not None and settings.time_boost != 1.0,
              "resolved_dates": query.time_range is not None and settings.time_boost != 1.0}
    return [name for name, needed in wanted.items() if needed]  # type: ignore[misc]


def _scaled(fused: dict[int, float], chosen: set[int], factor: float) -> dict[int, float]:
    return {r: s * (factor if r in chosen else 1.0) for r, s in fused.items()}


def _in_range(observed_at: float | None, resolved: list[dict[str, str]] | None, window
              ) -> bool:
    start, end = window
    if observed_at is not None and start.timestamp() <= observed_at < end.timestamp():
        return True
    for span in resolved or []:
        if span["start"] < end.date().isoformat() and span["end"] > start.date().isoformat():
            return True
    return False


def _session_boost(fused: dict[int, float], sessions: dict[int, Any], weight: float,
                   top: int) -> dict[int, float]:
    """Hierarchical evidence: a turn in a session with several strong candidates gains."""
    by_session: dict[Any, list[float]] = {}
    for rowid, score in fused.items():
        by_session.setdefault(sessions.get(rowid), []).append(score)
    strength = {s: sum(sorted(v, reverse=True)[:top]) for s, v in by_session.items()}
    return {r: score + weight * strength[sessions.get(r)] for r, score in fused.items()}
