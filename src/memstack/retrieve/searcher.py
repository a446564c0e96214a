"""The read path: a question and a scope in, ranked hits out (no access tracking)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from .._models import KINDS, NOT_MEMORIES, Hit, utcnow
from .._time import parse_time
from .._validate import limit as _limit
from .._validate import scope as _scope
from ..embed import Embedder
from ..embed.base import embed_query
from ..store.base import CubeRow, Store
from ..store.cubes import Cubes
from ..store.selection import Selection
from . import feedback as fb
from .feedback import FeedbackSettings
from .search import SearchSettings, analyse, hybrid

MAX_TOP_K = 1000


class Searcher:
    """Hybrid search over a store for one embedder; what the facade, the fact manager and the
    tiers share to find memories."""

    def __init__(self, store: Store, cubes: Cubes, embedder: Embedder,
                 settings: SearchSettings | None = None,
                 feedback: FeedbackSettings | None = None) -> None:
        self.store, self.cubes, self.embedder = store, cubes, embedder
        self.settings = settings or SearchSettings()
        self.feedback = feedback or FeedbackSettings()

    def find(self, query: str, *, user_id: str | None = None, agent_id: str | None = None,
             session_id: str | None = None, cube: str | Sequence[str] | None = None,
             kinds: Sequence[str] | None = None, filters: dict[str, Any] | None = None,
             since: Any = None, until: Any = None, as_of: Any = None, top_k: int = 10,
             exact: Sequence[str] = (), feedback: bool = True) -> list[Hit]:
        """Scope fields named in `exact` match a missing value too (None means "none", not
        "any"). Session headers and feedback are not memories: found only when `kinds` names
        them. With `feedback`, the feedback this user gave for similar queries moves the
        results and corrections come just ahead of what they correct (retrieve/feedback.py)."""
        top_k = _limit(top_k, "top_k", maximum=MAX_TOP_K)
        as_of_t = parse_time(as_of, field="as_of") if as_of is not None else None
        query_obj = analyse(query, now=as_of_t or utcnow())
        cube_rows = self.cubes.for_reading(cube)
        if not cube_rows:
            return []
        sel = selection(cube_rows, _scope(user_id, agent_id, session_id),
                        [k for k in KINDS if k not in NOT_MEMORIES] if kinds is None else kinds,
                        filters, since, until, as_of_t, exact=exact)
        qvec = embed_query(self.embedder, query_obj.text)
        with self.store.session():  # its reads on one connection of a pool
            if not feedback or not self.feedback.weight:
                return hybrid(self.store, query_obj, qvec, sel, top_k, settings=self.settings)
            totals = fb.nudges(self.store, qvec, sel, self.feedback)
            hits = hybrid(self.store, query_obj, qvec, sel, top_k, settings=self.settings,
                          adjust=lambda fused: fb.nudged(self.store, fused, sel, totals,
                                                         self.feedback.weight,
                                                         self.feedback.inject,
                                                         self.feedback.relative))
            return fb.corrections_first(self.store, sel, hits, top_k)


def selection(cubes: Sequence[CubeRow], scope: dict[str, str | None],
              kinds: Sequence[str] | None, filters: dict[str, Any] | None, since: Any,
              until: Any, as_of: datetime | None, *, exact: Sequence[str] = (),
              status: str = "active") -> Selection:
    """What a read of these cubes sees (validated: bad kinds, filters or times raise)."""
    return Selection.of(cube_ids=[c.id for c in cubes], scope=scope, kinds=kinds,
                        filters=filters, since=since, until=until, as_of=as_of,
                        status=status, exact=exact)  # type: ignore[arg-type]
