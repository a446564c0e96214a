"""Access statistics counted in memory and written at most once a second, so that a search is
not a write transaction (which readers in other processes would queue behind)."""

from __future__ import annotations

import threading
import time
from typing import Sequence

from .base import Store

FLUSH_SECONDS = 1.0


class UseCounter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._uses: dict[str, tuple[int, float]] = {}  # id -> (uses not written, last use)
        self._lock = threading.Lock()
        self._flushed = time.time()

    def touch(self, item_ids: Sequence[str]) -> None:
        now = time.time()
        with self._lock:
            for item_id in item_ids:
                count, _ = self._uses.get(item_id, (0, now))
                self._uses[item_id] = (count + 1, now)
            due = now - self._flushed > FLUSH_SECONDS
        if due:
            self.flush()

    def pending(self, item_id: str) -> tuple[int, float | None]:
        """Uses of an item not written yet, and the last one's time."""
        with self._lock:
            return self._uses.get(item_id, (0, None))

    def flush(self) -> None:
        with self._lock:
            uses, self._uses, self._flushed = self._uses, {}, time.time()
        try:
            self.store.touch(uses)
        except Exception:
            with self._lock:  # keep them for the next flush
                for item_id, (n, t) in uses.items():
                    count, last = self._uses.get(item_id, (0, t))
                    self._uses[item_id] = (count + n, max(last, t))
            raise
