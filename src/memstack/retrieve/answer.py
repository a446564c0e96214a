"""Answering from memory: pack the best hits into a prompt within a token budget.

Hits are taken in rank order while they fit the budget, then shown oldest first with their dates,
so the model can reason about time ("when did...", "what changed..."). A fact superseded since is
not shown unless the search asked for the past (as_of).
"""

from __future__ import annotations

from datetime import datetime

from .._models import Hit
from ..llm import estimate_tokens

ANSWER_SYSTEM = """You answer questions about the user and their conversations using only the \
MEMORIES below (dated conversation turns and facts). Answer in a few words or one short \
sentence. Resolve relative dates using the memory dates. If the memories do not contain the \
answer, reply "Not mentioned in memory." """


def pack(hits: list[Hit], budget_tokens: int) -> tuple[list[Hit], str, int]:
    """The hits that fit `budget_tokens` (best first), rendered oldest first; and their tokens."""
    chosen, used = [], 0
    for hit in hits:
        cost = estimate_tokens(render(hit)) + 1
        if used + cost > budget_tokens:
            continue  # a long one may not fit where a shorter, lower-ranked one does
        chosen.append(hit)
        used += cost
    ordered = sorted(chosen, key=lambda h: _when(h).timestamp() if _when(h) else 0.0)
    return chosen, "\n".join(render(h) for h in ordered), used


def render(hit: Hit) -> str:
    item = hit.item
    when = _when(hit)
    stamp = f"{when:%-d %B %Y}" if when else "undated"
    if item.kind == "turn":
        who = item.speaker or item.role or "someone"
        return f"- [{stamp}] {who}: {item.content}"
    label = item.kind if item.status == "active" else f"{item.kind}, no longer true"
    return f"- [{label}, since {stamp}] {item.content}"


def _when(hit: Hit) -> datetime | None:
    return hit.item.valid_from or hit.item.observed_at or hit.item.recorded_at


def messages(question: str, context: str, now: datetime) -> list[dict[str, str]]:
    return [{"role": "system", "content": ANSWER_SYSTEM},
            {"role": "user", "content": f"MEMORIES:\n{context or '(none)'}\n\n"
                                        f"Today is {now:%-d %B %Y}.\nQUESTION: {question}"}]
