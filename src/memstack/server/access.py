"""One gate for every interface (REST, MCP): which cube a request means, and whether its caller
may read or write it. An item in a cube the caller cannot read is reported as missing."""

from __future__ import annotations

from .. import _errors as errors
from .._validate import name as _name
from .._memory import Memory
from .._models import Item
from ..store.base import CubeRow
from .auth import LOCAL_ADMIN, ForbiddenError, Keys, Principal


def default_cube(who: Principal) -> str:
    """The cube used when a request names none: "default" for the local admin, else the
    user's own cube "~<user>"."""
    return "default" if who is LOCAL_ADMIN else f"~{who.user}"


class Gate:
    def __init__(self, memory: Memory, keys: Keys) -> None:
        self.memory, self.keys = memory, keys

    def may_create(self, who: Principal, name: str) -> None:
        name = _name(name, "cube")  # as it will be stored: " ~ann" is "~ann"
        if name.startswith("~") and name != f"~{who.user}" and not who.admin:
            raise ForbiddenError(f"cube names starting with ~ are personal; yours is ~{who.user}")
        if who.cubes is not None and name not in who.cubes:
            raise ForbiddenError(f"this key is limited to cubes {list(who.cubes)}")

    def cube(self, who: Principal, name: str | None, need: str, *, create: bool = False
             ) -> CubeRow:
        """The cube `name` (or the caller's default), checked for `need` ("read"/"write");
        created for the caller when `create` and it does not exist yet."""
        own = name is None or name == default_cube(who)
        name = name or default_cube(who)
        try:
            row = self.memory.store.cube(name)
        except errors.CubeNotFoundError:
            if not (create or own):  # the caller's own cube exists from first use
                raise
            self.may_create(who, name)
            # another request or server process may be creating it at this moment
            self.memory.create_cube(name, owner=who.user, exist_ok=True)
            row = self.memory.store.cube(name)
        if row.owner == who.user:  # the database's wall, set as the request began, may predate
            self.memory.store.widen(row.id)  # the cube (made since, here or by another process)
        self.keys.require(who, row, need)
        return row

    def item(self, who: Principal, memory_id: str, need: str = "read",
             include_deleted: bool = False) -> Item:
        found = self.memory.store.item_by_id(memory_id)
        missing = errors.ItemNotFoundError(f"no memory with id {memory_id!r}")
        if found is None or (found[1].status == "deleted" and not include_deleted):
            raise missing
        row = self.memory.store.cube(found[1].cube)
        if self.keys.access(who, row) is None:  # as if it did not exist
            raise missing
        self.keys.require(who, row, need)
        return found[1]
