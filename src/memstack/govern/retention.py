"""Retention: items that expire, cubes that age out what nobody uses, and purges after a grace.

An item may carry `expires_at` (add(expires_at=...) or ttl=...): from that moment it leaves
normal search (the store's active selection excludes it at query time, store/sqlwhere.py),
while `as_of` searches for earlier times still see it. A cube may have a rule per kind ("*":
its kinds without a rule of their own, but never `core` profile blocks, which a rule must
name; no rule touches `session` items, whose turns are what they hold):

- `expire_after`: an item expires this long after it was recorded;
- `archive_unused`: an active item nobody read (a get or a search hit; the access statistics
  that make the KV scheduler's heat) for this long is archived;
- `purge_after`: an item archived or expired this long ago is purged with delete's purge
  (text out of rows, versions and indexes, KV blocks dropped, shards marked stale, facts
  derived from it deleted; a tombstone stays).

`apply` (run by `memstack maintain`, the server's background maintenance and `memstack
retention apply`) writes what the rules say: an expired item becomes `archived` with its
validity closed at its expiry (so `as_of` and `history` tell the truth about when it was
valid; history's reason is "expired"), an unused one `archived` ("unused"), and purges. Each
action is in the audit log (retention_expire, retention_archive, retention_purge,
retention_set), with the ids. An item's own expiry is purged only under a `purge_after` rule
of its cube and kind; without one it stays archived, out of search.

A run reads and writes one page of due items per transaction, so a delete or a read that
happens meanwhile is seen (an item read since is no longer due); the neighbours' context keys
of a turn that leaves search are rebuilt without it, as a delete does.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .._errors import ConfirmationRequiredError, InvalidInputError
from .._models import KINDS, Item, RetentionRule, utcnow
from .._time import parse_time
from ..store.selection import Selection

if TYPE_CHECKING:
    from ..store.base import CubeRow, Store

    Purge = Callable[..., int]  # Writer.purge(cube, ids, reason, action, into=)

ANY = "*"
RULE_KINDS = tuple(k for k in KINDS if k != "session")  # what a rule may name, with "*"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_PAGE = 500


def duration(value: Any, what: str) -> float | None:
    """Seconds from a number of seconds, a timedelta or text such as "90s", "12h", "30d",
    "2w" (None stays None).

    >>> duration("30d", "ttl"), duration(90, "ttl"), duration(None, "ttl")
    (2592000.0, 90.0, None)
    """
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (found := _DURATION.match(value.lower())):
        seconds = float(found[1]) * _UNITS[found[2] or "s"]
    else:
        raise InvalidInputError(f"{what} is a duration: seconds, or a number with s, m, h, d "
                                f"or w such as '30d'; got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 1e11:
        raise InvalidInputError(f"{what} must be more than 0 seconds (and finite), got "
                                f"{value!r}")
    return seconds


def expiry(expires_at: Any, ttl: Any, now: datetime | None = None) -> datetime | None:
    """When an added item expires: `expires_at` (a time after now) or now + `ttl`."""
    if expires_at is not None and ttl is not None:
        raise InvalidInputError("give expires_at or ttl, not both")
    now = now or utcnow()
    if ttl is not None:
        return now + timedelta(seconds=duration(ttl, "ttl") or 0)
    if expires_at is None:
        return None
    at = parse_time(expires_at, field="expires_at")
    if at <= now:
        raise InvalidInputError(f"expires_at {at.isoformat()} is not in the future; an item "
                                "that expired already would never be found")
    return at


def check_kind(kind: str) -> str:
    if kind != ANY and kind not in RULE_KINDS:
        raise InvalidInputError(f"a retention rule's kind is one of {', '.join(RULE_KINDS)} "
                                f"or '*' (the others), got {kind!r}")
    return kind


def kinds_of(rule: RetentionRule, rules: Sequence[RetentionRule]) -> list[str]:
    """The kinds a rule governs in its cube: its own, or for "*" the kinds no other rule of
    the cube names (never `core`: profile blocks go only under a rule that names them)."""
    if rule.kind != ANY:
        return [rule.kind]
    named = {r.kind for r in rules}
    return [k for k in RULE_KINDS if k not in named and k != "core"]


@dataclass
class RetentionReport:
    """What a run did (or, with dry_run, would do), by cube: item ids expired, archived and
    purged (purges include what was derived from them and a session's turns)."""

    at: float
    dry_run: bool = False
    expired: dict[str, list[str]] = field(default_factory=dict)
    archived: dict[str, list[str]] = field(default_factory=dict)
    purged: dict[str, list[str]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any((self.expired, self.archived, self.purged))

    def counts(self) -> dict[str, int]:
        return {name: sum(len(v) for v in getattr(self, name).values())
                for name in ("expired", "archived", "purged")}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "at": datetime.fromtimestamp(self.at, timezone.utc).isoformat(),
                "counts": self.counts()}


def report_ids(report: RetentionReport, cube: str) -> list[str]:
    """Every id a report expires, archives or purges in a cube."""
    return [i for part in (report.expired, report.archived, report.purged)
            for i in part.get(cube, [])]


class Retention:
    """Rules and their application for one store. `purge(cube, ids, reason, action, into=)`
    is delete's purge and `forget_context(turns)` rebuilds the context keys of archived
    turns' neighbours (write/writer.py), passed in so every index and tier is reached (None:
    rules only, no application)."""

    def __init__(self, store: "Store", purge: "Purge | None", actor: str,
                 forget_context: Callable[[list[tuple[int, Item]]], None] | None = None
                 ) -> None:
        self.store, self._purge, self.actor = store, purge, actor
        self._forget_context = forget_context

    # rules ----------------------------------------------------------------------------------------
    def rules(self, cube: "CubeRow | None" = None) -> list[RetentionRule]:
        return self.store.retention_rules(cube.id if cube is not None else None)

    def set(self, cube: "CubeRow", kind: str = ANY, *, expire_after: Any = None,
            archive_unused: Any = None, purge_after: Any = None, confirm: bool = False
            ) -> dict[str, Any]:
        """Write a cube's rule for a kind (every duration None: remove it). A rule set that
        would take every item of the cube out of search now needs `confirm`. Returns the
        rule and what the next run would do under it (a dry run)."""
        kind = check_kind(kind)
        values = {"expire_after": duration(expire_after, "expire_after"),
                  "archive_unused": duration(archive_unused, "archive_unused"),
                  "purge_after": duration(purge_after, "purge_after")}
        with self.store.transaction():
            self.store.set_retention(cube.id, kind, set_by=self.actor, **values)
            preview = self._run(utcnow().timestamp(), [cube], dry_run=True)
            everything = self._everything(cube, preview)
            if everything and not confirm:
                raise ConfirmationRequiredError(
                    f"these rules would take all {everything} items of cube {cube.name!r} "
                    "out of search at the next maintenance run (and purge them after the "
                    "grace period); pass confirm=True (--yes) if that is what you want")
            self.store.audit(self.actor, "retention_set", cube.name, [],
                             {"kind": kind, **values, "confirmed": bool(everything)})
        rule = next((r for r in self.rules(cube) if r.kind == kind), None)
        return {"rule": rule.to_dict() if rule else None, "next_run": preview.to_dict()}

    def would_remove_everything(self, cube: "CubeRow") -> int:
        """The number of the cube's active items when the next run under its rules would take
        every one of them out of search, else 0."""
        return self._everything(cube, self._run(utcnow().timestamp(), [cube], dry_run=True))

    def _everything(self, cube: "CubeRow", preview: RetentionReport) -> int:
        """The number of the cube's active items (sessions aside) when the preview takes
        every one of them out of search, else 0."""
        active = {i.id for _, i in self.store.select_items(
            Selection(cube_ids=(cube.id,), kinds=RULE_KINDS))}
        gone = set(report_ids(preview, cube.name))
        return len(active) if active and active <= gone else 0

    # application ----------------------------------------------------------------------------------
    def apply(self, *, now: float | None = None, cubes: Sequence["CubeRow"] | None = None,
              dry_run: bool = False) -> RetentionReport:
        """Expire, archive and purge what the rules say at `now` (default: now), in every
        cube (or these); with `dry_run`, only report it."""
        now = utcnow().timestamp() if now is None else now
        cubes = list(cubes) if cubes is not None else \
            [self.store.cube(c.name) for c in self.store.cubes()]
        return self._run(now, cubes, dry_run)

    def _run(self, now: float, cubes: Sequence["CubeRow"], dry_run: bool) -> RetentionReport:
        report = RetentionReport(now, dry_run)
        for cube in cubes:
            rules = self.store.retention_rules(cube.id)
            self._expire(cube, "expires", now, None, None, report)
            for rule in rules:
                if rule.expire_after:
                    self._expire(cube, "recorded", now - rule.expire_after,
                                 kinds_of(rule, rules), rule.expire_after,
                                 report)
            for rule in rules:
                if rule.archive_unused:
                    self._archive(cube, now - rule.archive_unused,
                                  kinds_of(rule, rules), report)
            for rule in rules:
                if rule.purge_after:
                    self._purge_due(cube, now - rule.purge_after,
                                    kinds_of(rule, rules), report)
        return report

    def _dry(self, cube: "CubeRow", due: str, cutoff: float, kinds: list[str] | None
             ) -> list[Item]:
        """Every item a rule reaches now, paged by rowid (a dry run writes nothing)."""
        out, after = [], 0
        while page := self.store.retention_due(cube.id, due, cutoff, kinds, after, _PAGE):
            out += [item for _, item in page]
            after = page[-1][0]
        return out

    def _expire(self, cube: "CubeRow", due: str, cutoff: float, kinds: list[str] | None,
                after: float | None, report: RetentionReport) -> None:
        def when(item: Item) -> datetime:
            if after is None or item.recorded_at is None:
                return item.expires_at or utcnow()
            return item.recorded_at + timedelta(seconds=after)
        self._change(cube, due, cutoff, kinds, report, report.expired, "expired",
                     "retention_expire", when)

    def _archive(self, cube: "CubeRow", cutoff: float, kinds: list[str],
                 report: RetentionReport) -> None:
        self._change(cube, "unused", cutoff, kinds, report, report.archived, "unused",
                     "retention_archive", None)

    def _change(self, cube: "CubeRow", due: str, cutoff: float, kinds: list[str] | None,
                report: RetentionReport, out: dict[str, list[str]], reason: str,
                action: str, expiry_of: Callable[[Item], datetime] | None) -> None:
        if report.dry_run:  # an item an earlier rule takes out already is listed there only
            seen = set(report_ids(report, cube.name))
            ids = [i.id for i in self._dry(cube, due, cutoff, kinds) if i.id not in seen]
            if ids:
                out.setdefault(cube.name, []).extend(ids)
            return
        while True:  # a page per transaction, read inside it: what changed meanwhile is seen
            with self.store.transaction():
                page = self.store.retention_due(cube.id, due, cutoff, kinds, 0, _PAGE)
                if not page:
                    return
                done = [self._archive_one(rowid, item, report.at, expiry_of)
                        for rowid, item in page]
                self.store.add_versions(done, reason, self.actor)
                if self._forget_context is not None:
                    self._forget_context(done)
                self.store.bump_generation(cube.id)
                ids = [item.id for _, item in done]
                self.store.audit(self.actor, action, cube.name, ids, {"count": len(ids)})
            out.setdefault(cube.name, []).extend(ids)

    def _archive_one(self, rowid: int, item: Item, now: float,
                     expiry_of: Callable[[Item], datetime] | None) -> tuple[int, Item]:
        """Archive one item at the run's time (its grace before a purge counts from then)."""
        fields: dict[str, Any] = {"status": "archived", "version": item.version + 1,
                                  "updated_at": datetime.fromtimestamp(now, timezone.utc)}
        if expiry_of is not None:  # expired: no longer valid from its expiry on
            at = expiry_of(item)
            fields["expires_at"] = at
            if item.valid_to is None or item.valid_to > at:
                fields["valid_to"] = at
        self.store.update_item(rowid, fields)
        return rowid, self.store.items_by_rowid([rowid])[rowid]

    def _purge_due(self, cube: "CubeRow", cutoff: float, kinds: list[str],
                   report: RetentionReport) -> None:
        if report.dry_run:  # what the preview expires or archives now waits for the grace
            ids = [i.id for i in self._dry(cube, "archived", cutoff, kinds)]
            if ids:
                report.purged.setdefault(cube.name, []).extend(ids)
            return
        assert self._purge is not None, "Retention without purge applies no rule"
        while page := self.store.retention_due(cube.id, "archived", cutoff, kinds, 0, _PAGE):
            purged: list[str] = []  # with the facts derived from them and sessions' turns
            self._purge(cube, [i.id for _, i in page], "retention", "retention_purge",
                        into=purged)
            report.purged.setdefault(cube.name, []).extend(purged)
