"""Hybrid search: BM25 candidates from FTS5 and vector candidates from the ANN index, fused.

Each retriever ranks items (an item's best key counts). Fusion is reciprocal rank fusion, then
boosts (SearchSettings): a named speaker's turns, the user's own words for first-person
questions, strong sessions, and (an option) items whose time matches a time cue ("last May").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import numpy as np

from .._errors import InvalidInputError
from .._models import Hit
from ..index import HnswIndex
from ..ingest.rules import NOT_THE_USER, ROLES  # roles, not names of speakers
from ..store.sqlite import SQLiteStore
from .fusion import rrf
from .query import Query, analyse

__all__ = ["SearchSettings", "analyse", "hybrid"]

# a session is its whole scope: two users' sessions with the same id are two sessions
SESSION_KEY = ("CASE WHEN session_id IS NULL THEN NULL "
               "ELSE json_array(cube_id, user_id, agent_id, session_id) END")


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


def hybrid(store: SQLiteStore, indexes: Sequence[HnswIndex], query: Query, qvec: np.ndarray,
           where: str, params: Sequence[Any], top_k: int, *, scope: str | None, narrow: bool,
           settings: SearchSettings = SearchSettings()) -> list[Hit]:
    """`scope` is the FTS5 scope expression; `narrow` says the filters select a small part of
    the cubes (a user, a session...), so the vector search filters from the start."""
    n = candidates_needed(top_k)
    with store.lock:
        bm25 = store.fts(query.fts, scope, where, params, n) if query.fts else \
            {False: [], True: []}
        vector = _vector(store, indexes, qvec, where, params, n, narrow)
    lists = {"bm25": bm25[False], "bm25_context": bm25[True], "vector": vector[False],
             "vector_context": vector[True]}
    weights = settings.weights()  # a ranking of weight 0 is left out, also from the hits' ranks
    rankings = {name: [r for r, _ in ranked] for name, ranked in lists.items()
                if ranked and weights[name]}
    raw = {name: dict(ranked) for name, ranked in lists.items()}  # similarities: all of them
    fused = rrf(rankings, k=settings.rrf_k, weights=weights)
    fused = _boosted(store, fused, query, settings)
    order = sorted(fused, key=lambda r: (-fused[r], r))[:top_k]
    with store.lock:
        items = store.items_by_rowid(order)
    ranks = {name: {r: n for n, r in enumerate(ranked, 1)} for name, ranked in rankings.items()}
    return [Hit(items[r], fused[r], {k: v[r] for k, v in ranks.items() if r in v},
                {k: v[r] for k, v in raw.items() if r in v}) for r in order]


def _boosted(store: SQLiteStore, fused: dict[int, float], query: Query,
             settings: SearchSettings) -> dict[int, float]:
    """The fused scores after the speaker, user, session and time boosts."""
    if not fused:
        return fused
    if settings.speaker_boost != 1.0:
        with store.lock:
            speakers = store.item_values(list(fused), "speaker")
        named = {sp for sp in set(speakers.values())
                 if sp and sp.lower() in query.words and sp.lower() not in ROLES}
        boost = settings.speaker_boost
        fused = {r: s * (boost if speakers.get(r) in named else 1.0)
                 for r, s in fused.items()}
    if settings.user_boost != 1.0 and query.first_person:
        with store.lock:
            roles = store.item_values(list(fused), "role")
        fused = {r: s * (1.0 if roles.get(r) in NOT_THE_USER else settings.user_boost)
                 for r, s in fused.items()}
    if settings.directive_boost != 1.0:
        with store.lock:
            said = store.item_values(list(fused), "json_extract(metadata, '$.directive')")
        fused = {r: s * (settings.directive_boost if said.get(r) else 1.0)
                 for r, s in fused.items()}
    if settings.session_weight:
        with store.lock:
            fused = _session_boost(fused, store.item_values(list(fused), SESSION_KEY),
                                   settings.session_weight, settings.session_top)
    if query.time_range is not None and settings.time_boost != 1.0:
        with store.lock:
            times = store.item_values(list(fused), "observed_at")
            resolved = store.item_values(list(fused), "json_extract(metadata, '$.resolved_dates')")
        fused = {r: s * (settings.time_boost if _in_range(times[r], resolved[r],
                                                          query.time_range) else 1.0)
                 for r, s in fused.items()}
    return fused


def _vector(store: SQLiteStore, indexes: Sequence[HnswIndex], qvec: np.ndarray, where: str,
            params: Sequence[Any], n: int, narrow: bool) -> dict[bool, list[tuple[int, float]]]:
    """Best vector similarity per item within the scope, best first, for own and context keys."""
    found: list[tuple[int, bool, float]] = []
    for index in indexes:
        hits, items = [], []
        if not narrow:
            hits = index.search(qvec, min(len(index), 2 * n))
            items = _allowed_items(store, hits, where, params)
        if len({r for r, _, _ in items}) < n and len(hits) < len(index):
            # the scope is narrower than the cube: search within its keys only, exactly when
            # they are few (a matrix product beats a filtered graph walk), else filtered ANN
            hits = _exact(store, qvec, where, params, 2 * n)
            if hits is None:
                hits = index.search(qvec, 2 * n, allowed=store.scoped_keys(where, params))
            items = _allowed_items(store, hits, where, params)
        found += items
    out: dict[bool, list[tuple[int, float]]] = {}
    for ctx in (False, True):
        best: dict[int, float] = {}
        for rowid, is_ctx, sim in found:
            if is_ctx == ctx:
                best[rowid] = max(sim, best.get(rowid, -1.0))
        out[ctx] = sorted(best.items(), key=lambda kv: -kv[1])[:n]
    return out


EXACT_LIMIT = 20_000


def _exact(store: SQLiteStore, qvec: np.ndarray, where: str, params: Sequence[Any], k: int
           ) -> list[tuple[int, float]] | None:
    scoped = store.scoped_vectors(where, params, EXACT_LIMIT)
    if scoped is None:
        return None
    keys, vectors = scoped
    if not len(keys):
        return []
    sims = _similarities(vectors, qvec.astype(np.float32))
    top = np.argsort(-sims)[:k] if len(sims) <= k else np.argpartition(-sims, k)[:k]
    top = top[np.argsort(-sims[top])]
    return [(int(keys[i]), float(sims[i])) for i in top]


def _similarities(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """vectors @ query. Through torch when it is loaded (the local embedder loads it): numpy's
    BLAS threads would spin after the product and slow the next query embedding (measured)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return vectors @ query
    with torch.inference_mode():
        return (torch.from_numpy(vectors) @ torch.from_numpy(query)).numpy()


