"""Duplicate merging measured (`memstack bench dedupe`): precision and recall of the pairs
merged on a synthetic set with known duplicates and known near-misses.

The set is made by code with a fixed seed. Each of twelve template families (preferences,
homes, pets, schedules, procedures, answer styles; allergies, jobs, birthdays, deploy rules,
tone, hobbies) states a fact of a user in several wordings (synonyms, reordered clauses, the
same text again in another session on another day) and its near-misses: negation ("does not
like"), opposites ("dislikes", "after" for "before"), other numbers, times or dates, another
name, and another value ("coffee" for "tea", guarded only by the substitution rule of
learn/near.py and the thresholds). Some texts are repeated under another user (never to be merged). Four cubes: two halves
of every family made with different seeds (users and values differ), and two halves of six
families each (the stress test: templates never seen). Thresholds are chosen on one half (the
highest recall with precision >= 0.99 on the guarded near-misses, every type but value swaps,
which only a generic substitution rule guards) and measured on the other, each way; precision over every pair, value
swaps included, is reported beside it.

Items are written through `Memory.add` with the real embedding model, so the vectors compared
are the stored ones (with their date suffix); pairs are counted within each group merged.
"""

from __future__ import annotations

import itertools
import json
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from ..embed import Embedder
from ..learn.dedupe import DedupeSettings

