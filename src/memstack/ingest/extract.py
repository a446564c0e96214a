"""LLM-based ingestion: the two prompts and their schemas (pure functions, no store access).

Call 1 (propose) reads the new messages and proposes candidate facts, preferences and
procedures, each citing the messages it came from. Call 2 (decide) sees the candidates beside the
nearest existing memories of the same scope and picks ADD / UPDATE / DELETE / NOOP for each
candidate (the operation set of mem0 and Memory-R1). Existing memories are shown by number, not
id, so a model cannot invent an id; numbers are mapped back here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, create_model

from ..retrieve.query import WORD, STOPWORDS

PROMPT_VERSION = "extract-v2"
MAX_FACTS = 12
FACT_CHARS = 300


class Candidate(BaseModel):
    text: str = Field(min_length=3, max_length=FACT_CHARS)
    kind: Literal["fact", "preference", "procedure"]
    sources: list[int] = Field(default_factory=list, max_length=8)


class Proposal(BaseModel):
    facts: list[Candidate] = Field(max_length=MAX_FACTS)


class Decision(BaseModel):
    """One decision as the rest of the code reads it (the reply schemas below are stricter)."""

    fact: int
    event: Literal["ADD", "UPDATE", "DELETE", "NOOP"]
    target: int | None = None
    text: str | None = None


class Decisions(BaseModel):
    decisions: list[Decision]


def _numbers(count: int) -> Any:
    """The type of a number from 1 to count: an enum in the JSON schema, so a server that
    constrains decoding to the schema cannot produce a number that names nothing."""
    return Literal[tuple(range(1, max(count, 1) + 1))]


def proposal_model(messages: int) -> type[Proposal]:
    """Call 1's reply schema: sources can only name the new messages."""
    source = _numbers(messages)
    candidate = create_model("Candidate", __base__=Candidate,
                             sources=(list[source], Field(default_factory=list, max_length=8)))
    return create_model("Proposal", __base__=Proposal,
                        facts=(list[candidate], Field(max_length=MAX_FACTS)))


def decisions_model(facts: int, memories: int) -> type[Decisions]:
    """Call 2's reply schema: one variant per event, so UPDATE, DELETE and NOOP must name an
    existing memory and UPDATE must give the new text; numbers are limited to those shown."""
    fact, target = _numbers(facts), _numbers(memories)
    variants = [
        create_model("Add", event=(Literal["ADD"], ...), fact=(fact, ...)),
        create_model("Update", event=(Literal["UPDATE"], ...), fact=(fact, ...),
                     target=(target, ...),
                     text=(str, Field(min_length=3, max_length=FACT_CHARS))),
        create_model("Delete", event=(Literal["DELETE"], ...), fact=(fact, ...),
                     target=(target, ...)),
        create_model("Noop", event=(Literal["NOOP"], ...), fact=(fact, ...), target=(target, ...)),
    ]
    one = Annotated[Union[tuple(variants)], Field(discriminator="event")]
    return create_model("Decisions", decisions=(list[one], Field(max_length=2 * MAX_FACTS)))


def read_decisions(reply: BaseModel) -> list[Decision]:
    return [Decision.model_validate(d.model_dump()) for d in reply.decisions]


@dataclass(frozen=True)
class Line:
    """A message as the LLM sees it: number, time, speaker, text."""

    number: int
    when: datetime | None
    speaker: str
    text: str

    def render(self, limit: int) -> str:
        text = self.text if len(self.text) <= limit else self.text[:limit] + " [...]"
        stamp = f"{self.when:%Y-%m-%d} " if self.when else ""
        return f"[{self.number}] {stamp}{self.speaker}: {text}"


PROPOSE_SYSTEM = """You maintain the long-term memory of an assistant. From the NEW MESSAGES, \
extract what is worth remembering about the people in them: personal facts, events with their \
dates, plans, relationships, possessions, work, preferences (likes and dislikes) and procedures \
(how someone wants things done).
Rules:
- Each fact is one short, self-contained sentence in the third person that names the person \
("Ann lives in Paris."), never "I" or "the speaker".
- Use absolute dates: resolve "yesterday", "last week" against the message date.
- Skip greetings, small talk, questions, and suggestions the assistant made.
- kind is "preference" for likes and dislikes, "procedure" for how to do something, else "fact".
- sources lists the numbers of the new messages the fact comes from.
- If nothing is worth remembering, return {"facts": []}.
Example. NEW MESSAGES:
[1] 2024-03-02 Sam: I got back from Lisbon yesterday, my sister lives there. I hate flying.
Reply: {"facts": [{"text": "Sam returned from a trip to Lisbon on 1 March 2024.", "kind": \
"fact", "sources": [1]}, {"text": "Sam's sister lives in Lisbon.", "kind": "fact", "sources": \
[1]}, {"text": "Sam dislikes flying.", "kind": "preference", "sources": [1]}]}
Reply with only a JSON object matching this schema:
"""

