"""The audit log's hash chain: each entry carries the hash of the one before it.

An entry's hash is sha256 over the previous entry's hash and the entry's canonical JSON (sorted
keys, no spaces, UTF-8; `item_ids` and `detail` as the JSON values they hold, so a store that
reformats its JSON text keeps the hashes). Editing, deleting, inserting or reordering an entry
breaks the chain at that entry (govern/chain.py finds where); an exported head (the last
entry's sequence number and hash, kept elsewhere) also catches a cut tail or a rewritten chain.

The sequence number is not hashed: the chain itself is the order. Entries written before the
chain existed (no hash stored) are chained as they are read, so the first hashed entry's
`prev` seals them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterable, Iterator, NamedTuple

GENESIS = "0" * 64  # the `prev` of the first entry


class ChainRow(NamedTuple):
    """One audit row as stored: the hashed fields, then the links (None before the chain)."""

    seq: int
    at: float
    actor: str
    action: str
    cube: str | None
    item_ids: str  # JSON text
    detail: str  # JSON text
    prev: str | None
    hash: str | None


def canonical(at: float, actor: str, action: str, cube: str | None, item_ids: str,
              detail: str) -> bytes:
    """The bytes an entry's hash covers (JSON text fields parsed, then written canonically)."""
    body = {"at": at, "actor": actor, "action": action, "cube": cube,
            "item_ids": json.loads(item_ids), "detail": json.loads(detail)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                      ).encode("utf-8")


def link(prev: str, at: float, actor: str, action: str, cube: str | None, item_ids: str,
         detail: str) -> str:
    """The hash of an entry that follows the entry whose hash is `prev`."""
    digest = hashlib.sha256(prev.encode("ascii"))
    digest.update(b"\n")
    digest.update(canonical(at, actor, action, cube, item_ids, detail))
    return digest.hexdigest()


def row_hash(row: ChainRow, prev: str) -> str:
    return link(prev, row.at, row.actor, row.action, row.cube, row.item_ids, row.detail)


def head_of(rows: Iterable[ChainRow]) -> str:
    """The hash of the last of `rows` (in order), chaining those stored without one."""
    head = GENESIS
    for row in rows:
        head = row.hash if row.hash is not None else row_hash(row, head)
    return head


def walk(read: Callable[[int, int], list[ChainRow]], after: int = 0,
         page: int = 5000) -> Iterator[ChainRow]:
    """Every row after `after`, in order, read a page at a time by `read(after, limit)`."""
    while rows := read(after, page):
        yield from rows
        after = rows[-1].seq


def as_row(values: Any) -> ChainRow:
    return ChainRow(*values)
