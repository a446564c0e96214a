"""Rank fusion. Each function is small and names its source."""

from __future__ import annotations

from collections import defaultdict


def rrf(rankings: dict[str, list[int]], *, k: float = 60.0,
        weights: dict[str, float] | None = None) -> dict[int, float]:
    """Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009): sum of w / (k + rank)."""
    scores: dict[int, float] = defaultdict(float)
    for name, ranked in rankings.items():
        weight = (weights or {}).get(name, 1.0)
        for rank, item in enumerate(ranked, start=1):
            scores[item] += weight / (k + rank)
    return dict(scores)
