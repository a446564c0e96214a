"""Saving vector indexes off the write path.

The store holds every vector, so a saved index file only spares the next open the work of adding
the vectors written since (about 0.5 ms each). Saving a large graph takes a while (0.2 s for 50k
vectors here, more with a busy disk), so it is not done inside add(): a background thread saves
the indexes that changed once the writes have paused for QUIET_SECONDS, at most every
AUTOSAVE_SECONDS; under writes that never pause, after MAX_UNSAVED_SECONDS anyway (a call that
arrives during that save waits for it). close() and flush() save at once; so does a delete,
which must scrub the removed vectors from the file.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Callable, ContextManager, Iterable

from .hnsw import HnswIndex

log = logging.getLogger(__name__)

AUTOSAVE_SECONDS = 120.0
QUIET_SECONDS = 1.0
MAX_UNSAVED_SECONDS = 900.0


class IndexSaver:
    def __init__(self, lock: ContextManager, indexes: Callable[[], Iterable[HnswIndex]]) -> None:
        self._lock, self._indexes = lock, indexes
        self._saved = self._wrote = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def wrote(self) -> None:
        """A write changed an index: start the saver thread if it is not running."""
        self._wrote = time.monotonic()
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stop.is_set():
                    # the thread holds the saver weakly: an unclosed Memory is still collected
                    self._thread = threading.Thread(target=_run, args=(weakref.ref(self),
                                                                       self._stop),
                                                    name="memstack-index-saver", daemon=True)
                    self._thread.start()

    def due(self, now: float) -> bool:
        unsaved = now - self._saved
        quiet = now - self._wrote
        return self._wrote > self._saved and (
            (unsaved >= AUTOSAVE_SECONDS and quiet >= QUIET_SECONDS)
            or unsaved >= MAX_UNSAVED_SECONDS)

    def saved(self) -> None:
        """The indexes were just saved (by flush())."""
        self._saved = time.monotonic()

    def save(self) -> None:
        """Save every changed index now; the caller holds the lock."""
        self.saved()
        for index in list(self._indexes()):
            if index.generation != -1:  # a stale index catches up on its next use first
                index.save()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def save_if_due(self) -> None:
        if not self.due(time.monotonic()):
            return
        try:
            with self._lock:
                if not self._stop.is_set():
                    self.save()
        except Exception:  # noqa: BLE001 - the next open rebuilds from the store
            log.exception("saving the vector index failed; it is rebuilt from the store at the "
                          "next open")


def _run(saver_ref: "weakref.ref[IndexSaver]", stop: threading.Event) -> None:
    while not stop.wait(QUIET_SECONDS / 2):
        saver = saver_ref()
        if saver is None:
            return
        saver.save_if_due()
        del saver