DECIDE_SYSTEM = """You keep a memory store consistent. For each NEW FACT, compare it with the \
EXISTING MEMORIES and choose one event:
- ADD: the fact is new; no existing memory says it.
- UPDATE: the fact changes or corrects an existing memory about the same thing (a new home, job, \
or preference). target is that memory's number; text is the memory as it should read now.
- DELETE: the fact says an existing memory is no longer true, with no replacement ("Ann sold her \
car"). target is that memory's number.
- NOOP: an existing memory already says the same. target is that memory's number.
Give exactly one decision per new fact, with fact set to the new fact's number.
Example. EXISTING MEMORIES:
[1] Sam lives in Porto.
[2] Sam likes jazz.
NEW FACTS:
[1] Sam moved to Madrid.
[2] Sam likes jazz music.
[3] Sam has a dog named Rex.
Reply: {"decisions": [{"event": "UPDATE", "fact": 1, "target": 1, "text": "Sam lives in \
Madrid."}, {"event": "NOOP", "fact": 2, "target": 2}, {"event": "ADD", "fact": 3}]}
Reply with only a JSON object matching this schema:
"""


def propose_messages(new: list[Line], earlier: list[Line], schema: str, budget_chars: int
                     ) -> tuple[list[dict[str, str]], int]:
    """The prompt of call 1 and how many of the oldest new messages did not fit the budget.
    `earlier` is context: the turns before these in the session, and the assistant's replies."""
    per_message = max(200, budget_chars // 2)
    rendered = [line.render(per_message) for line in new]
    kept, used = [], 0
    for text in reversed(rendered):  # the most recent messages first
        if kept and used + len(text) > budget_chars:
            break
        kept.insert(0, text)
        used += len(text) + 1
    context = [line.render(300) for line in earlier]
    while context and used + sum(map(len, context)) > budget_chars * 1.25:
        context.pop(0)
    parts = []
    if context:
        parts.append("CONTEXT (do not extract from it):\n" + "\n".join(context))
    parts.append("NEW MESSAGES:\n" + "\n".join(kept))
    return ([{"role": "system", "content": PROPOSE_SYSTEM + schema},
             {"role": "user", "content": "\n\n".join(parts)}], len(new) - len(kept))


def decide_messages(existing: list[tuple[str, datetime | None]], candidates: list[Candidate],
                    schema: str) -> list[dict[str, str]]:
    """The prompt of call 2: existing memories and new facts, numbered from 1."""
    memories = "\n".join(f"[{n}] {text}" for n, (text, _) in enumerate(existing, 1))
    facts = "\n".join(f"[{n}] {c.text}" for n, c in enumerate(candidates, 1))
    return [{"role": "system", "content": DECIDE_SYSTEM + schema},
            {"role": "user", "content": f"EXISTING MEMORIES:\n{memories}\n\nNEW FACTS:\n{facts}"}]


# the start of a prompt line ("[2] 2024-05-01 Ann: "), which small models copy into facts
_LINE_ECHO = re.compile(r"^\s*(\[\d+\]\s*)?(\d{4}-\d{2}-\d{2}\s+)?"
                        r"((?:[^\s:]+\s){0,3}?[^\s:]+:\s+)?")


def strip_echo(text: str) -> str:
    """A fact without an echo of the prompt's line format in front of it: the number, and the
    date with the speaker after it."""
    match = _LINE_ECHO.match(text)
    if not match or not (match.group(1) or match.group(2)):
        return text
    end = match.end() if match.group(2) else match.end(1)
    return text[end:].strip() or text


def useful(candidate: Candidate) -> bool:
    """A fact worth storing says something in words: at least two of them with letters."""
    return sum(any(ch.isalpha() for ch in word) for word in candidate.text.split()) >= 2


def support(claim: str, evidence: str) -> float:
    """The share of a claim's content words that the evidence contains (4-letter prefixes, so
    "lives" matches "live"). A grounding check against hallucinated facts: small models in
    particular append plausible details that nobody said."""
    def words(text: str) -> list[str]:
        return [w for w in WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 2]

    claimed = set(words(claim))
    if not claimed:
        return 1.0
    seen = {w[:4] for w in words(evidence)}
    return sum(w[:4] in seen for w in claimed) / len(claimed)


def normalise_fact(text: str) -> str:
    """Comparison form of a fact: case, spacing and final punctuation do not matter."""
    return " ".join(text.lower().split()).rstrip(".!")
