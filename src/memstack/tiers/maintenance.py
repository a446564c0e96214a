"""Maintenance, on demand or in the background: retention (expiry, archiving, purges:
govern/retention.py), duplicates merged (learn/dedupe.py), then the derived tiers (the KV scheduler of the activation tier and the
retraining of stale shards of the parametric tier), within budgets. Without a model a run does
retention only.

A run takes the store's lease "maintenance" (store/locks.py), so it never runs twice at once,
whichever process (server worker, `memstack maintain`) starts it; a heartbeat renews the lease
while the run lasts, and a killed process's lease runs out by itself. A run does its work in
units, the KV scheduler first and then one stale shard at a time, and starts no new unit once
its CPU budget is spent, its lease was lost or it is asked to stop; what is left waits for the
next run. Retention and duplicate merging need no model and run in every run, first. An error in a unit is logged and recorded, and the run goes on with the next one.

In the background (`loop`, `start`) a run starts every `every` seconds, but only inside the
daily window (UTC) when one is set and only when there was no request for `quiet` seconds
(`last_activity`, given by the server). Progress and results go to the audit log (actor
"maintenance": maintain_kv, maintain_shard, maintain_error, and maintain for the run; a run
that found nothing to do writes nothing; retention and dedupe write their own entries) and to `status()`
(the server's /v1/health).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Sequence

from .._errors import InvalidInputError, LockHeldError, MemstackError

if TYPE_CHECKING:
    from ..store.base import Store
    from ..store.shards import ShardRow
    from ..govern.retention import RetentionReport
    from ..learn.dedupe import DedupeReport
    from .activation.tier import ActivationTier
    from .parametric.tier import ParametricTier

    Tiers = Callable[[], tuple[ActivationTier, ParametricTier]]

LOCK = "maintenance"
ACTOR = "maintenance"
log = logging.getLogger("memstack.maintenance")


@dataclass(frozen=True)
class MaintenanceSettings:
    """`every`: seconds between the starts of runs in the background (0: no background runs).
    `quiet`: a run starts only after this many seconds without a request. `window`: "HH:MM-HH:MM"
    (UTC; may cross midnight), runs start only inside it. `cpu_seconds`: a run starts no new
    unit once it used this much CPU time (the process's, so requests served meanwhile count:
    the budget errs on the safe side). `budget_bytes`: the KV blocks' budget (None: the
    tier's). `lease_seconds`: how long the lock outlives a process that died holding it."""

    every: float = 3600.0
    quiet: float = 0.0
    window: str | None = None
    cpu_seconds: float | None = None
    budget_bytes: int | None = None
    lease_seconds: float = 300.0

    def check(self) -> "MaintenanceSettings":
        for name in ("every", "quiet", "cpu_seconds", "budget_bytes", "lease_seconds"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, float)) or value < 0):
                raise InvalidInputError(f"maintenance {name} is a number >= 0, got {value!r}")
        if self.cpu_seconds == 0 or self.lease_seconds < 1:
            raise InvalidInputError("maintenance cpu_seconds is > 0 (None: no budget) and "
                                    "lease_seconds >= 1")
        if self.window is not None:
            parse_window(self.window)
        return self


def parse_window(text: str) -> tuple[int, int]:
    """A daily window "HH:MM-HH:MM" (UTC) as minutes after midnight of its start and end.

    >>> parse_window("22:30-04:00")
    (1350, 240)
    """
    try:
        start, end = (_minutes(part) for part in text.split("-"))
    except (ValueError, AttributeError):
        raise InvalidInputError(f"a maintenance window is HH:MM-HH:MM in UTC, such as "
                                f"01:00-05:00; got {text!r}") from None
    if start == end:
        raise InvalidInputError(f"the maintenance window {text!r} is empty; leave it out to "
                                "allow any time")
    return start, end


def _minutes(part: str) -> int:
    hours, minutes = part.strip().split(":")
    if not (hours.isdigit() and minutes.isdigit() and len(minutes) == 2 and
            int(hours) < 24 and int(minutes) < 60):
        raise ValueError(part)
    return int(hours) * 60 + int(minutes)


def in_window(window: tuple[int, int], now: float) -> bool:
    start, end = window
    at = _minute_of_day(now)
    return start <= at < end if start < end else at >= start or at < end


def window_opens(window: tuple[int, int], now: float) -> float:
    """When the window next opens after `now` (epoch seconds)."""
    wait = (window[0] - _minute_of_day(now)) % 1440
    return (now - now % 60) + wait * 60 if wait else now + 86400 - now % 60


def _minute_of_day(now: float) -> int:
    at = datetime.fromtimestamp(now, timezone.utc)
    return at.hour * 60 + at.minute


