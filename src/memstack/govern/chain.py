"""Verify the audit log's hash chain (store/chain.py): find the first entry where an edit, a
deletion, an insertion or a reordering broke it, and check an exported head (which also
catches a cut tail, or a chain rewritten from some entry on with fresh hashes).

The walk streams the log in order (memory does not grow with it). Only after a break does it
look further, to name what happened: whether the entry the broken one points back to exists,
earlier or later, and whether the next entry skips the broken one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from .._errors import InvalidInputError
from ..store.base import Store
from ..store.chain import GENESIS, ChainRow, head_of, row_hash, walk

_BATCH = 5000


@dataclass(frozen=True)
class ChainReport:
    """What `verify` found. `problem`: None (intact), or edited, unchained, deleted, inserted,
    reordered, truncated, rewritten; `seq`: the first entry where the chain breaks."""

    ok: bool
    entries: int
    head: dict[str, Any] | None
    problem: str | None = None
    seq: int | None = None
    message: str = "the audit chain is intact"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rows(store: Store, after: int = 0) -> Iterator[ChainRow]:
    return walk(store.audit_rows, after, _BATCH)


def head(store: Store) -> dict[str, Any]:
    """The chain's head to keep elsewhere: the last entry's seq and hash (GENESIS, seq 0, for
    an empty log). `verify(store, head)` later proves nothing up to it changed."""
    last = store.audit_last()
    digest = GENESIS if last is None else last.hash or head_of(rows(store))
    return {"seq": last.seq if last else 0, "hash": digest, "store": store.location,
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat()}


def verify(store: Store, expected_head: dict[str, Any] | None = None) -> ChainReport:
    """Walk the chain; with `expected_head` (from `head`), also require that entry, unchanged."""
    want = _parse_head(expected_head)
    count, prev, before, chained, seen_head = 0, GENESIS, None, False, False
    stream = rows(store)
    row = next(stream, None)
    while row is not None:
        following = next(stream, None)
        if row.hash is not None or chained:
            chained = True
            broken = _check(store, row, prev, before, following)
            if broken:
                return _report(False, count, prev, before, *broken)
        digest = row.hash if row.hash is not None else row_hash(row, prev)
        if want and row.seq == want[0]:
            if digest != want[1]:
                return _report(False, count, prev, before, "rewritten", row.seq,
                               f"entry {row.seq} has another hash than the exported head: the "
                               "chain was rewritten from it or before it")
            seen_head = True
        count, prev, before, row = count + 1, digest, row, following
    if want and not seen_head and want[0] > 0:
        return _report(False, count, prev, before, "truncated", want[0],
                       f"the exported head's entry {want[0]} is gone: the log ends at "
                       f"{before.seq if before else 0} (its tail was cut or the entry deleted)")
    return _report(True, count, prev, before)


def _check(store: Store, row: ChainRow, prev: str, before: ChainRow | None,
           following: ChainRow | None) -> tuple[str, int, str] | None:
    """Why `row` does not follow `before` (whose hash is `prev`), or None when it does."""
    intact = row.hash is not None and row_hash(row, row.prev or "") == row.hash
    if intact and row.prev == prev:
        return None
    target = _locate(store, row.prev) if intact else None
    if target is not None and target > row.seq:
        return ("reordered", row.seq, f"entry {row.seq} follows entry {target}, which comes "
                "after it: entries were reordered")
    if following is not None and following.prev == prev and following.hash is not None:
        return ("inserted", row.seq, f"entry {row.seq} is not in the chain: the entry after it "
                f"follows {_name(before)} (it was inserted)")
    if row.hash is None:
        return ("unchained", row.seq, f"entry {row.seq} has no hash though entries before it "
                "do: its link was removed")
    if not intact:
        return ("edited", row.seq, f"entry {row.seq} does not match its hash: it was edited "
                "after it was written")
    if target is not None:
        return ("inserted", row.seq, f"entry {row.seq} follows entry {target}, not "
                f"{_name(before)}: the entries after {target} up to it are not in the chain "
                "(inserted)")
    if before is None:
        return ("deleted", row.seq, f"entry {row.seq} is the first but follows another entry: "
                "the log's first entries were deleted")
    if row.prev == GENESIS:
        return ("inserted", row.seq, f"entry {row.seq} follows the start of the log, not entry "
                f"{before.seq}: the entries before it are not in the chain (inserted)")
    if before.hash is None or before.seq + 1 == row.seq:
        # nothing is missing between them: the entry before was changed (and, if it has a
        # hash, its hash recomputed to match)
        return ("edited", before.seq if before.hash else row.seq,
                f"entry {row.seq} follows another entry than {_name(before)}: that entry "
                "was edited (or one written before the chain)")
    return ("deleted", row.seq, f"the entry that entry {row.seq} follows is missing: entries "
            f"between {before.seq} and {row.seq} were deleted")


def _locate(store: Store, digest: str | None) -> int | None:
    """The seq of the entry whose hash is `digest` (a scan: only after a break)."""
    return next((r.seq for r in rows(store) if r.hash == digest), None)


def _report(ok: bool, count: int, prev: str, last: ChainRow | None, problem: str | None = None,
            seq: int | None = None, message: str = "the audit chain is intact") -> ChainReport:
    head_ = {"seq": last.seq, "hash": prev} if last is not None else {"seq": 0, "hash": GENESIS}
    return ChainReport(ok, count, head_, problem, seq, message)


def _name(row: ChainRow | None) -> str:
    return f"entry {row.seq}" if row is not None else "the start of the log"


def _parse_head(value: dict[str, Any] | None) -> tuple[int, str] | None:
    if value is None:
        return None
    try:
        seq, digest = int(value["seq"]), str(value["hash"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError("an audit head is a JSON object with 'seq' and 'hash' (from "
                                "`memstack audit head`)") from exc
    if seq < 0 or len(digest) != 64:
        raise InvalidInputError(f"not an audit head: seq {seq}, hash {digest[:70]!r}")
    return seq, digest

