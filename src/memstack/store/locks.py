"""Leases: a named lock in the store that one owner holds until it releases it or its lease
runs out, so that a process killed while holding one blocks the others for one lease at most.
Work that must never run twice at once across processes (background maintenance) takes one.

Every call is one statement in its own transaction; the expiry is compared on the database's
clock (`now_sql`), so processes on several hosts agree on it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

from .._errors import InvalidInputError


@dataclass(frozen=True)
class Lease:
    name: str
    owner: str
    expires_at: float  # seconds since the epoch


class LockRows:
    """Mixed into the SQL stores (they provide `conn`, `transaction` and `now_sql`, an SQL
    expression of the current time in seconds since the epoch)."""

    conn: Any
    now_sql: str
    transaction: Callable[[], AbstractContextManager[None]]

    def try_acquire(self, name: str, owner: str, seconds: float) -> bool:
        """Take the lease `name` for `seconds` if nobody holds it, its lease ran out, or
        `owner` holds it already (then it is extended). True when `owner` holds it now."""
        _check(name, owner, seconds)
        with self.transaction():
            rows = self.conn.execute(
                f"INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, {self.now_sql} + ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                f"WHERE locks.expires_at <= {self.now_sql} OR locks.owner = excluded.owner "
                "RETURNING owner", (name, owner, float(seconds))).fetchall()
        return bool(rows)

    def renew(self, name: str, owner: str, seconds: float) -> bool:
        """Extend `owner`'s lease to `seconds` from now. False when another owner took it
        (this one's lease had run out): the caller has lost it and must stop."""
        _check(name, owner, seconds)
        with self.transaction():
            rows = self.conn.execute(
                f"UPDATE locks SET expires_at = {self.now_sql} + ? WHERE name = ? AND owner = ? "
                "RETURNING name", (float(seconds), name, owner)).fetchall()
        return bool(rows)

    def release(self, name: str, owner: str) -> bool:
        """Give the lease up; False when `owner` did not hold it (any more)."""
        _check(name, owner, 1.0)
        with self.transaction():
            rows = self.conn.execute("DELETE FROM locks WHERE name = ? AND owner = ? "
                                     "RETURNING name", (name, owner)).fetchall()
        return bool(rows)

    def lease(self, name: str) -> Lease | None:
        """Who holds `name` now (None: nobody, or a lease that ran out)."""
        row = self.conn.execute(f"SELECT owner, expires_at FROM locks WHERE name = ? AND "
                                f"expires_at > {self.now_sql}", (name,)).fetchone()
        return Lease(name, row[0], float(row[1])) if row else None


def _check(name: str, owner: str, seconds: float) -> None:
    for what, value in (("lock name", name), ("lock owner", owner)):
        if not isinstance(value, str) or not value.strip() or len(value) > 200:
            raise InvalidInputError(f"a {what} is a non-empty string of at most 200 characters")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
            not 0 < seconds <= 7 * 86400:
        raise InvalidInputError("a lease lasts more than 0 seconds and at most a week")
