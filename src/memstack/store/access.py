"""Rows of the server's access control: users, API keys (only the hash of a key's secret) and
cube grants. The rules (who may do what) live in server/auth.py; these are plain reads and
writes, each one statement, run inside the caller's transaction when there is one."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class UserRow:
    id: str
    role: str
    created_at: float


@dataclass(frozen=True)
class KeyRow:
    """A key as lists show it: never its hash."""

    id: str
    user_id: str
    cubes: list[str] | None  # the cubes the key is limited to; None: all the user's
    label: str | None
    created_at: float
    last_used: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class KeyLogin:
    """What checking a presented key needs: the stored hash, the owner and the owner's role."""

    hash: str
    user_id: str
    role: str
    cubes: list[str] | None
    revoked_at: float | None


@dataclass(frozen=True)
class GrantRow:
    user_id: str
    access: str
    granted_by: str
    granted_at: float


def _cubes(text: str | None) -> list[str] | None:
    return json.loads(text) if text else None


class AccessRows:
    """Users, API keys and grants, on the store's connection (a mixin of the SQL stores)."""

    conn: Any

    # users -----------------------------------------------------------------------------------
    def user_role(self, user_id: str) -> str | None:
        """The user's role, None for an unknown user."""
        row = self.conn.execute("SELECT role FROM users WHERE id = ?", (user_id,)).fetchone()
        return row[0] if row else None

    def insert_user(self, user_id: str, role: str) -> None:
        """Add a user, created now."""
        self.conn.execute("INSERT INTO users (id, role, created_at) VALUES (?, ?, ?)",
                          (user_id, role, time.time()))

    def set_user_role(self, user_id: str, role: str) -> None:
        """Change an existing user's role."""
        self.conn.execute("UPDATE users SET role = ? WHERE id = ?", (role, user_id))

    def user_rows(self) -> list[UserRow]:
        """Every user, by id."""
        rows = self.conn.execute("SELECT id, role, created_at FROM users ORDER BY id")
        return [UserRow(*r) for r in rows]

    # API keys --------------------------------------------------------------------------------
    def any_active_key(self) -> bool:
        """Whether at least one key is not revoked."""
        return self.conn.execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL "
                                 "LIMIT 1").fetchone() is not None

    def insert_key(self, key_id: str, user_id: str, secret_hash: str, cubes: list[str] | None,
                   label: str | None) -> None:
        """Add a key, created now; `cubes` None leaves it unrestricted."""
        self.conn.execute("INSERT INTO api_keys (id, user_id, hash, cubes, label, created_at) "
                          "VALUES (?, ?, ?, ?, ?, ?)",
                          (key_id, user_id, secret_hash,
                           json.dumps(cubes) if cubes is not None else None, label, time.time()))

    def key_rows(self, user_id: str | None = None) -> list[KeyRow]:
        """Every key (of one user when given), oldest first."""
        where, params = (" WHERE user_id = ?", (user_id,)) if user_id else ("", ())
        rows = self.conn.execute("SELECT id, user_id, cubes, label, created_at, last_used, "
                                 f"revoked_at FROM api_keys{where} ORDER BY created_at", params)
        return [KeyRow(r[0], r[1], _cubes(r[2]), *r[3:]) for r in rows]

    def key_owner(self, key_id: str) -> str | None:
        """The user a key belongs to, None for an unknown key."""
        row = self.conn.execute("SELECT user_id FROM api_keys WHERE id = ?",
                                (key_id,)).fetchone()
        return row[0] if row else None

    def revoke_key(self, key_id: str) -> None:
        """Mark a key revoked now (a key already revoked keeps its first time)."""
        self.conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND "
                          "revoked_at IS NULL", (time.time(), key_id))

    def key_login(self, key_id: str) -> KeyLogin | None:
        """A key with its owner's role, None for an unknown key."""
        row = self.conn.execute("SELECT k.hash, k.user_id, u.role, k.cubes, k.revoked_at "
                                "FROM api_keys k JOIN users u ON u.id = k.user_id "
                                "WHERE k.id = ?", (key_id,)).fetchone()
        return KeyLogin(row[0], row[1], row[2], _cubes(row[3]), row[4]) if row else None

    # grants ----------------------------------------------------------------------------------
    def readable_cube_ids(self, user_id: str | None, names: Sequence[str] | None) -> list[int]:
        """Ids of the cubes `user_id` owns or holds a grant on (None: every cube), within
        `names` when given: one statement, however many cubes there are."""
        where, params = [], []
        if user_id is not None:
            where.append("(c.owner = ? OR c.id IN (SELECT g.cube_id FROM grants g "
                         "WHERE g.user_id = ?))")
            params += [user_id, user_id]
        if names is not None:
            where.append(f"c.name IN ({', '.join('?' * len(names))})" if names else "false")
            params += list(names)
        rows = self.conn.execute("SELECT c.id FROM cubes c WHERE " + (" AND ".join(where) or
                                 "true") + " ORDER BY c.id", params)
        return [int(r[0]) for r in rows]

    def grant_access(self, cube_id: int, user_id: str) -> str | None:
        """The access ("read" or "write") granted to a user on a cube, None without a grant."""
        row = self.conn.execute("SELECT access FROM grants WHERE cube_id = ? AND user_id = ?",
                                (cube_id, user_id)).fetchone()
        return row[0] if row else None

    def delete_grant(self, cube_id: int, user_id: str) -> None:
        """Take away a user's grant on a cube (none is fine)."""
        self.conn.execute("DELETE FROM grants WHERE cube_id = ? AND user_id = ?",
                          (cube_id, user_id))

    def insert_grant(self, cube_id: int, user_id: str, access: str, granted_by: str) -> None:
        """Grant a user access to a cube, now (the user must have no grant on it yet)."""
        self.conn.execute("INSERT INTO grants (cube_id, user_id, access, granted_by, granted_at) "
                          "VALUES (?, ?, ?, ?, ?)",
                          (cube_id, user_id, access, granted_by, time.time()))

    def grant_rows(self, cube_id: int) -> list[GrantRow]:
        """Every grant on a cube, by user."""
        rows = self.conn.execute("SELECT user_id, access, granted_by, granted_at FROM grants "
                                 "WHERE cube_id = ? ORDER BY user_id", (cube_id,))
        return [GrantRow(*r) for r in rows]