NAMES = ["Ann", "Bob", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kemal", "Lena", "Mateo", "Nadia", "Omar", "Priya"]
SLOTS: dict[str, list[str]] = {
    "T": ["green tea", "black coffee", "jazz music", "hiking", "science fiction novels",
          "board games", "chess", "gardening", "spicy food", "opera"],
    "C": ["Berlin", "Lisbon", "Toronto", "Osaka", "Nairobi", "Lima", "Oslo", "Denver"],
    "P": ["cats", "dogs", "rabbits", "parrots", "goldfish"],
    "E": ["yoga class", "piano lesson", "team standup", "dentist appointment", "swim practice"],
    "D": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
    "X": ["unit tests", "linter", "type checker", "integration tests", "security scan"],
    "A": ["short", "long"],
    "F": ["peanuts", "shellfish", "penicillin", "pollen", "cats", "gluten"],
    "Co": ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark Industries"],
    "R": ["nurse", "teacher", "data analyst", "chef", "pilot", "lawyer"],
    "M": ["January", "March", "April", "June", "August", "October", "December"],
    "env": ["staging", "production"],
    "tone": ["formal", "casual"],
    "H": ["fishing", "climbing", "cycling", "sailing", "skiing"],
}
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_OPPOSITE = {"short": "long", "long": "short", "formal": "casual", "casual": "formal",
             "staging": "production", "production": "staging"}


@dataclass(frozen=True)
class Family:
    """One fact and its wordings; near-misses by type: templates that change its meaning
    ("N2"/"T2"...: another value of that slot, "k2"/"h2"/"d2": another number)."""

    name: str
    kind: str
    same: tuple[str, ...]
    near: tuple[tuple[str, ...], ...]  # (type, template[, meaning: same meaning, same gold])


FAMILIES_A = (
    Family("preference", "fact",
           ("{N} likes {T}", "{N} enjoys {T}", "{N} is fond of {T}", "{T} is something {N} likes",
            "{N} really likes {T}"),
           (("negation", "{N} does not like {T}", "not-like"),
            ("negation", "{N} doesn't enjoy {T}", "not-like"),
            ("opposite", "{N} dislikes {T}"), ("opposite", "{N} hates {T}"),
            ("name", "{N2} likes {T}"), ("value", "{N} likes {T2}"))),
    Family("home", "fact",
           ("{N} lives in {C}", "{N} resides in {C}", "{N}'s home is in {C}",
            "{C} is where {N} lives", "{N} is living in {C}"),
           (("name", "{N} lives in {C2}"), ("negation", "{N} no longer lives in {C}"),
            ("number", "{N} lived in {C} until 20{k}{k2}"), ("name", "{N2} lives in {C}"))),
    Family("pets", "fact",
           ("{N} has {k} {P}", "{N} owns {k} {P}", "{N} keeps {k} {P} at home",
            "{N} has {kw} {P}"),
           (("number", "{N} has {k2} {P}"), ("negation", "{N} has no {P}"),
            ("value", "{N} has {k} {P2}"))),
    Family("schedule", "fact",
           ("{N} has a {E} on {D} at {h} pm", "On {D} at {h} pm {N} has a {E}",
            "{N}'s {E} is on {D} at {h} pm", "{N} goes to a {E} on {D} at {h} pm"),
           (("date", "{N} has a {E} on {D2} at {h} pm"), ("number", "{N} has a {E} on {D} at "
                                                         "{h2} pm"),
            ("date", "{N} has a {E} on {D} at {h} am"), ("value", "{N} has a {E2} on {D} at "
                                                        "{h} pm"))),
    Family("tests-rule", "procedure",
           ("Run the {X} before merging a pull request",
            "Before merging a pull request, run the {X}",
            "Run the {X} before you merge a pull request",
            "The {X} should be run before merging a pull request"),
           (("opposite", "Run the {X} after merging a pull request"),
            ("negation", "Do not run the {X} before merging a pull request"),
            ("value", "Run the {X2} before merging a pull request"))),
    Family("answer-length", "insight",
           ("{N} prefers {A} answers", "{N} likes {A} replies", "{N} wants answers to be {A}",
            "{N} responds best to {A} answers"),
           (("opposite", "{N} prefers {A_} answers"), ("name", "{N2} prefers {A} answers"))),
)
FAMILIES_B = (
    Family("allergy", "fact",
           ("{N} is allergic to {F}", "{N} has an allergy to {F}",
            "{F} gives {N} an allergic reaction", "{N} reacts allergically to {F}"),
           (("negation", "{N} is not allergic to {F}"), ("name", "{N2} is allergic to {F}"),
            ("value", "{N} is allergic to {F2}"))),
    Family("job", "fact",
           ("{N} works at {Co} as a {R}", "{N} is a {R} at {Co}",
            "{N} is employed by {Co} as a {R}", "At {Co}, {N} works as a {R}"),
           (("name", "{N} works at {Co2} as a {R}"), ("value", "{N} works at {Co} as a {R2}"),
            ("negation", "{N} does not work at {Co} as a {R}"))),
    Family("birthday", "fact",
           ("{N}'s birthday is on {M} {d}", "{N} was born on {M} {d}",
            "{N} celebrates a birthday on {M} {d}", "{N}'s birthday falls on {d} {M}"),
           (("number", "{N}'s birthday is on {M} {d2}"), ("date", "{N}'s birthday is on {M2} {d}"),
            ("name", "{N2}'s birthday is on {M} {d}"))),
    Family("deploy-rule", "procedure",
           ("Deploy to {env} only after the {X} pass",
            "Only deploy to {env} once the {X} have passed",
            "Deploy to {env} only when the {X} pass",
            "Wait for the {X} to pass, then deploy to {env}"),
           (("value", "Deploy to {env_} only after the {X} pass"),
            ("opposite", "Deploy to {env} only before the {X} pass"),
            ("negation", "Never deploy to {env} after the {X} pass"))),
    Family("tone", "insight",
           ("{N} prefers a {tone} tone", "{N} likes a {tone} tone in messages",
            "A {tone} tone works best with {N}", "{N} responds well to a {tone} tone"),
           (("opposite", "{N} prefers a {tone_} tone"), ("name", "{N2} prefers a {tone} tone"))),
    Family("hobby", "fact",
           ("{N} goes {H} every weekend", "Every weekend {N} goes {H}",
            "{N} goes {H} each weekend", "On weekends {N} goes {H}"),
           (("date", "{N} goes {H} every Monday"), ("negation", "{N} never goes {H}"),
            ("date", "{N} rarely goes {H}"), ("value", "{N} goes {H2} every weekend"))),
)


@dataclass
class Record:
    text: str
    kind: str
    user: str
    session: str
    day: int
    gold: str
    family: str
    role: str  # same, a near-miss type, or "other-user"


def fill(rng: random.Random) -> dict[str, str]:
    """Slot values of one fact: each slot, its alternative (suffix 2), numbers and words."""
    values: dict[str, str] = {}
    for slot, options in SLOTS.items():
        first, second = rng.sample(options, 2)
        values[slot], values[slot + "2"] = first, second
    values["N"], values["N2"] = rng.sample(NAMES, 2)
    k, k2 = rng.sample(range(2, 10), 2)
    values.update(k=str(k), k2=str(k2), kw=_NUMBER_WORDS[k], h=str(rng.randint(1, 8)),
                  d=str(rng.randint(1, 28)))
    values["h2"] = str(int(values["h"]) + rng.randint(1, 3))
    values["d2"] = str(int(values["d"]) % 28 + 1)
    for slot in ("A", "tone", "env"):
        values[slot + "_"] = _OPPOSITE[values[slot]]
    return values


def make_set(families: tuple[Family, ...], seed: int, users: int = 16) -> list[Record]:
    """Each user gets four facts of different families; each fact 2-4 wordings (one of them
    sometimes again in another session), its near-misses, and sometimes a copy under
    another user."""
    rng = random.Random(seed)
    out: list[Record] = []
    for u in range(users):
        user = f"user{seed}-{u}"
        for f, family in enumerate(rng.sample(families, 4)):
            v, gold = fill(rng), f"{user}/{f}"
            v["N"] = NAMES[u % len(NAMES)]
            v["N2"] = rng.choice([n for n in NAMES if n != v["N"]])
            same = rng.sample(family.same, rng.randint(2, min(4, len(family.same))))
            texts = [t.format(**v) for t in same]
            if rng.random() < 0.5:
                texts.append(rng.choice(texts))  # the same text in another session
            for text in texts:
                out.append(Record(text, family.kind, user, f"s{rng.randint(1, 9)}",
                                  rng.randint(0, 300), gold, family.name, "same"))
            for what, template, *meaning in rng.sample(family.near, min(3, len(family.near))):
                out.append(Record(template.format(**v), family.kind, user, f"s{rng.randint(1, 9)}",
                                  rng.randint(0, 300), f"{gold}/{meaning or template}",
                                  family.name, what))
            if rng.random() < 0.3:
                other = f"user{seed}-{(u + 1) % users}"
                out.append(Record(texts[0], family.kind, other, "s1", rng.randint(0, 300),
                                  f"{gold}/other", family.name, "other-user"))
    return _same_text_same_gold(out)


def _same_text_same_gold(records: list[Record]) -> list[Record]:
    """A text said twice in one scope means one thing, whichever fact made it (a copy from
    another user may meet that user's own equal text)."""
    first: dict[tuple[str, str], str] = {}
    alias: dict[str, str] = {}
    for r in records:
        gold = first.setdefault((r.user, r.text.casefold()), r.gold)
        if gold != r.gold:
            alias[r.gold] = gold
    for r in records:
        while r.gold in alias:
            r.gold = alias[r.gold]
    return records


def score(groups: list[list[str]], gold: dict[str, Record]) -> dict[str, Any]:
    """Pair precision, recall and F1 of merged groups against the known ones, and the wrong
    pairs by near-miss type."""
    predicted = [(a, b) for g in groups for a, b in itertools.combinations(g, 2)]
    right = sum(gold[a].gold == gold[b].gold for a, b in predicted)
    sizes: dict[str, int] = {}
    for record in gold.values():
        sizes[record.gold] = sizes.get(record.gold, 0) + 1
    pairs = sum(n * (n - 1) // 2 for n in sizes.values())
    wrong: dict[str, int] = {}
    for a, b in predicted:
        if gold[a].gold != gold[b].gold:
            roles = {gold[a].role, gold[b].role} - {"same"}
            what = "other fact" if "other-user" in roles or not roles else roles.pop()
            wrong[what] = wrong.get(what, 0) + 1
    unguarded = wrong.get("value", 0) + wrong.get("other fact", 0)
    guarded = len(predicted) - unguarded
    precision = right / len(predicted) if predicted else 1.0
    recall = right / pairs if pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"pairs": pairs, "merged_pairs": len(predicted), "right_pairs": right,
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            # without the swaps of one value for another ("tea" / "coffee"), which only the
            # generic substitution rule guards: how well the rules and thresholds keep the guarded near-misses apart
            "precision_guarded": round(right / guarded, 4) if guarded else 1.0,
            "wrong_by_type": wrong}


GRID = {"vector": (0.80, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94),
        "sure": (0.94, 0.96, 0.98, 1.0),
        "lexical": (0.2, 0.35, 0.5, 0.65)}


def tune(measure: Callable[[DedupeSettings], dict[str, Any]], floor: float = 0.99,
         metric: str = "precision_guarded") -> tuple[DedupeSettings, dict[str, Any]]:
    """The settings of the grid with the highest recall at `metric` >= floor (ties: the
    strictest thresholds; none reaching it: the most precise)."""
    best: tuple[tuple[float, ...], DedupeSettings, dict[str, Any]] | None = None
    for vector, sure, lex in itertools.product(*GRID.values()):
        if sure < vector:
            continue
        settings = DedupeSettings(vector, sure, lex)
        result = measure(settings)
        ok = result[metric] >= floor
        key = (ok, result["recall"] if ok else result[metric], result[metric], vector, sure,
               lex)
        if best is None or key > best[0]:
            best = key, settings, result
    assert best is not None
    return best[1], best[2]


def run(*, embedder: Embedder | None = None, workdir: Path | None = None, seed: int = 18,
        users: int = 16) -> dict[str, Any]:
    """Write both halves, tune on each and measure on the other, then merge with the default
    thresholds (timed)."""
    from .._memory import Memory

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        memory = Memory(Path(tmp) / "dedupe.db", embedder=embedder, context_window=None)
        try:
            return _measure(memory, seed, users)
        finally:
            memory.close()


def _measure(memory: Any, seed: int, users: int) -> dict[str, Any]:
    both = FAMILIES_A + FAMILIES_B
    halves = {"seed-a": make_set(both, seed, users), "seed-b": make_set(both, seed + 1, users),
              "family-a": make_set(FAMILIES_A, seed + 2, users),
              "family-b": make_set(FAMILIES_B, seed + 3, users)}
    start = time.perf_counter()
    gold = {cube: _write(memory, cube, records) for cube, records in halves.items()}
    written = time.perf_counter() - start

    def measure(cube: str) -> Callable[[DedupeSettings], dict[str, Any]]:
        def at(settings: DedupeSettings) -> dict[str, Any]:
            report = memory.dedupe(cube=cube, dry_run=True, settings=settings)
            return score([[g.kept, *g.merged] for g in report.groups], gold[cube])
        return at

    crossed = []
    for on, other in (("seed-a", "seed-b"), ("seed-b", "seed-a"), ("family-a", "family-b"),
                      ("family-b", "family-a")):
        chosen, tuned = tune(measure(on))
        crossed.append({"tuned_on": on, "held_out": other, "settings": vars(chosen),
                        "tuned": tuned, "held_out_result": measure(other)(chosen)})
    default = DedupeSettings()
    results = {}
    for cube in halves:
        start = time.perf_counter()
        report = memory.dedupe(cube=cube, settings=default)
        seconds = time.perf_counter() - start
        results[cube] = {**score([[g.kept, *g.merged] for g in report.groups], gold[cube]),
                         "items": len(gold[cube]), "seconds": round(seconds, 3)}
    return {"benchmark": "dedupe", "seed": seed, "users": users,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "embedder": memory.embedder.name, "write_seconds": round(written, 2),
            "default_settings": vars(default), "merged_with_defaults": results,
            "crossed": crossed}


def _write(memory: Any, cube: str, records: list[Record]) -> dict[str, Record]:
    base = datetime(2025, 1, 1, tzinfo=timezone.utc)
    results = memory.add_many({"messages": r.text, "kind": r.kind, "user_id": r.user,
                               "session_id": r.session, "cube": cube, "infer": False,
                               "observed_at": base + timedelta(days=r.day)} for r in records)
    return {result.ids[0]: record for result, record in zip(results, records)}


def save(result: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dedupe.json"
    path.write_text(json.dumps(result, indent=2))
    return path
