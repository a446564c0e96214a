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
import secrets
from dataclasses import dataclass
from typing import Literal, cast

from .._errors import AuthenticationError as AuthError
from .._errors import InvalidInputError, NotFoundError
from .._errors import PermissionDeniedError as ForbiddenError
from ..store.base import CubeRow, Store

Role = Literal["admin", "user"]
Access = Literal["read", "write"]
PREFIX = "msk_"


__all__ = ["LOCAL_ADMIN", "AuthError", "ForbiddenError", "Keys", "NewKey", "Principal"]


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
    """Users, keys and grants over a store (rules here, rows in store/access.py)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # users and keys ------------------------------------------------------------------------
    def any_key(self) -> bool:
        return self.store.any_active_key()

    def user(self, user_id: str) -> Role | None:
        return cast("Role | None", self.store.user_role(user_id))

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
            self.store.insert_user(user_id, role or "user")
        elif role is not None and role != current:
            self.store.set_user_role(user_id, role)
        return role or current or "user"

    def users(self) -> list[dict]:
        return [{"id": r.id, "role": r.role, "created_at": r.created_at}
                for r in self.store.user_rows()]

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
            self.store.insert_key(key_id, user_id, _hash(secret), cubes, label)
            self.store.audit(f"user:{user_id}", "create_key", None, [], {"key_id": key_id})
        return NewKey(key_id, f"{PREFIX}{key_id}_{secret}", user_id, role)

    def keys(self, user_id: str | None = None) -> list[dict]:
        return [{"id": r.id, "user": r.user_id, "cubes": r.cubes, "label": r.label,
                 "created_at": r.created_at, "last_used": r.last_used,
                 "revoked": r.revoked_at is not None} for r in self.store.key_rows(user_id)]

    def revoke(self, key_id: str, *, by: Principal | None = None) -> None:
        with self.store.transaction():
            owner = self.store.key_owner(key_id)
            if owner is None or (by is not None and not by.admin and owner != by.user):
                raise NotFoundError(f"no key {key_id!r}")
            self.store.revoke_key(key_id)
            self.store.audit(by.user if by else "local", "revoke_key", None, [],
                             {"key_id": key_id})

    def verify(self, token: str | None) -> Principal:
        """The principal of a presented key; AuthError for anything else."""
        if not token:
            raise AuthError("this server needs an API key: send 'Authorization: Bearer msk_...'")
        if not token.startswith(PREFIX) or token.count("_") < 2:
            raise AuthError("malformed API key")
        key_id, secret = token[len(PREFIX):].split("_", 1)
        login = self.store.key_login(key_id)
        if (login is None or not hmac.compare_digest(login.hash, _hash(secret))
                or login.revoked_at is not None):
            raise AuthError("unknown or revoked API key")
        cubes = tuple(login.cubes) if login.cubes is not None else None
        return Principal(login.user_id, cast(Role, login.role), key_id, cubes)

    # grants --------------------------------------------------------------------------------
    def access(self, who: Principal, cube: CubeRow) -> Access | None:
        """What `who` may do with `cube`: "write", "read" or None."""
        if who.cubes is not None and cube.name not in who.cubes:
            return None
        if who.admin or cube.owner == who.user:
            return "write"
        return cast("Access | None", self.store.grant_access(cube.id, who.user))

    def visible_cubes(self, who: Principal) -> list[int] | None:
        """Ids of the cubes `who` may read (None: every cube), for the database's own wall."""
        if who.admin and who.cubes is None:
            return None
        return self.store.readable_cube_ids(None if who.admin else who.user, who.cubes)

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
            self.store.delete_grant(cube.id, user_id)
            if access is not None:
                self.store.insert_grant(cube.id, user_id, access, who.user)
            self.store.audit(f"user:{who.user}", "grant", cube.name, [],
                             {"user": user_id, "access": access})

    def grants(self, cube: CubeRow) -> list[dict]:
        return [{"user": r.user_id, "access": r.access, "granted_by": r.granted_by,
                 "granted_at": r.granted_at} for r in self.store.grant_rows(cube.id)]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise InvalidInputError(f"{what} must be a non-empty string of at most 200 characters")
    return value.strip()
