"""Users, API keys and cube grants, kept in the memstack database itself.

A key reads `msk_<id>_<secret>`. Only sha256(secret) is stored (keys are 256-bit random, so a
fast hash is enough; there is nothing to brute-force); the whole key is shown once, at creation.
Who may touch a cube:
- an admin: every cube;
- a user: the cubes they own (read-write), and those granted to them (read or read-write);
- a key created with `cubes=[...]` is further limited to those cubes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from .._errors import AuthenticationError as AuthError
from .._errors import InvalidInputError, NotFoundError
from .._errors import PermissionDeniedError as ForbiddenError
from ..store.sqlite import CubeRow, SQLiteStore

Role = Literal["admin", "user"]
Access = Literal["read", "write"]
PREFIX = "msk_"


__all__ = ["AuthError", "ForbiddenError", "Keys", "Principal", "LOCAL_ADMIN", "NewKey"]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user with a role, through one key (None in local open mode)."""

    user: str
    role: Role
    key_id: str | None = None
    cubes: tuple[str, ...] | None = None  # the key's cube restriction

    @property
    def admin(self) -> bool:
        return self.role == "admin"


LOCAL_ADMIN = Principal("local", "admin")


@dataclass(frozen=True)
class NewKey:
    key_id: str
    token: str  # shown once
    user: str
    role: Role


