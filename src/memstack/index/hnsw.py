"""One hnswlib graph per cube, persisted as `<db>.vec/cube-<id>.hnsw` plus a small JSON header.

Chosen by measurement (docs/benchmarks.md, "vector index"): among hnswlib, usearch and faiss HNSW,
hnswlib had the lowest search latency here, and it can scrub a removed vector: the slot is first
overwritten with a constant vector, then marked deleted, so the saved file holds no trace of it
(usearch keeps removed vectors' bytes in its saved file).

The header records the store generation the file matches. At open the index is reconciled with the
store: a missing or damaged file is rebuilt from the vectors in SQLite, a stale one gets the keys it
lacks and loses the keys the store no longer has. Several processes (a server's workers) save the
same files, each its own view, often at the same moment (all stop at once): a lock on the folder
makes each save and each load whole, so a header never lists the keys of another save's graph.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

VectorSource = Callable[[list[int] | None], Iterator[tuple[np.ndarray, np.ndarray]]]
"""Yields (keys (N,), vectors (N, dim)) batches from the store; None means every live key."""


class HnswIndex:
    def __init__(self, path: Path, dim: int, *, m: int = 16, ef_construction: int = 100,
                 ef_search: int = 96) -> None:
        self.path = Path(path)
        self.dim = dim
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search
        self.generation = -1
        self._index = None
        self._live: set[int] = set()
        self._dirty = False

    # lifecycle -----------------------------------------------------------------------------
    def open(self, store_keys: set[int], generation: int, source: VectorSource) -> None:
        """Load the saved file and make it agree with the store's live keys."""
        if not self._load():
            self._fresh(len(store_keys))
            self._live = set()
        self.sync(store_keys, generation, source)

    def sync(self, store_keys: set[int], generation: int, source: VectorSource) -> None:
        """Add the keys the index lacks and remove the ones the store no longer has."""
        missing = sorted(store_keys - self._live)
        extra = sorted(self._live - store_keys)
        if missing or extra:
            log.info("vector index %s: adding %d, removing %d to match the store",
                     self.path.name, len(missing), len(extra))
        self.remove(extra)
        for keys, vectors in source(missing) if missing else ():
            self.add(keys, vectors)
        self.generation = generation

    def _fresh(self, capacity: int) -> None:
        import hnswlib

        self._index = hnswlib.Index(space="ip", dim=self.dim)
        self._index.init_index(max_elements=max(1024, capacity * 2), M=self.m,
                               ef_construction=self.ef_construction, allow_replace_deleted=True)
        self._index.set_ef(self.ef_search)
        self._dirty = True

    def _load(self) -> bool:
        import hnswlib

        header = self.path.with_suffix(".json")
        if not (self.path.exists() and header.exists()):
            return False
        try:
            with _folder_lock(self.path.parent, exclusive=False):  # both files of one save
                meta = json.loads(header.read_text())
                if meta["dim"] != self.dim:
                    raise ValueError(f"dimension {meta['dim']} != {self.dim}")
                index = hnswlib.Index(space="ip", dim=self.dim)
                index.load_index(str(self.path), max_elements=meta["capacity"],
                                 allow_replace_deleted=True)
            live = set(meta["live"])
            if index.get_current_count() < len(live):
                raise ValueError("fewer vectors than the header lists")
        except Exception as exc:  # noqa: BLE001 - any damage means: rebuild from the store
            log.warning("vector index %s is damaged (%s); rebuilding from the store", self.path, exc)
            return False
        index.set_ef(self.ef_search)
        self._index, self._live, self._dirty = index, live, False
        return True

    def save(self) -> None:
        """Write atomically: a crash leaves either the old pair of files or the new one."""
        if self._index is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_lock(self.path.parent, exclusive=True):
            tmp = self.path.with_suffix(".hnsw.tmp")
            self._index.save_index(str(tmp))
            _fsync(tmp)
            header = {"dim": self.dim, "capacity": self._index.get_max_elements(),
                      "generation": self.generation, "live": sorted(self._live)}
            # header first with the new generation would lie if we crashed before the rename,
            # so the header is written after the index file is in place; a mismatch is
            # repaired at open.
            os.replace(tmp, self.path)
            tmp_header = self.path.with_suffix(".json.tmp")
            tmp_header.write_text(json.dumps(header))
            _fsync(tmp_header)
            os.replace(tmp_header, self.path.with_suffix(".json"))
        self._dirty = False

    # writes ----------------------------------------------------------------------------------
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        needed = len(self._live) + len(keys)
        if needed > self._index.get_max_elements():
            self._index.resize_index(max(needed, self._index.get_max_elements() * 2))
        self._index.add_items(vectors, keys, replace_deleted=True)
        self._live.update(int(k) for k in keys)
        self._dirty = True

    def remove(self, keys: Iterable[int]) -> None:
        keys = [int(k) for k in keys if int(k) in self._live]
        if not keys:
            return
        blank = np.zeros((len(keys), self.dim), dtype=np.float32)
        blank[:, 0] = 1.0
        # overwrite first, then delete: the slot keeps no bytes of the removed vector
        for row, key in enumerate(keys):
            try:
                self._index.add_items(blank[row:row + 1], [key])
                self._index.mark_deleted(key)
            except RuntimeError:  # already deleted in a file saved just before a crash
                log.debug("key %d was already deleted in %s", key, self.path.name)
        self._live.difference_update(keys)
        self._dirty = True

    # reads -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._live)

    @property
    def keys(self) -> set[int]:
        return set(self._live)

    def search(self, query: np.ndarray, k: int, allowed: set[int] | None = None
               ) -> list[tuple[int, float]]:
        """(key, cosine similarity) best first. `allowed` restricts keys (exact when small)."""
        pool = self._live if allowed is None else allowed & self._live
        k = min(k, len(pool))
        if k <= 0:
            return []
        self._index.set_ef(max(self.ef_search, k))
        labels, dist = self._index.knn_query(query.reshape(1, -1), k=k,
                                             filter=None if allowed is None else pool.__contains__)
        return [(int(key), 1.0 - float(d)) for key, d in zip(labels[0], dist[0])]


@contextlib.contextmanager
def _folder_lock(folder: Path, *, exclusive: bool) -> Iterator[None]:
    """The index folder's lock, against the other processes on this store, for one save
    (exclusive) or load (shared). Released if the process dies. Without fcntl (Windows), none."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # and with it the lock


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