def hold(settings: MaintenanceSettings, now: float, last_activity: float | None
         ) -> tuple[str, float] | None:
    """Why a run may not start at `now`, and when to look again; None when it may."""
    if settings.window is not None:
        window = parse_window(settings.window)
        if not in_window(window, now):
            return f"outside the window {settings.window} UTC", window_opens(window, now)
    if settings.quiet and last_activity is not None and now - last_activity < settings.quiet:
        return (f"waiting for {settings.quiet:g} s without a request",
                last_activity + settings.quiet)
    return None


class CpuBudget:
    """CPU seconds used since it was made, against a budget (None: no limit)."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.process_time
                 ) -> None:
        self.seconds, self._clock, self._start = seconds, clock, clock()

    @property
    def used(self) -> float:
        return self._clock() - self._start

    def spent(self) -> bool:
        return self.seconds is not None and self.used >= self.seconds


@dataclass
class MaintenanceReport:
    """One run: the KV scheduler's report, the shards retrained or dropped, the stale shards
    left for the next run, errors, and why it stopped early (None: it did everything)."""

    started_at: float
    owner: str
    ended_at: float | None = None
    retention: dict[str, Any] | None = None
    dedupe: dict[str, Any] | None = None
    kv: dict[str, Any] | None = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stopped: str | None = None
    cpu_seconds: float = 0.0

    @property
    def changed(self) -> bool:
        kv, kept = self.kv or {}, (self.retention or {}).get("counts", {})
        merged = (self.dedupe or {}).get("counts", {}).get("merged")
        return bool(kv.get("built") or kv.get("evicted") or self.shards or any(kept.values())
                    or merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """Counts and times, without ids (for /v1/health, which anyone may read)."""
        kv, kept = self.kv or {}, (self.retention or {}).get("counts", {})
        return {"started_at": _iso(self.started_at), "ended_at": _iso(self.ended_at),
                "did": {**{f"items_{name}": n for name, n in kept.items()},
                        "items_deduplicated": (self.dedupe or {}).get("counts", {}).get(
                            "merged", 0),
                        "kv_built": len(kv.get("built", [])),
                        "kv_evicted": len(kv.get("evicted", [])),
                        "kv_kept": len(kv.get("kept", [])), "kv_bytes": kv.get("bytes", 0),
                        "shards_retrained": sum(1 for s in self.shards if s["retrained"]),
                        "shards_dropped": sum(1 for s in self.shards if not s["retrained"]),
                        "shards_left": len(self.left)},
                "errors": len(self.errors), "stopped": self.stopped,
                "cpu_seconds": round(self.cpu_seconds, 2)}


class Maintenance:
    """Runs maintenance for one store and model: `run()` once now, or `start()` a background
    thread (the server) / `loop()` in the foreground (`memstack maintain --watch`).

    >>> m.maintenance(model="smollm2").run().shards
    [{'stale': 'shard_...', 'changed_items': [...], 'retrained': 'shard_...'}]
    """

    def __init__(self, store: "Store", tiers: "Tiers | None",
                 settings: MaintenanceSettings = MaintenanceSettings(), *,
                 last_activity: Callable[[], float | None] = lambda: None,
                 clock: Callable[[], float] = time.time,
                 cpu: Callable[[], float] = time.process_time,
                 retention: "Callable[[], RetentionReport] | None" = None,
                 dedupe: "Callable[[], DedupeReport] | None" = None) -> None:
        """`tiers` gives the activation and parametric tiers of the model (called at each run,
        so the model loads in the run, not before; None: no model, no tier work).
        `retention` applies the retention rules (first in each run), `dedupe` merges
        duplicates (after it). `clock` and `cpu` are for tests."""
        self.store, self._tiers, self.settings = store, tiers, settings.check()
        self._retention, self._dedupe = retention, dedupe
        self._last_activity, self._clock, self._cpu = last_activity, clock, cpu
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.last: MaintenanceReport | None = None
        self.runs, self.failed = 0, 0
        self._running = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._looping = False
        self._next: float | None = None  # the earliest start of the next run (the interval)
        self._expected: float | None = None  # when the loop looks next, for the status
        self._waiting: str | None = None
        self._skipped: str | None = None  # why the loop's last turn did not run
        # held while a unit runs: the server's turn on the model it shares with requests
        self.guard: ContextManager[Any] = contextlib.nullcontext()

    # one run -----------------------------------------------------------------------------------
    def run(self) -> MaintenanceReport:
        """One run now, under the lease; LockHeldError when another process holds it."""
        if not self._running.acquire(blocking=False):
            raise LockHeldError("a maintenance run is in progress in this process already")
        try:
            return self._leased()
        finally:
            self._running.release()

    def _leased(self) -> MaintenanceReport:
        with self._lease() as lost:
            report = MaintenanceReport(self._clock(), self.owner)
            budget = CpuBudget(self.settings.cpu_seconds, self._cpu)
            try:
                self._work(report, budget, lost)
            finally:
                report.cpu_seconds, report.ended_at = budget.used, self._clock()
                self.last, self.runs = report, self.runs + 1
                self.failed += bool(report.errors)
                if report.changed or report.errors or report.left:
                    self._audit("maintain", report.to_dict())
            return report

    def _work(self, report: MaintenanceReport, budget: CpuBudget, lost: threading.Event
              ) -> None:
        retention = self._retention
        if retention is not None:  # needs no model: not under the model's turn
            self._unit(report, "retention",
                       lambda: setattr(report, "retention", retention().to_dict()),
                       guarded=False)
        dedupe = self._dedupe
        if dedupe is not None:  # after retention: what expired is not merged into
            self._unit(report, "merging duplicates",
                       lambda: setattr(report, "dedupe", dedupe().to_dict()), guarded=False)
        if self._tiers is None:
            self._unit(report, "dropping shards that hold deleted items",
                       lambda: self._drop_deleted(report), guarded=False)
            return
        try:
            activation, parametric = self._tiers()
        except Exception as exc:  # a model that cannot load: recorded, the next run tries again
            self._failed(report, "loading the model", exc)
            return
        self._unit(report, "the KV scheduler", lambda: self._kv(activation, report))
        for row in self._stale(parametric, report):
            report.stopped = report.stopped or self._why_stop(budget, lost)
            if report.stopped:
                report.left.append(row.id)
                continue
            self._unit(report, f"retraining {row.id}",
                       lambda row=row: self._shard(parametric, row, report))

    def _why_stop(self, budget: CpuBudget, lost: threading.Event) -> str | None:
        if budget.spent():
            return f"the CPU budget ({self.settings.cpu_seconds:g} s) is spent"
        if lost.is_set():
            return "the lease was lost (another process took it over)"
        if self._stop.is_set():
            return "asked to stop"
        return None

    def _stale(self, parametric: "ParametricTier", report: MaintenanceReport
               ) -> list["ShardRow"]:
        try:
            return parametric.stale()
        except Exception as exc:
            self._failed(report, "listing stale shards", exc)
            return []

    def _unit(self, report: MaintenanceReport, what: str, work: Callable[[], None],
              guarded: bool = True) -> None:
        try:
            with self.guard if guarded else contextlib.nullcontext():
                work()
        except Exception as exc:  # never the end of the run, nor of the server
            self._failed(report, what, exc)

    def _kv(self, activation: "ActivationTier", report: MaintenanceReport) -> None:
        report.kv = activation.schedule().to_dict()
        if report.kv["built"] or report.kv["evicted"]:
            self._audit("maintain_kv", report.kv)

    def _shard(self, parametric: "ParametricTier", row: "ShardRow",
               report: MaintenanceReport) -> None:
        try:
            done = parametric.retrain(row, progress=self._between_steps)
        except _Stopped:  # the shard stays stale; the next run retrains it
            report.stopped = "asked to stop"
            report.left.append(row.id)
            return
        report.shards.append(done)
        self._audit("maintain_shard", done, done["changed_items"])

    def _drop_deleted(self, report: MaintenanceReport) -> None:
        """Without a model no shard is retrained, but one whose weights hold a deleted item
        (a delete or a retention purge since it was trained) is dropped now: what was deleted
        must leave every tier."""
        for row in self.store.shards("stale"):
            changed = self.store.items_by_id(row.changed_items)
            if all(i in changed and changed[i].status != "deleted" for i in row.changed_items):
                continue
            with self.store.transaction():
                self.store.drop_shard(row.id)
            done = {"stale": row.id, "changed_items": row.changed_items, "retrained": None,
                    "why": "no model to retrain it; it held deleted items"}
            report.shards.append(done)
            self._audit("maintain_shard", done, row.changed_items)

    def _between_steps(self, done: int, total: int, loss: float) -> None:
        """After each optimizer step of a retrain: a stop ends it there (so a server that shuts
        down releases the lease at once), and a request waiting for the model goes first."""
        if self._stop.is_set():
            raise _Stopped
        pause = getattr(self.guard, "pause", None)
        if pause is not None:
            pause()

    def _failed(self, report: MaintenanceReport, what: str, exc: Exception) -> None:
        log.error("maintenance: %s failed", what, exc_info=exc)
        message = f"{what}: {type(exc).__name__}: {exc}"
        report.errors.append(message)
        self._audit("maintain_error", {"step": what, "error": message})

    def _audit(self, action: str, detail: dict[str, Any], item_ids: Sequence[str] = ()
               ) -> None:
        try:
            with self.store.transaction():
                self.store.audit(ACTOR, action, None, list(item_ids),
                                 {**detail, "owner": self.owner})
        except MemstackError as exc:  # the store is down: the log still has it
            log.error("maintenance: could not write %s to the audit log: %s", action, exc)

    @contextlib.contextmanager
    def _lease(self) -> Iterator[threading.Event]:
        """Hold the lease while the block runs, renewed by a heartbeat; the event is set when
        the lease is lost (another process took it over after it ran out)."""
        store, seconds = self.store, self.settings.lease_seconds
        if not store.try_acquire(LOCK, self.owner, seconds):
            held = store.lease(LOCK)
            who = f"{held.owner} until {_iso(held.expires_at)}" if held else "another process"
            raise LockHeldError(f"maintenance is running elsewhere (the lease is held by {who});"
                                " try again later")
        lost, done = threading.Event(), threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(lost, done), daemon=True,
                                name="memstack-maintenance-lease")
        beat.start()
        try:
            yield lost
        finally:
            done.set()
            beat.join()
            with contextlib.suppress(MemstackError):
                store.release(LOCK, self.owner)

    def _heartbeat(self, lost: threading.Event, done: threading.Event) -> None:
        seconds = self.settings.lease_seconds
        while not done.wait(seconds / 3):
            try:
                if not self.store.renew(LOCK, self.owner, seconds):
                    lost.set()
                    return
            except Exception as exc:  # noqa: BLE001 (a raw driver error too): the next beat tries again
                log.warning("maintenance: could not renew the lease: %s", exc)

    # in the background ---------------------------------------------------------------------------
    def loop(self, stop: threading.Event | None = None, *, max_runs: int | None = None,
             on_run: Callable[[MaintenanceReport | None, str | None], None] = lambda r, e: None
             ) -> None:
        """Run every `every` seconds, within the window and the quiet time, until `stop` is set
        (or after `max_runs` attempts). `on_run(report, error)` follows each attempt."""
        self._stop = stop = stop or self._stop
        attempts, self._looping = 0, True
        try:
            while not stop.is_set() and (max_runs is None or attempts < max_runs):
                wait = self._due(self._clock())
                if wait > 0:
                    stop.wait(min(wait, 60.0))
                    continue
                attempts += 1
                on_run(*self._attempt())
        finally:
            self._looping = False

    def _due(self, now: float) -> float:
        """Seconds until a run may start (0: now); sets what the status says it waits for."""
        if self._next is not None and now < self._next:
            self._waiting, self._expected = None, self._next
            return self._next - now
        held = hold(self.settings, now, self._last_activity())
        self._waiting, self._expected = (held[0], held[1]) if held else (None, now)
        return max(1.0, held[1] - now) if held else 0.0

    def _attempt(self) -> tuple[MaintenanceReport | None, str | None]:
        started = self._clock()
        self._next = started + max(self.settings.every, 1.0)
        try:
            report, self._skipped = self.run(), None
            return report, None
        except LockHeldError as exc:
            log.info("maintenance: %s", exc)
            self._skipped = str(exc)
            return None, str(exc)
        except Exception as exc:  # the store is down: the next attempt tries again
            log.error("maintenance: the run failed", exc_info=exc)
            self.failed += 1
            return None, f"{type(exc).__name__}: {exc}"

    def start(self, *, delay: bool = False) -> None:
        """Run `loop` in a daemon thread (when `every` > 0); with `delay`, the first run one
        interval from now (a server that starts is busy enough)."""
        if self.settings.every <= 0 or self._thread is not None:
            return
        if delay:
            self._next = self._expected = self._clock() + self.settings.every
        self._looping = True  # the status says so from now on
        self._thread = threading.Thread(target=self.loop, name="memstack-maintenance",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background loop; a run in progress starts no new unit and ends with the
        one it is in (the thread is a daemon: waiting for it ends after `timeout`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        """For /v1/health: enabled, running, the last run (start, end, what it did, errors),
        the next run and what it waits for."""
        running = self._running.locked()
        return {"enabled": self.settings.every > 0 and self._looping,
                "tiers": self._tiers is not None,
                "running": running, "owner": self.owner,
                "every_seconds": self.settings.every, "quiet_seconds": self.settings.quiet,
                "window": self.settings.window, "cpu_seconds": self.settings.cpu_seconds,
                "runs": self.runs, "failed_runs": self.failed,
                "last_run": self.last.summary() if self.last else None,
                "next_run": None if running or not self._looping else _iso(self._expected),
                "waiting": None if running else self._waiting, "skipped": self._skipped}


class _Stopped(Exception):
    """A retrain interrupted between two steps because the run was asked to stop."""


def _iso(at: float | None) -> str | None:
    return datetime.fromtimestamp(at, timezone.utc).isoformat() if at is not None else None
