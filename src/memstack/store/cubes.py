"""Cubes by name for the services: created on first write, checked against the embedder."""

from __future__ import annotations

from typing import Sequence

from .._errors import CubeNotFoundError, EmbeddingMismatchError
from .._validate import name as _name
from .base import CubeRow, Store


class Cubes:
    """Looks cubes up in a store for one embedder (`model`, `dim`) and default cube name."""

    def __init__(self, store: Store, model: str, dim: int, default: str) -> None:
        self.store, self.model, self.dim, self.default = store, model, dim, default

    def get(self, name: str | None, *, create: bool = False, owner: str | None = None,
            check_model: bool = True) -> CubeRow:
        """A cube by name (None: the default). `check_model` raises EmbeddingMismatchError when
        its vectors come from another embedder."""
        name = _name(name or self.default, "cube")
        try:
            row = self.store.cube(name)
        except CubeNotFoundError:
            if not create:
                raise
            row = self.store.create_cube(name, owner, self.model, self.dim)
        if check_model and (row.embed_model, row.embed_dim) != (self.model, self.dim):
            raise EmbeddingMismatchError(
                f"cube {name!r} was embedded with {row.embed_model} ({row.embed_dim} dims) but "
                f"this Memory uses {self.model} ({self.dim} dims). Open it with "
                f"the same embedder, or convert it: memstack --cube {name} reembed")
        return row

    def for_reading(self, cube: str | Sequence[str] | None) -> list[CubeRow]:
        """The cubes a read names (one, several, or the default); none yet is no error when
        the default is meant."""
        if cube is None:
            try:
                return [self.get(None)]
            except CubeNotFoundError:
                return []  # nothing stored yet
        names = [cube] if isinstance(cube, str) else list(cube)
        return [self.get(n) for n in names]
