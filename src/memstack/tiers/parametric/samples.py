"""Memories as training samples: each item becomes (prompt, answer) pairs in several phrasings,
statements and questions, some kept out of training to measure generalization.

An item may carry its own phrasings in metadata: `questions` (train), `heldout` (audit only) and
`answer` (the value a reply must contain). Otherwise phrasings come from templates around the
item's subject (metadata `subject`, else its leading name, else its speaker or user).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..._models import Item

_NAME = re.compile(r"^((?:[A-Z][\w'-]*\s?){1,3})")
TRAIN_TEMPLATES = ("What do you know about {subject}?", "Tell me a fact about {subject}.",
                   "What do you remember about {subject}?")
HELDOUT_TEMPLATES = ("Do you recall anything about {subject}?",)
CONTROL_PROMPTS = (  # unrelated prompts for locality: answers should stay the base model's
    "What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
    "What do bees make?", "What is two plus three?", "Which planet do we live on?",
    "What is frozen water called?", "Name a fruit that is yellow.",
    "What language is spoken in Spain?", "What do you use to write on paper?",
    "Which animal says moo?", "What season comes after winter?",
    "What is the chemical symbol for gold?", "How many minutes are in an hour?",
    "Who painted the Mona Lisa?", "What is the largest planet in the solar system?",
    "Give me a word that rhymes with cat.", "What do caterpillars turn into?",
    "Explain why the sky looks blue.", "Write a short greeting for a birthday card.",
    "List two uses of a hammer.", "What is the square root of nine?",
    "Describe a forest in one sentence.", "What should you do if you feel tired?",
    "How do fish breathe?", "What is the capital of Japan?", "Which metal is liquid at room "
    "temperature?", "Suggest a name for a goldfish.", "What is a noun?",
    "Why do leaves change colour in autumn?", "How many sides does a hexagon have?",
    "What is the main ingredient of bread?", "Tell me something about the Moon.",
    "What does a firefighter do?", "Translate 'thank you' into Spanish.",
    "What is the speed of light?", "Give an example of a renewable energy source.",
    "What are the three states of matter?", "Why should we recycle?",
    "What is photosynthesis?")
GENERAL_TEXT = (  # held-out general text for perplexity, written for this project
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "Rain fell for most of the afternoon, so the match was moved to the following Sunday.",
    "She boiled the water, poured it over the tea leaves and waited three minutes.",
    "A bicycle needs regular care: the chain should be cleaned and oiled every few weeks.",
    "The museum's new exhibition shows maps drawn by sailors in the sixteenth century.",
    "Most plants need light, water and air to grow, and many also need good soil.",
    "He missed the last bus and walked home along the river under a clear sky.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Children in the village learn to swim in the lake during the summer holidays.",
    "The train was delayed by twenty minutes because of work on the tracks.",
    "Old houses in the town are built of stone and have small windows and thick walls.",
    "The committee will publish its report after the meeting next Thursday.")


@dataclass(frozen=True)
class Sample:
    prompt: str
    answer: str
    item_id: str | None = None
    ended: bool = True  # the answer is complete: training also teaches the end-of-turn token


@dataclass(frozen=True)
class ItemSamples:
    item: Item
    train: tuple[Sample, ...]
    heldout: tuple[Sample, ...]
    value: str  # what a reply must contain to count as recalled


def subject(item: Item) -> str:
    meta = item.metadata or {}
    if isinstance(meta.get("subject"), str) and meta["subject"].strip():
        return meta["subject"].strip()
    match = _NAME.match(item.content or "")
    if match and match.group(1).strip() not in {"I", "The", "A", "An", "My", "We"}:
        return match.group(1).strip()
    return item.speaker or item.user_id or "the user"


def item_samples(item: Item) -> ItemSamples:
    """Statements and questions for one item; the answer is always the item's text, so what is
    learned is the fact as stored."""
    text = " ".join((item.content or "").split())
    meta = item.metadata or {}
    who = subject(item)
    questions = _strings(meta.get("questions")) or [t.format(subject=who) for t in TRAIN_TEMPLATES]
    heldout = _strings(meta.get("heldout")) or [t.format(subject=who) for t in HELDOUT_TEMPLATES]
    value = meta.get("answer") if isinstance(meta.get("answer"), str) else text
    train = [Sample(q, text, item.id) for q in questions]
    train.append(Sample(f"Complete: {_prefix(text)}", text, item.id))
    return ItemSamples(item, tuple(train), tuple(Sample(q, text, item.id) for q in heldout),
                       value)


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str) and v.strip()] if isinstance(value, list) \
        else []


def _prefix(text: str) -> str:
    words = text.split()
    return " ".join(words[:max(2, len(words) // 2)])
