"""Answering from memory: pack the best hits into a prompt within a token budget.

Hits are taken in rank order while they fit the budget, then shown oldest first with their dates,
so the model can reason about time ("when did...", "what changed..."). A fact superseded since is
not shown unless the search asked for the past (as_of).
"""

from __future__ import annotations

from datetime import datetime

from .._models import Hit
from ..llm import estimate_tokens

# a reply that starts to echo the prompt's structure has finished answering
STOP = ["\nQuestion:", "\n- ["]

# One user message, instructions first and the question last: measured with SmolLM2-135M, a
# system message with the memories made it echo the prompt; this form answered.
ANSWER_PROMPT = """Today is {today}. Use these memories to answer the question. Answer in a few \
words; if they do not say, answer "Not mentioned in memory."
{memories}

Question: {question}
Short answer:"""


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
    return [{"role": "user", "content": ANSWER_PROMPT.format(
        today=f"{now:%-d %B %Y}", memories=context or "(no memories)", question=question)}]
