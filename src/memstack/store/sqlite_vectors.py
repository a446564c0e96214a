"""The SQLite store's vector side: one HNSW index file per cube beside the database.

The database holds every vector (keys.vec); an index file is a cache of them that can always be
rebuilt. Writes reach the indexes when their transaction commits (`IndexChanges`), stamped with
the cube's generation; an index that missed a write (another process wrote) catches up from the
database at its next use. Indexes are saved off the write path (index/saver.py) except after a
purge, which must scrub the removed vectors from the files at once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..index import HnswIndex
from ..index.saver import IndexSaver
from .base import Ranked
from .selection import Selection

EXACT_LIMIT = 20_000  # a scope with fewer keys is searched exactly (a matrix product)


@dataclass
class IndexChanges:
    """What a transaction did to the vectors of one cube, applied when it commits."""

    added: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    generation: int | None = None


class CubeIndexes:
    """The HNSW index of each cube, opened lazily and kept in step with the database."""

    def __init__(self, folder: Path, lock: Any, cube: Callable[[int], tuple[int, int]],
                 live_keys: Callable[[int], set[int]],
                 vectors: Callable[[int, list[int] | None], Iterator[tuple[np.ndarray,
                                                                         np.ndarray]]]) -> None:
        self.folder = folder
        self._cube, self._live_keys, self._vectors = cube, live_keys, vectors
        self._indexes: dict[int, HnswIndex] = {}
        self.saver = IndexSaver(lock, lambda: list(self._indexes.values()))

    def get(self, cube_id: int) -> HnswIndex:
        """The cube's index, caught up with the database; the caller holds the store lock."""
        dim, generation = self._cube(cube_id)
        index = self._indexes.get(cube_id)
        if index is None:
            index = HnswIndex(self.folder / f"cube-{cube_id}.hnsw", dim)
            index.open(self._live_keys(cube_id), generation,
                       lambda keys: self._vectors(cube_id, keys))
            self._indexes[cube_id] = index
        elif index.generation != generation:  # another process wrote: catch up
            index.sync(self._live_keys(cube_id), generation,
                       lambda keys: self._vectors(cube_id, keys))
        return index

    def apply(self, cube_id: int, changes: IndexChanges, *, save: bool) -> None:
        """Apply a committed write (the database has it already); the caller holds the lock."""
        index = self._indexes.get(cube_id)
        if index is None:
            if save:  # open it from the database, which no longer has the removed vectors
                self.get(cube_id).save()
            return
        if changes.generation is None or index.generation != changes.generation - 1:
            index.generation = -1  # someone else wrote in between: resync on next use
        try:
            index.remove(changes.removed)
            for keys, vectors in changes.added:
                index.add(keys, vectors)
        except Exception:
            index.generation = -1
            raise
        if index.generation != -1:
            index.generation = changes.generation
        if not save:
            self.saver.wrote()  # saved later, off the write path
            return
        if index.generation == -1:
            index = self.get(cube_id)
        index.save()

    def drop(self, cube_id: int) -> None:
        """Forget a cube's index and delete its files (it is rebuilt from the database)."""
        self._indexes.pop(cube_id, None)
        for suffix in (".hnsw", ".json"):
            (self.folder / f"cube-{cube_id}{suffix}").unlink(missing_ok=True)

    def save_all(self) -> None:
        for index in self._indexes.values():
            index.save()
        self.saver.saved()

    def close(self) -> None:
        self.saver.stop()
        for index in self._indexes.values():
            index.save()


def candidates(indexes: CubeIndexes, store: Any, qvec: np.ndarray, sel: Selection, n: int
               ) -> Ranked:
    """Best vector similarity per selected item, best first, for own and context keys. A
    selection narrower than its cubes is searched within its keys only: exactly when they are
    few (a matrix product beats a filtered graph walk), else by filtered ANN."""
    found: list[tuple[int, bool, float]] = []
    for cube_id in sel.cube_ids:
        index = indexes.get(cube_id)
        hits: list[tuple[int, float]] = []
        items: list[tuple[int, bool, float]] = []
        if not sel.narrow:
            hits = index.search(qvec, min(len(index), 2 * n))
            items = _allowed(store, hits, sel)
        if len({r for r, _, _ in items}) < n and len(hits) < len(index):
            one = Selection(**{**sel.__dict__, "cube_ids": (cube_id,)})
            hits = _exact(store, qvec, one, 2 * n)
            if hits is None:
                hits = index.search(qvec, 2 * n, allowed=store.scoped_keys(one))
            items = _allowed(store, hits, one)
        found += items
    out: Ranked = {}
    for ctx in (False, True):
        best: dict[int, float] = {}
        for rowid, is_ctx, sim in found:
            if is_ctx == ctx:
                best[rowid] = max(sim, best.get(rowid, -1.0))
        out[ctx] = sorted(best.items(), key=lambda kv: -kv[1])[:n]
    return out


def _exact(store: Any, qvec: np.ndarray, sel: Selection, k: int
           ) -> list[tuple[int, float]] | None:
    scoped = store.scoped_vectors(sel, EXACT_LIMIT)
    if scoped is None:
        return None
    keys, vectors = scoped
    if not len(keys):
        return []
    sims = _similarities(vectors, qvec.astype(np.float32))
    top = np.argsort(-sims)[:k] if len(sims) <= k else np.argpartition(-sims, k)[:k]
    top = top[np.argsort(-sims[top])]
    return [(int(keys[i]), float(sims[i])) for i in top]


def _similarities(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """vectors @ query. Through torch when it is loaded (the local embedder loads it): numpy's
    BLAS threads would spin after the product and slow the next query embedding (measured)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return vectors @ query
    with torch.inference_mode():
        return (torch.from_numpy(vectors) @ torch.from_numpy(query)).numpy()


def _allowed(store: Any, hits: Sequence[tuple[int, float]], sel: Selection
             ) -> list[tuple[int, bool, float]]:
    if not hits:
        return []
    owners = store.key_items([k for k, _ in hits])
    allowed = store.allowed([item for item, _ in owners.values()], sel)
    return [(owners[key][0], owners[key][1], sim) for key, sim in hits
            if key in owners and owners[key][0] in allowed]
