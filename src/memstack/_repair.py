"""Data repairs that a schema migration cannot do in SQL alone, run once when Memory opens a
store that needs them (the store lists them as pending; schema.py, v6).

split_sessions: before a session was its whole scope, two users (or agents) of one cube who
chose the same session id shared one session item; their turns were numbered together and each
turn's context keys held the other's words. The repair gives every (user, agent) its own
session, renumbers the turns and rebuilds their context keys from their own neighbours only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import EmbeddingMismatchError
from ._models import Item, utcnow

if TYPE_CHECKING:
    from ._memory import Memory
    from .store.sqlite import CubeRow


def run_pending(memory: "Memory") -> list[dict[str, Any]]:
    """Run the store's pending repairs; returns a report of each that changed something."""
    reports = []
    if "split_sessions" in memory.store.pending_repairs():
        report = split_sessions(memory)
        if report["sessions_split"] or report["skipped"]:
            reports.append(report)
    return reports


def split_sessions(memory: "Memory") -> dict[str, Any]:
    report: dict[str, Any] = {"repair": "split_sessions", "sessions_split": [],
                              "sessions_created": [], "turns_moved": 0, "turns_rekeyed": 0,
                              "skipped": []}
    for _, session in memory.store.mixed_sessions():
        try:
            cube = memory._cube(session.cube)
        except EmbeddingMismatchError as exc:  # new keys need the cube's own model
            report["skipped"].append({"session": session.id, "why": str(exc)})
            continue
        _split_one(memory, cube, session, report)
    if not report["skipped"]:
        with memory.store.transaction():
            memory.store.finish_repair("split_sessions", report)
    return report


def _split_one(memory: "Memory", cube: "CubeRow", session: Item, report: dict[str, Any]
               ) -> None:
    store = memory.store
    turns = store.select_items("i.parent_id = ? AND i.kind = 'turn' AND i.status != 'deleted'",
                               (session.id,))
    groups: dict[tuple[str | None, str | None], list[tuple[int, Item]]] = {}
    for rowid, turn in turns:
        if (turn.user_id, turn.agent_id) != (session.user_id, session.agent_id):
            groups.setdefault((turn.user_id, turn.agent_id), []).append((rowid, turn))
    if not groups:  # another process split it since mixed_sessions() was read
        return
    drafts = {key: memory._session_draft(
        {"user_id": key[0], "agent_id": key[1], "session_id": session.session_id},
        {"observed_at": members[0][1].observed_at, "speaker": members[0][1].speaker})
        for key, members in groups.items()}
    vectors = memory._embed_drafts(list(drafts.values()))
    added: list[tuple[np.ndarray, np.ndarray]] = []
    removed: list[int] = []
    with store.transaction():
        touched = {session.id}
        for n, (key, members) in enumerate(groups.items()):
            target = memory._session(cube, drafts[key].fields)
            if target is None:
                [(new_rowid, created, keys)] = memory._insert_all(cube, [drafts[key]],
                                                                  vectors[n:n + 1])
                target = (new_rowid, created)
                added.append(keys)
                report["sessions_created"].append(created.id)
            for rowid, _ in members:
                store.update_item(rowid, {"parent_id": target[1].id, "updated_at": utcnow()})
            touched.add(target[1].id)
            report["turns_moved"] += len(members)
        for session_id in sorted(touched):
            gone, context, rekeyed = _renumber(memory, session_id)
            removed += gone
            added += context
            report["turns_rekeyed"] += rekeyed
        generation = store.bump_generation(cube.id)
        store.audit(memory.actor, "repair", cube.name, sorted(touched),
                    {"repair": "split_sessions", "from_session": session.id,
                     "moved": {f"{u}/{a}": [t.id for _, t in m] for (u, a), m in groups.items()}})
    report["sessions_split"].append(session.id)
    memory._after_write(cube, generation, added=added, removed=removed, save=True)


def _renumber(memory: "Memory", session_item_id: str
              ) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]], int]:
    """Number a session's turns again, count them, and rebuild their context keys."""
    store = memory.store
    [(rowid, session)] = store.select_items("i.id = ?", (session_item_id,))
    turns = store.select_items("i.parent_id = ? AND i.kind = 'turn'", (session_item_id,))
    for n, (turn_rowid, turn) in enumerate(turns):
        if turn.status != "deleted":
            store.update_item(turn_rowid, {"metadata": {**turn.metadata, "turn_index": n}})
    times = [t.observed_at for _, t in turns if t.observed_at and t.status != "deleted"]
    meta = {**session.metadata, "turn_count": len(turns),
            "last_observed_at": max(times).isoformat() if times else None}
    store.update_item(rowid, {"metadata": meta, "updated_at": utcnow()})
    live = [r for r, t in turns if t.status == "active"]
    removed, added = memory._refresh_context(session_item_id, live)
    return removed, added, len(live)


def summary(report: dict[str, Any]) -> str:
    """One line on what a repair changed (Memory.repaired), for people."""
    line = (f"repair {report['repair']}: split {len(report['sessions_split'])} sessions shared "
            f"by several users or agents into {len(report['sessions_created'])} new ones, moved "
            f"{report['turns_moved']} turns, rebuilt the context keys of "
            f"{report['turns_rekeyed']} turns (audit log: action 'repair')")
    if report["skipped"]:
        line += f"; {len(report['skipped'])} skipped: {report['skipped'][0]['why']}"
    return line