class Keys:
    """Users, keys and grants over a SQLiteStore."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    # users and keys ------------------------------------------------------------------------
    def any_key(self) -> bool:
        return self.store.conn.execute(
            "SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1").fetchone() is not None

    def user(self, user_id: str) -> Role | None:
        row = self.store.conn.execute("SELECT role FROM users WHERE id = ?", (user_id,)).fetchone()
        return row[0] if row else None

    def ensure_user(self, user_id: str, role: Role | None = None) -> Role:
        """Create a user (role "user" unless given); an existing user keeps or changes role."""
        _check_name(user_id, "user")
        if role is not None and role not in ("admin", "user"):
            raise InvalidInputError(f"role must be admin or user, got {role!r}")
        with self.store.transaction():
            return self._ensure_user(user_id, role)

    def _ensure_user(self, user_id: str, role: Role | None) -> Role:
        """ensure_user's write, inside the caller's transaction."""
        current = self.user(user_id)
        if current is None:
            self.store.conn.execute("INSERT INTO users (id, role, created_at) VALUES (?, ?, ?)",
                                    (user_id, role or "user", time.time()))
        elif role is not None and role != current:
            self.store.conn.execute("UPDATE users SET role = ? WHERE id = ?", (role, user_id))
        return role or current or "user"

    def users(self) -> list[dict]:
        rows = self.store.conn.execute("SELECT id, role, created_at FROM users ORDER BY id")
        return [{"id": r[0], "role": r[1], "created_at": r[2]} for r in rows]

    def create_key(self, user_id: str, *, role: Role | None = None,
                   cubes: list[str] | None = None, label: str | None = None) -> NewKey:
        """A new key for a user (created if new), in one transaction. Returns the only copy of
        the secret."""
        _check_name(user_id, "user")
        if role is not None and role not in ("admin", "user"):
            raise InvalidInputError(f"role must be admin or user, got {role!r}")
        if cubes is not None:
            cubes = [_check_name(c, "cube") for c in cubes]
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        with self.store.transaction():
            role = self._ensure_user(user_id, role)
            self.store.conn.execute(
                "INSERT INTO api_keys (id, user_id, hash, cubes, label, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (key_id, user_id, _hash(secret),
                                              json.dumps(cubes) if cubes is not None else None,
                                              label, time.time()))
            self.store.audit(f"user:{user_id}", "create_key", None, [], {"key_id": key_id})
        return NewKey(key_id, f"{PREFIX}{key_id}_{secret}", user_id, role)

    def keys(self, user_id: str | None = None) -> list[dict]:
        sql = "SELECT id, user_id, cubes, label, created_at, last_used, revoked_at FROM api_keys"
        rows = self.store.conn.execute(sql + (" WHERE user_id = ?" if user_id else "") +
                                       " ORDER BY created_at", (user_id,) if user_id else ())
        return [{"id": r[0], "user": r[1], "cubes": json.loads(r[2]) if r[2] else None,
                 "label": r[3], "created_at": r[4], "last_used": r[5],
                 "revoked": r[6] is not None} for r in rows]

    def revoke(self, key_id: str, *, by: Principal | None = None) -> None:
        with self.store.transaction():
            row = self.store.conn.execute("SELECT user_id FROM api_keys WHERE id = ?",
                                          (key_id,)).fetchone()
            if row is None or (by is not None and not by.admin and row[0] != by.user):
                raise NotFoundError(f"no key {key_id!r}")
            self.store.conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND "
                                    "revoked_at IS NULL", (time.time(), key_id))
            self.store.audit(by.user if by else "local", "revoke_key", None, [],
                             {"key_id": key_id})

    def verify(self, token: str | None) -> Principal:
        """The principal of a presented key; AuthError for anything else."""
        if not token:
            raise AuthError("this server needs an API key: send 'Authorization: Bearer msk_...'")
        if not token.startswith(PREFIX) or token.count("_") < 2:
            raise AuthError("malformed API key")
        key_id, secret = token[len(PREFIX):].split("_", 1)
        row = self.store.conn.execute(
            "SELECT k.hash, k.user_id, u.role, k.cubes, k.revoked_at FROM api_keys k "
            "JOIN users u ON u.id = k.user_id WHERE k.id = ?", (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], _hash(secret)) or row[4] is not None:
            raise AuthError("unknown or revoked API key")
        cubes = tuple(json.loads(row[3])) if row[3] else None
        return Principal(row[1], row[2], key_id, cubes)

    # grants --------------------------------------------------------------------------------
    def access(self, who: Principal, cube: CubeRow) -> Access | None:
        """What `who` may do with `cube`: "write", "read" or None."""
        if who.cubes is not None and cube.name not in who.cubes:
            return None
        if who.admin or cube.owner == who.user:
            return "write"
        row = self.store.conn.execute("SELECT access FROM grants WHERE cube_id = ? AND "
                                      "user_id = ?", (cube.id, who.user)).fetchone()
        return row[0] if row else None

    def require(self, who: Principal, cube: CubeRow, need: Access) -> None:
        have = self.access(who, cube)
        if have is None or (need == "write" and have != "write"):
            raise ForbiddenError(f"user {who.user!r} has no {need} access to cube {cube.name!r}"
                                 + (" (this key is limited to other cubes)"
                                    if who.cubes is not None and cube.name not in who.cubes
                                    else ""))

    def can_manage(self, who: Principal, cube: CubeRow) -> bool:
        return who.admin or cube.owner == who.user

    def grant(self, who: Principal, cube: CubeRow, user_id: str, access: Access | None) -> None:
        """Give `user_id` read or write access to `cube` (None takes it away). Owner or admin."""
        if not self.can_manage(who, cube):
            raise ForbiddenError(f"only the owner of cube {cube.name!r} or an admin can grant")
        if access not in (None, "read", "write"):
            raise InvalidInputError(f"access must be read or write, got {access!r}")
        if self.user(user_id) is None:
            raise NotFoundError(f"no user {user_id!r}")
        with self.store.transaction():
            self.store.conn.execute("DELETE FROM grants WHERE cube_id = ? AND user_id = ?",
                                    (cube.id, user_id))
            if access is not None:
                self.store.conn.execute(
                    "INSERT INTO grants (cube_id, user_id, access, granted_by, granted_at) "
                    "VALUES (?, ?, ?, ?, ?)", (cube.id, user_id, access, who.user, time.time()))
            self.store.audit(f"user:{who.user}", "grant", cube.name, [],
                             {"user": user_id, "access": access})

    def grants(self, cube: CubeRow) -> list[dict]:
        rows = self.store.conn.execute("SELECT user_id, access, granted_by, granted_at FROM grants "
                                       "WHERE cube_id = ? ORDER BY user_id", (cube.id,))
        return [{"user": r[0], "access": r[1], "granted_by": r[2], "granted_at": r[3]}
                for r in rows]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise InvalidInputError(f"{what} must be a non-empty string of at most 200 characters")
    return value.strip()
