"""Dates: parsing at the boundary, and relative time expressions ("two weeks ago", "last May").

All stored times are UTC. A naive datetime or a date without a zone is taken as UTC.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from dateutil import parser as _dateparser
from dateutil.relativedelta import relativedelta

from ._errors import InvalidDateError

_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
_MONTHS.update({name.lower(): i for i, name in enumerate(calendar.month_abbr) if name})
_WEEKDAYS = {name.lower(): i for i, name in enumerate(calendar.day_name)}
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
            "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
            "a couple of": 2, "a few": 3, "several": 3}
_UNITS = {"day": "days", "week": "weeks", "month": "months", "year": "years"}


def parse_time(value: object, *, field: str = "time") -> datetime:
    """Turn a datetime, date, epoch number or date string into an aware UTC datetime.

    >>> parse_time("1:56 pm on 8 May, 2023").isoformat()
    '2023-05-08T13:56:00+00:00'
    """
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), tz=timezone.utc)
        except (OverflowError, OSError, ValueError) as exc:
            raise InvalidDateError(f"{field}: {value!r} is not a valid epoch timestamp") from exc
    if isinstance(value, str) and value.strip():
        return _parse_string(value.strip(), field)
    raise InvalidDateError(f"{field}: expected a datetime, a date, an epoch number or a date "
                           f"string such as '2024-05-08T13:56:00Z', got {value!r}")


def _parse_string(text: str, field: str) -> datetime:
    try:
        return parse_time(datetime.fromisoformat(text.replace("Z", "+00:00")), field=field)
    except ValueError:
        pass
    try:
        parsed = _dateparser.parse(text.replace(" on ", " "), fuzzy=False)
    except (ValueError, OverflowError) as exc:
        raise InvalidDateError(f"{field}: cannot read {text!r} as a date; use ISO 8601, "
                               "for example '2024-05-08' or '2024-05-08T13:56:00Z'") from exc
    return parse_time(parsed, field=field)


def to_epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def from_epoch(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=timezone.utc) if value is not None else None


@dataclass(frozen=True)
class TimeSpan:
    """A relative expression found in text and the calendar range it denotes."""

    text: str
    start: datetime
    end: datetime  # exclusive

    def label(self) -> str:
        days = (self.end - self.start).days
        if days <= 1:
            return self.start.strftime("%-d %B %Y")
        if days <= 31 and self.start.day == 1 and self.end.day == 1:
            return self.start.strftime("%B %Y")
        if days >= 365 and self.start.month == 1 and self.start.day == 1:
            return self.start.strftime("%Y")
        return f"{self.start:%-d %B %Y} to {self.end - timedelta(days=1):%-d %B %Y}"


def _day(anchor: datetime, offset: int = 0) -> tuple[datetime, datetime]:
    start = datetime(anchor.year, anchor.month, anchor.day, tzinfo=timezone.utc) + timedelta(offset)
    return start, start + timedelta(days=1)


def _week(anchor: datetime, offset: int) -> tuple[datetime, datetime]:
    start = _day(anchor)[0] - timedelta(days=anchor.weekday()) + timedelta(weeks=offset)
    return start, start + timedelta(weeks=1)


def _month(year: int, month: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, 1, tzinfo=timezone.utc)
    return start, start + relativedelta(months=1)


def _year(year: int) -> tuple[datetime, datetime]:
    return datetime(year, 1, 1, tzinfo=timezone.utc), datetime(year + 1, 1, 1, tzinfo=timezone.utc)


def _shift(anchor: datetime, unit: str, amount: int) -> tuple[datetime, datetime]:
    if unit == "day":
        return _day(anchor, -amount)
    if unit == "week":
        return _week(anchor, -amount)
    moved = anchor - relativedelta(**{_UNITS[unit]: amount})
    return _month(moved.year, moved.month) if unit == "month" else _year(moved.year)


_NUM = r"(\d+|a couple of|a few|several|an?|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve)"
_MONTH_RE = "|".join(sorted(_MONTHS, key=len, reverse=True))
_WEEKDAY_RE = "|".join(_WEEKDAYS)
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"\b{_NUM}\s+(day|week|month|year)s?\s+ago\b", re.I), "ago"),
    (re.compile(r"\b(yesterday|today|tonight|tomorrow|this morning|last night)\b", re.I), "day"),
    (re.compile(r"\b(last|this|next|past)\s+(week|weekend|month|year)\b", re.I), "unit"),
    (re.compile(rf"\b(last|this|next|on)\s+({_WEEKDAY_RE})\b", re.I), "weekday"),
    (re.compile(rf"\b(last|this|next|in)\s+({_MONTH_RE})\b(?!\s+\d)", re.I), "month"),
    (re.compile(rf"\b(?:in\s+)?({_MONTH_RE})\s+(\d{{4}})\b", re.I), "month_year"),
    (re.compile(r"\b(?:in|during|since)\s+((?:19|20)\d{2})\b", re.I), "year"),
]


def _count(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBERS[word.lower()]


def _resolve(kind: str, m: re.Match[str], anchor: datetime) -> tuple[datetime, datetime] | None:
    if kind == "ago":
        return _shift(anchor, m.group(2).lower(), _count(m.group(1)))
    if kind == "day":
        offsets = {"yesterday": -1, "last night": -1, "tomorrow": 1}
        return _day(anchor, offsets.get(m.group(1).lower(), 0))
    if kind == "unit":
        return _resolve_unit(m.group(1).lower(), m.group(2).lower(), anchor)
    if kind == "weekday":
        return _resolve_weekday(m.group(1).lower(), _WEEKDAYS[m.group(2).lower()], anchor)
    if kind == "month":
        return _resolve_month(m.group(1).lower(), _MONTHS[m.group(2).lower()], anchor)
    if kind == "month_year":
        return _month(int(m.group(2)), _MONTHS[m.group(1).lower()])
    return _year(int(m.group(1)))


def _resolve_unit(which: str, unit: str, anchor: datetime) -> tuple[datetime, datetime]:
    step = {"last": -1, "past": -1, "this": 0, "next": 1}[which]
    if unit == "weekend":
        saturday = _week(anchor, step)[0] + timedelta(days=5)
        return saturday, saturday + timedelta(days=2)
    if unit == "week":
        return _week(anchor, step)
    if unit == "month":
        moved = anchor + relativedelta(months=step)
        return _month(moved.year, moved.month)
    return _year(anchor.year + step)


def _resolve_weekday(which: str, weekday: int, anchor: datetime) -> tuple[datetime, datetime]:
    delta = (anchor.weekday() - weekday) % 7
    if which == "next":
        return _day(anchor, (weekday - anchor.weekday()) % 7 or 7)
    if which == "last" or which == "on":
        return _day(anchor, -(delta or 7))
    return _day(anchor, -delta)


def _resolve_month(which: str, month: int, anchor: datetime) -> tuple[datetime, datetime]:
    if which == "next":
        year = anchor.year if month > anchor.month else anchor.year + 1
    elif which == "this":
        year = anchor.year
    else:  # "last May" / "in May": the most recent May before the anchor's month
        year = anchor.year if month < anchor.month else anchor.year - 1
    return _month(year, month)


def find_time_spans(text: str, anchor: datetime) -> list[TimeSpan]:
    """Relative time expressions in `text`, resolved against `anchor` (the turn's or query's time).

    >>> [s.label() for s in find_time_spans("I went there yesterday", parse_time("2023-05-08"))]
    ['7 May 2023']
    """
    spans: list[TimeSpan] = []
    taken: list[tuple[int, int]] = []
    for pattern, kind in _PATTERNS:
        for m in pattern.finditer(text):
            if any(m.start() < e and s < m.end() for s, e in taken):
                continue
            window = _resolve(kind, m, anchor)
            if window is not None:
                taken.append((m.start(), m.end()))
                spans.append(TimeSpan(m.group(0), *window))
    return spans


def query_time_range(query: str, now: datetime) -> tuple[datetime, datetime] | None:
    """The union of the time ranges a query mentions, or None."""
    spans = find_time_spans(query, now)
    if not spans:
        return None
    return min(s.start for s in spans), max(s.end for s in spans)
