"""Query analysis: the words BM25 should match, and the time range the query mentions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from .._errors import InvalidQueryError
from .._time import query_time_range

MAX_QUERY_CHARS = 4096
WORD = re.compile(r"\w+", re.UNICODE)
_POSSESSIVE = re.compile(r"(?<=\w)['’]s\b", re.UNICODE)
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves tell know think also get got don doesn didn isn wasn
ll re ve
""".split())


FIRST_PERSON = frozenset({"i", "me", "my", "mine", "myself"})


@dataclass(frozen=True)
class Query:
    text: str
    words: tuple[str, ...]
    time_range: tuple[datetime, datetime] | None
    first_person: bool = False  # asks about the asker's own life ("I", "my", "me")


def analyse(text: object, now: datetime) -> Query:
    """Validate and analyse a query.

    >>> analyse('"caroline" AND -pottery*', now=datetime(2024, 1, 1)).words
    ('caroline', 'pottery')
    """
    if not isinstance(text, str):
        raise InvalidQueryError(f"a query is a string, got {type(text).__name__}")
    if len(text) > MAX_QUERY_CHARS:
        raise InvalidQueryError(f"the query has {len(text)} characters; the limit is "
                                f"{MAX_QUERY_CHARS}. Shorten it to the question itself.")
    words = [w.lower() for w in WORD.findall(_POSSESSIVE.sub("", text))]
    if not words:
        raise InvalidQueryError(f"the query {text!r} has no words to search for; "
                                "ask in words, e.g. 'where does Ann live'")
    # one-letter pieces of contractions ("that's" -> that, s) would match every contraction
    content = [w for w in words if w not in STOPWORDS and (len(w) > 1 or w.isdigit())] or words
    unique = tuple(dict.fromkeys(content))
    return Query(text, unique, query_time_range(text, now), bool(FIRST_PERSON & set(words)))
