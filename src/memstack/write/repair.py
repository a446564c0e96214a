"""Data repairs that a schema migration cannot do in SQL alone, run once when Memory opens a
store that needs them (the store lists them as pending; schema.py, v6).

split_sessions: before a session was its whole scope, two users (or agents) of one cube who
chose the same session id shared one session item; their turns were numbered together and each
turn's context keys held the other's words. The repair gives every (user, agent) its own
session, renumbers the turns and rebuilds their context keys from their own neighbours only.
"""

from __future__ import annotations

from typing import Any

from .._errors import EmbeddingMismatchError
from .._models import Item, utcnow
from ..store.base import CubeRow, Store
from ..store.selection import Selection
from .drafts import session_draft
from .writer import Writer


def run_pending(store: Store, writer: Writer) -> list[dict[str, Any]]:
    """Run the store's pending repairs; returns a report of each that changed something."""
    reports = []
    if "split_sessions" in store.pending_repairs():
        report = split_sessions(store, writer)
        if report["sessions_split"] or report["skipped"]:
            reports.append(report)
    return reports


def split_sessions(store: Store, writer: Writer) -> dict[str, Any]:
    report: dict[str, Any] = {"repair": "split_sessions", "sessions_split": [],
                              "sessions_created": [], "turns_moved": 0, "turns_rekeyed": 0,
                              "skipped": []}
    for _, session in store.mixed_sessions():
        try:
            cube = writer.cubes.get(session.cube)
        except EmbeddingMismatchError as exc:  # new keys need the cube's own model
            report["skipped"].append({"session": session.id, "why": str(exc)})
            continue
        _split_one(store, writer, cube, session, report)
    if not report["skipped"]:
        with store.transaction():
            store.finish_repair("split_sessions", report)
    return report


def _split_one(store: Store, writer: Writer, cube: CubeRow, session: Item,
               report: dict[str, Any]) -> None:
    turns = store.select_items(Selection(status="live", kinds=("turn",), parent_id=session.id))
    groups: dict[tuple[str | None, str | None], list[tuple[int, Item]]] = {}
    for rowid, turn in turns:
        if (turn.user_id, turn.agent_id) != (session.user_id, session.agent_id):
            groups.setdefault((turn.user_id, turn.agent_id), []).append((rowid, turn))
    if not groups:  # another process split it since mixed_sessions() was read
        return
    drafts = {key: session_draft(
        {"user_id": key[0], "agent_id": key[1], "session_id": session.session_id},
        {"observed_at": members[0][1].observed_at, "speaker": members[0][1].speaker})
        for key, members in groups.items()}
    vectors = writer.embed(list(drafts.values()))
    with store.transaction():
        touched = {session.id}
        for n, (key, members) in enumerate(groups.items()):
            target = store.session_item(cube.id, drafts[key].fields)
            if target is None:
                [target] = writer.insert(cube, [drafts[key]], vectors[n:n + 1])
                report["sessions_created"].append(target[1].id)
            for rowid, _ in members:
                store.update_item(rowid, {"parent_id": target[1].id, "updated_at": utcnow()})
            touched.add(target[1].id)
            report["turns_moved"] += len(members)
        for session_id in sorted(touched):
            report["turns_rekeyed"] += _renumber(store, writer, session_id)
        store.compact_indexes()  # no index keeps the other scope's words
        store.bump_generation(cube.id)
        store.audit(writer.actor, "repair", cube.name, sorted(touched),
                    {"repair": "split_sessions", "from_session": session.id,
                     "moved": {f"{u}/{a}": [t.id for _, t in m] for (u, a), m in groups.items()}})
    report["sessions_split"].append(session.id)


def _renumber(store: Store, writer: Writer, session_item_id: str) -> int:
    """Number a session's turns again, count them, and rebuild their context keys."""
    rowid, session = store.item_by_id(session_item_id)  # type: ignore[misc]
    turns = store.select_items(Selection(status="any", kinds=("turn",),
                                         parent_id=session_item_id))
    for n, (turn_rowid, turn) in enumerate(turns):
        if turn.status != "deleted":
            store.update_item(turn_rowid, {"metadata": {**turn.metadata, "turn_index": n}})
    times = [t.observed_at for _, t in turns if t.observed_at and t.status != "deleted"]
    meta = {**session.metadata, "turn_count": len(turns),
            "last_observed_at": max(times).isoformat() if times else None}
    store.update_item(rowid, {"metadata": meta, "updated_at": utcnow()})
    live = [r for r, t in turns if t.status == "active"]
    writer.refresh_context(session_item_id, live)
    return len(live)


def summary(report: dict[str, Any]) -> str:
    """One line on what a repair changed (Memory.repaired), for people."""
    line = (f"repair {report['repair']}: split {len(report['sessions_split'])} sessions shared "
            f"by several users or agents into {len(report['sessions_created'])} new ones, moved "
            f"{report['turns_moved']} turns, rebuilt the context keys of "
            f"{report['turns_rekeyed']} turns (audit log: action 'repair')")
    if report["skipped"]:
        line += f"; {len(report['skipped'])} skipped: {report['skipped'][0]['why']}"
    return line
