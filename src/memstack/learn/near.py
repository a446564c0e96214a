"""When two short texts say the same thing: the text rules of duplicate merging (dedupe.py).

Embeddings place "Ann likes tea" close to "Ann dislikes tea" (cosine 0.88 with
all-MiniLM-L6-v2), "Ann has 3 cats" to "Ann has 4 cats" (0.98) and "run the tests before
merging" to "... after merging" (0.99): closer than many true paraphrases. So a pair is merged
only when no rule here sees a difference of meaning that vectors blur:

- negation: one says not / never / no, the other does not;
- opposites: a word on one side only whose opposite is on the other only (a short list of
  pairs, and dis-/un-/in-/non- prefixes: likes / dislikes);
- numbers, times, dates: the numbers (words counted as digits), months, weekdays, am/pm,
  frequency words (always, often, never...) and words that say no without a negation
  (dislike, refuse, unable...) of the two must be the same;
- names: a capitalised word of one (not a common sentence opener) missing from the other;
- substitution: the content words (stems, stop words aside) of the two are the same but for
  one or two words on each side ("Ann is a nurse" / "Ann is a pilot", "deploy to staging" /
  "... to production"), no fewer words are shared than differ, and the differing words do
  not share a stem or prefix ("living" / "lives"). Function words (articles, pronouns,
  auxiliaries) are left out, prepositions and conjunctions kept. Vectors barely see which
  word was swapped, so a synonym ("likes" / "enjoys") is refused with a value swap; a side
  that only adds words ("Ann really likes tea") is no swap, and paraphrases that differ in
  more words are left to the vector and lexical thresholds.

The rules are pure functions of the two texts; they err towards "different" (a missed merge
costs a little recall, a wrong merge loses a fact). `lexical` is the token overlap used with
the vector similarity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+")
_CONTRACTIONS = {"can't": ("can", "not"), "won't": ("will", "not"), "cannot": ("can", "not"),
                 "shan't": ("shall", "not")}
NEGATIONS = frozenset({"not", "no", "never", "none", "nobody", "nothing", "neither", "nor",
                       "nowhere", "without", "hardly"})
_NUMBERS = {w: str(n) for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                 "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000",
                 "dozen": "12", "once": "1x", "twice": "2x", "half": "0.5"})
# words of one class exclude each other: two texts naming different members differ
_CLASSES = {
    "month": "january february march april may june july august september october november "
             "december",
    "weekday": "monday tuesday wednesday thursday friday saturday sunday weekend weekday",
    "half-day": "am pm morning afternoon evening night noon midnight",
    "frequency": "always usually often sometimes occasionally rarely seldom never daily weekly "
                 "monthly yearly",
    "colour": "red orange yellow green blue purple pink brown black white grey gray",
    # words that say no without a negation: "dislikes" is not "is fond of"
    "polarity": "dislike hate detest loathe despise unable unwilling unhappy unlikely disagree "
                "refuse forbid lack fail quit stop avoid",
}
_OPPOSITES = [
    "like hate", "love hate", "enjoy hate", "prefer avoid", "before after", "early late",
    "earlier later", "first last", "more less", "most least", "increase decrease", "up down",
    "high low", "higher lower", "big small", "large small", "long short", "longer shorter",
    "hot cold", "warm cold", "open close", "start stop", "begin end", "start finish",
    "enable disable", "allow forbid", "allow deny", "accept reject", "include exclude",
    "add remove", "buy sell", "win lose", "pass fail", "true false", "yes no",
    "left right", "above below", "inside outside", "old new", "old young", "good bad",
    "better worse", "best worst", "happy sad", "fast slow", "easy hard", "easy difficult",
    "cheap expensive", "light dark", "light heavy", "full empty", "same different",
    "north south", "east west", "min max", "minimum maximum", "lend borrow", "give take",
    "arrive leave", "quit join", "strict lenient", "formal casual", "brief detailed",
    "concise verbose", "loud quiet", "wet dry", "morning evening", "sweet bitter",
    "spicy mild", "sister brother",
    "wife husband", "mother father", "daughter son", "aunt uncle", "girl boy", "man woman",
]
_PREFIXES = ("dis", "un", "in", "im", "ir", "il", "non")
# capitalised words that open sentences and are not names
_COMMON = frozenset("""
a an the i i'm i've he she it we they you his her its our their my your this that these those
there here on in at by for from with to of as after before when while if since during until
every each all some any most many much few no not never always usually often sometimes please
do does did don't doesn't didn't is are was were be been has have had can could should would
will must may might use run keep check make add send write read ask call try avoid remember
prefer set put open close start stop execute deploy test build merge push pull review update
install restart save commit format answer reply respond greet mention include give show tell
explain summarize summarise let also then so but and or yet because although though however
today tomorrow yesterday tonight last next once twice first second finally new old
""".split())


@dataclass(frozen=True)
class Text:
    """What the rules read of one text: its tokens (lower case, contractions split), their
    stems, its negation, numbers, class words and names."""

    tokens: tuple[str, ...]
    stems: frozenset[str]
    negated: bool
    numbers: tuple[str, ...]
    classes: tuple[tuple[str, frozenset[str]], ...]
    names: frozenset[str]
    content: tuple[str, ...]  # stems of the words other than function words, numbers as digits


def stem(word: str) -> str:
    """A crude suffix stripper, enough to see likes / liked / liking as one word.

    >>> stem("likes"), stem("liked"), stem("dislike")
    ('lik', 'lik', 'dislik')
    """
    for suffix, keep in (("ies", 4), ("ing", 5), ("ed", 4), ("es", 5), ("s", 4)):
        if word.endswith(suffix) and len(word) >= keep and not word.endswith("ss"):
            word = word[:-len(suffix)] + ("y" if suffix == "ies" else "")
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


@lru_cache(maxsize=65536)
def read(text: str) -> Text:
    raw = _TOKEN.findall(text)
    tokens: list[str] = []
    for word in raw:
        low = word.lower()
        if low.endswith("'s"):
            low = low[:-2]
        if low in _CONTRACTIONS:
            tokens += _CONTRACTIONS[low]
        elif low.endswith("n't"):
            tokens += [low[:-3], "not"]
        else:
            tokens.append(low)
    numbers = tuple(sorted(n for t in tokens if (n := _number(t))))
    stems = [stem(t) for t in tokens]
    classes = tuple((name, frozenset(t for t in stems if t in members))
                    for name, members in _CLASS_WORDS.items())
    names = frozenset(w.lower().removesuffix("'s") for w in raw
                      if w[0].isupper() and w.lower() not in _COMMON and w != "I")
    content = tuple(_number(t) or s for t, s in zip(tokens, stems) if t not in _FUNCTION)
    return Text(tuple(tokens), frozenset(s for t, s in zip(tokens, stems) if t not in _STOP),
                any(t in NEGATIONS for t in tokens), numbers, classes, names, content)


_CLASS_WORDS = {name: frozenset(stem(w) for w in words.split())
                for name, words in _CLASSES.items()}
_STOP = frozenset("a an the is are was were be been am of to in on at for with by and or as "
                  "it its this that do does did has have had i my me".split())
# function words (articles and other determiners, pronouns, auxiliaries and modals, on top of
# the stop words) are left out when two texts are compared word for word; prepositions and
# conjunctions stay: "before" / "when" or "in" / "near" change what a text says
_FUNCTION = _STOP | frozenset("""
me myself we us our ours ourselves you your yours yourself yourselves he him his himself she
her hers herself itself they them their theirs themselves what which who whom whose these
those each every either neither being having doing will would shall should can could may
might must also just very too then there here now
""".split())
_OPPOSITE = {frozenset(stem(w) for w in pair.split()) for pair in _OPPOSITES}


def _number(token: str) -> str:
    if token.isdigit():
        return str(int(token))
    return _NUMBERS.get(token, "")


def conflict(a: str, b: str) -> str | None:
    """Why two texts cannot say the same thing, or None when no rule sees a difference.

    >>> conflict("Ann likes tea", "Ann dislikes tea"), conflict("Ann likes tea", "Ann enjoys tea")
    ('polarity: - / dislik', 'substitution: lik / enjoy')
    >>> conflict("Ann likes tea", "Tea is something Ann likes") is None
    True
    """
    ta, tb = read(a), read(b)
    if ta.negated != tb.negated:
        return "negation"
    if ta.numbers != tb.numbers:
        return f"numbers: {' '.join(ta.numbers) or '-'} / {' '.join(tb.numbers) or '-'}"
    for (name, wa), (_, wb) in zip(ta.classes, tb.classes):
        if wa != wb:
            return f"{name}: {' '.join(sorted(wa)) or '-'} / {' '.join(sorted(wb)) or '-'}"
    names = _unmatched(ta, tb) or _unmatched(tb, ta)
    if names:
        return f"names: {names}"
    only_a, only_b = ta.stems - tb.stems, tb.stems - ta.stems
    return _opposite(only_a, only_b) or _substituted(ta, tb)


# at most this many content words on each side may differ for a pair to count as a swap
# (2 measured more precise than 1 on both splits of `memstack bench dedupe`: "linter" /
# "integration tests", "chef" / "data analyst" are swaps of one word for two)
SWAP = 2


def _substituted(ta: Text, tb: Text) -> str | None:
    """A swap of a few content words (at most SWAP a side, no more than the words both
    share), the words of one side not merely another form of the other's.

    >>> _substituted(read("Ann is a nurse"), read("Ann is a pilot"))
    'substitution: nurs / pilot'
    >>> _substituted(read("Ann likes tea"), read("Ann really likes tea")) is None  # added
    True
    """
    sa, sb = set(ta.content), set(tb.content)
    only_a, only_b = sa - sb, sb - sa
    a = {x for x in only_a if not any(_related(x, y) for y in only_b)}
    b = {y for y in only_b if not any(_related(x, y) for x in only_a)}
    if not a or not b or len(only_a) > SWAP or len(only_b) > SWAP or \
            len(sa & sb) < max(len(only_a), len(only_b)):
        return None
    return f"substitution: {' '.join(sorted(a))} / {' '.join(sorted(b))}"


def _related(x: str, y: str) -> bool:
    """Two stems that are forms of one word: one starts the other, or they share a prefix
    of at least 5 letters (allergic / allergy, employ / employment)."""
    short = min(len(x), len(y))
    if short >= 3 and (x.startswith(y) or y.startswith(x)):
        return True
    n = 0
    while n < short and x[n] == y[n]:
        n += 1
    return n >= 5 or (n >= 4 and n >= short - 1)


def _unmatched(ta: Text, tb: Text) -> str:
    """A name of one text the other does not contain in any case."""
    missing = sorted(n for n in ta.names if n not in tb.tokens)
    return " ".join(missing)


def _opposite(only_a: frozenset[str], only_b: frozenset[str]) -> str | None:
    for x in sorted(only_a):
        for y in sorted(only_b):
            if frozenset((x, y)) in _OPPOSITE or _prefixed(x, y) or _prefixed(y, x):
                return f"opposite: {x} / {y}"
    return None


def _prefixed(x: str, y: str) -> bool:
    return len(y) >= 3 and any(x == p + y for p in _PREFIXES)


def lexical(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' word stems (stop words aside), 0..1.

    >>> round(lexical("Ann likes green tea", "green tea is liked by Ann"), 2)
    1.0
    """
    sa, sb = read(a).stems, read(b).stems
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