def _allowed_items(store: SQLiteStore, hits: list[tuple[int, float]], where: str,
                   params: Sequence[Any]) -> list[tuple[int, bool, float]]:
    if not hits:
        return []
    owners = store.key_items([k for k, _ in hits])
    rowids = sorted({item for item, _ in owners.values()})
    marks = ", ".join("?" * len(rowids))
    allowed = {r for (r,) in store.conn.execute(
        f"SELECT i.rowid FROM items i WHERE i.rowid IN ({marks}) AND {where}", (*rowids, *params))}
    return [(owners[key][0], owners[key][1], sim) for key, sim in hits
            if key in owners and owners[key][0] in allowed]


def _in_range(observed_at: float | None, resolved: str | None, window) -> bool:
    start, end = window
    if observed_at is not None and start.timestamp() <= observed_at < end.timestamp():
        return True
    for span in json.loads(resolved) if resolved else []:
        if span["start"] < end.date().isoformat() and span["end"] > start.date().isoformat():
            return True
    return False


def _session_boost(fused: dict[int, float], sessions: dict[int, str | None], weight: float,
                   top: int) -> dict[int, float]:
    """Hierarchical evidence: a turn in a session with several strong candidates gains."""
    by_session: dict[str | None, list[float]] = {}
    for rowid, score in fused.items():
        by_session.setdefault(sessions.get(rowid), []).append(score)
    strength = {s: sum(sorted(v, reverse=True)[:top]) for s, v in by_session.items()}
    return {r: score + weight * strength[sessions.get(r)] for r, score in fused.items()}
