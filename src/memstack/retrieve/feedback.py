"""What feedback does to a search (issue 18): a bounded, decaying nudge per memory, and
corrections ranked just ahead of what they correct.

Feedback is stored as items of kind `feedback` (learn/feedback.py) whose search key is the query
it was given for (an anchor key: a vector only, in nobody's BM25). A search reads the feedback
its own user and agent gave in its own cubes for the most similar queries: each one's signal
(+1 positive, -1 negative), weighted by how much more similar its query is than the floor
(`similarity`, `negative_similarity`) and halved every `half_life_days`, adds up per memory it
names and is clipped to [-1, 1] (so a thousand votes move a memory no further than one close
vote). The memory's fused score then moves by `weight` times that, in units of its own score
(`relative`, the default) or of the best candidate's: a negative memory sinks, a positive one
rises (and with `inject` and absolute units, one the search did not find joins), always within
the search's own selection (scope, kinds, filters, time). Measured: `memstack bench feedback`,
docs/learning.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .._errors import InvalidInputError
from .._models import Hit
from ..store.base import Store
from ..store.selection import Selection, parse_filters

SIGNALS = {"positive": 1.0, "negative": -1.0}


@dataclass(frozen=True)
class FeedbackSettings:
    """How feedback moves search results (measured: `memstack bench feedback`).

    `weight`: the most all feedback on a memory moves its score, in units of the best
    candidate's score (0 turns feedback off). `similarity`: positive feedback given for a query
    less similar than this (cosine of the query vectors) has no effect; `negative_similarity`
    the same for negative feedback. Raising a memory into results can push out what another
    question needs, lowering one the user called wrong cannot, so negative feedback may reach
    further. `half_life_days`: feedback loses half its effect in this time. `consulted`: the
    nearest feedback items read per search. `inject`: a memory with positive feedback joins the
    results even when the search did not find it among its candidates (else only candidates
    move). `relative`: a memory's score moves in units of its own score (x (1 + weight x total))
    instead of the best candidate's: a memory far down the list moves less, and one the search
    did not find is not brought in."""

    weight: float = 1.0
    similarity: float = 0.6
    negative_similarity: float = 0.6
    half_life_days: float = 90.0
    consulted: int = 50
    inject: bool = True
    relative: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise InvalidInputError(f"feedback setting {f.name} is true or false, got "
                                            f"{value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or (f.name.endswith("similarity") and value >= 1) \
                    or (f.name in ("half_life_days", "consulted") and value <= 0):
                raise InvalidInputError(f"feedback setting {f.name}: {value!r} is out of range "
                                        "(weight >= 0, 0 <= similarity < 1, half_life_days > 0, "
                                        "consulted > 0)")


def feedback_selection(sel: Selection) -> Selection:
    """The feedback a search may use: its own user's and agent's (None: feedback given without
    one), in its cubes, active now."""
    return Selection(cube_ids=sel.cube_ids, user_id=sel.user_id, agent_id=sel.agent_id,
                     exact=frozenset({"user_id", "agent_id"}), kinds=("feedback",))


def nudges(store: Store, qvec: np.ndarray, sel: Selection, settings: FeedbackSettings,
           now: float | None = None) -> dict[str, float]:
    """Each memory's feedback total for this query, in [-1, 1] (memory id -> total)."""
    if not settings.weight or sel.as_of is not None:  # the past is not moved by later votes
        return {}
    ranked = store.vector_candidates(qvec, feedback_selection(sel), int(settings.consulted))
    lowest = min(settings.similarity, settings.negative_similarity)
    near = [(r, s) for r, s in ranked[False] if s > lowest]
    if not near:
        return {}
    items = store.items_by_rowid([r for r, _ in near])
    now = time.time() if now is None else now
    totals: dict[str, float] = {}
    for rowid, sim in near:
        fb = items.get(rowid)
        if fb is None or fb.metadata.get("signal") not in SIGNALS \
                or not fb.metadata.get("query"):  # given without a query: moves no ranking
            continue
        sign = SIGNALS[fb.metadata["signal"]]
        floor = settings.similarity if sign > 0 else settings.negative_similarity
        if sim <= floor:
            continue
        age_days = max(0.0, now - fb.recorded_at.timestamp()) / 86400
        strength = sign * (sim - floor) / (1 - floor) \
            * math.pow(0.5, age_days / settings.half_life_days)
        for item_id in fb.metadata.get("item_ids", []):
            totals[item_id] = totals.get(item_id, 0.0) + strength
    return {i: max(-1.0, min(1.0, t)) for i, t in totals.items() if t}


def nudged(store: Store, fused: dict[int, float], sel: Selection, totals: dict[str, float],
           weight: float, inject: bool = True, relative: bool = False) -> dict[int, float]:
    """The fused scores after feedback; with `inject`, memories with positive feedback that
    the search did not find join when they pass its selection."""
    if not totals or not weight:
        return fused
    unit = max(fused.values(), default=1.0) or 1.0
    rowids = _rowids_in(store, sel, list(totals))
    out = dict(fused)
    for item_id, total in totals.items():
        rowid = rowids.get(item_id)
        if rowid is None or (rowid not in out and (total <= 0 or not inject or relative)):
            continue  # relative to its own score, a memory the search did not find stays out
        base = out.get(rowid, 0.0)
        out[rowid] = max(0.0, base + weight * total * (base if relative else unit))
    return out


def _rowids_in(store: Store, sel: Selection, ids: list[str]) -> dict[str, int]:
    """Rowids of those memories that the selection sees."""
    narrowed = replace(sel, conditions=sel.conditions + parse_filters({"id": {"in": ids}}))
    return {item.id: rowid for rowid, item in store.select_items(narrowed, limit=len(ids))}


def corrections_first(store: Store, sel: Selection, hits: list[Hit], top_k: int) -> list[Hit]:
    """Each hit that a correction (an item whose metadata `corrects` names it) corrects gets its
    newest correction just ahead of it, when the correction passes the search's selection (its
    scope: a correction is in the scope of the feedback that made it)."""
    if not hits:
        return hits
    ids = [h.item.id for h in hits]
    narrowed = replace(sel, conditions=sel.conditions + parse_filters(
        {"metadata.corrects": {"in": ids}}))
    found: dict[str, list[Any]] = {}
    for _, item in store.select_items(narrowed, order="rowid_desc", limit=4 * len(ids)):
        if item.metadata["corrects"] not in found:  # the newest one only: a bound, as votes
            found[item.metadata["corrects"]] = [item]
    if not found:
        return hits
    out: list[Hit] = []
    shown: set[str] = set()
    for hit in hits:  # a correction found higher up by itself stays there
        if hit.item.id in shown:
            continue
        for correction in found.get(hit.item.id, []):
            if correction.id not in shown:
                out.append(Hit(correction, hit.score, {}, {"corrects": 1.0}))
                shown.add(correction.id)
        out.append(hit)
        shown.add(hit.item.id)
    return out[:top_k]
