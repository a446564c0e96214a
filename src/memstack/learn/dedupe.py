"""Duplicates merged: facts, insights and procedures that say the same thing (different words,
or the same text learned in several sessions) become one item.

Within one cube, one kind and one exact scope (user_id and agent_id; items with neither are
kept per session) a pair is a duplicate when the stored vectors of the two are close
(cosine >= `vector`), their words overlap enough (Jaccard of stems >= `lexical`, unless the
vectors alone are sure, >= `sure`), and no rule of near.py sees a difference of meaning that
vectors blur (negation, opposites, numbers, dates, names, one or two content words swapped
for others). Groups are built by complete linkage: an item joins a group only if it is a
duplicate of every member, so no chain of near pairs merges two items that differ.

The survivor of a group is its oldest item (valid from earliest, then first written). It keeps
its text and gains the union of the group's provenance (source ids), tags and uses (access
counts, importance), with a version "merged duplicates". Each other member is superseded by it
as a fact update is (status superseded, valid_to now, superseded_by the survivor, a version
"duplicate of ..."): search no longer returns it, history and `as_of` still show it. Turns,
sessions, core profile blocks and feedback are never merged, nor items with an expiry of their
own (their life was set by whoever added them).

`run` reads one cube at a time, writes a page of groups per transaction (re-reading the items
inside it: one changed or deleted meanwhile is left alone) and audits each page ("dedupe", the
ids, and which survivor took which copies). With `dry_run` it only reports the groups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .._errors import InvalidInputError
from .._models import Item, utcnow
from ..store.selection import Selection
from .near import conflict, lexical

if TYPE_CHECKING:
    from ..store.base import CubeRow, Store
    from ..write.writer import Writer

KINDS = ("fact", "insight", "procedure")
ACTION = "dedupe"
_PAGE = 500  # items read per query, and written per transaction
_BLOCK = 1024  # rows of the similarity matrix computed at once
Row = tuple[int, Item]


@dataclass(frozen=True)
class DedupeSettings:
    """When two items of a scope are duplicates (see the module's docstring); thresholds
    measured by `memstack bench dedupe` (docs/learning.md): the stricter of the two chosen
    on the halves split by seed, each held on the other. `sure` 1.0: words must always
    overlap."""

    vector: float = 0.84
    sure: float = 1.0
    lexical: float = 0.2

    def check(self) -> "DedupeSettings":
        for name in ("vector", "sure", "lexical"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 <= value <= 1:
                raise InvalidInputError(f"dedupe {name} is a number in 0..1, got {value!r}")
        return self


@dataclass
class DuplicateGroup:
    """Items that say the same thing: the one kept and the ones merged into it."""

    cube: str
    kind: str
    user_id: str | None
    agent_id: str | None
    kept: str
    merged: list[str]
    content: str | None
    similarity: float  # the lowest cosine between two members


@dataclass
class DedupeReport:
    """What a run merged (or, with dry_run, would merge): items scanned and groups."""

    at: float
    dry_run: bool = False
    scanned: int = 0
    groups: list[DuplicateGroup] = field(default_factory=list)

    @property
    def merged(self) -> list[str]:
        return [i for g in self.groups for i in g.merged]

    @property
    def kept(self) -> list[str]:
        return [g.kept for g in self.groups]

    @property
    def changed(self) -> bool:
        return bool(self.groups)

    def counts(self) -> dict[str, int]:
        return {"scanned": self.scanned, "groups": len(self.groups), "merged": len(self.merged)}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "at": datetime.fromtimestamp(self.at, timezone.utc).isoformat(),
                "counts": self.counts()}


def duplicate(a: str, b: str, cosine: float, settings: DedupeSettings) -> bool:
    """Whether two texts of one scope whose vectors have this cosine are duplicates.

    >>> s = DedupeSettings()
    >>> duplicate("Ann likes tea", "Ann really likes tea", 0.955, s)
    True
    >>> duplicate("Ann is a nurse", "Ann is a pilot", 0.97, s)  # a swapped value
    False
    >>> duplicate("Ann likes tea", "Ann dislikes tea", 0.97, s)
    False
    """
    if cosine < settings.vector and _plain(a) != _plain(b):
        return False
    if cosine < settings.sure and lexical(a, b) < settings.lexical:
        return False
    return conflict(a, b) is None


def _plain(text: str) -> str:
    return " ".join(text.casefold().split())


def close_pairs(vectors: np.ndarray, floor: float) -> dict[tuple[int, int], float]:
    """(i, j) with i < j -> cosine, for every pair of rows whose cosine is >= floor; rows are
    unit vectors. Block by block, so a scope of many items never holds its n x n matrix."""
    out: dict[tuple[int, int], float] = {}
    for start in range(0, len(vectors), _BLOCK):
        sims = vectors[start:start + _BLOCK] @ vectors.T  # (B, n)
        for i, j in zip(*np.nonzero(sims >= floor)):
            a = start + int(i)
            if a < j:
                out[(a, int(j))] = float(sims[i, j])
    return out


def groups(texts: Sequence[str], vectors: np.ndarray, settings: DedupeSettings
           ) -> list[list[int]]:
    """Duplicate groups of one scope as lists of indices (first: the survivor), by complete
    linkage over the texts in survivor order (the order given). Lone items are left out."""
    pairs = close_pairs(vectors, settings.vector) if len(texts) > 1 else {}
    plain: dict[str, list[int]] = {}
    for n, text in enumerate(texts):  # equal texts are candidates whatever their vectors
        plain.setdefault(_plain(text), []).append(n)
    for same in plain.values():
        pairs.update({(a, b): pairs.get((a, b), 1.0) for a in same for b in same if a < b})
    near: dict[int, list[tuple[float, int]]] = {}
    for (a, b), cos in pairs.items():
        near.setdefault(b, []).append((cos, a))
    member_of: dict[int, int] = {}
    out: list[list[int]] = []
    for n in range(len(texts)):
        for _, earlier in sorted(near.get(n, ()), reverse=True):
            group = out[member_of[earlier]]
            if all((m, n) in pairs and duplicate(texts[m], texts[n], pairs[(m, n)], settings)
                   for m in group):
                group.append(n)
                member_of[n] = member_of[earlier]
                break
        else:
            member_of[n] = len(out)
            out.append([n])
    return [g for g in out if len(g) > 1]


def unit_vector(keys: list[tuple[str, np.ndarray]]) -> np.ndarray | None:
    """An item's vector from its stored keys: its body key, or its chunks' mean."""
    body = [v for role, v in keys if role == "body"] or \
        [v for role, v in keys if role.startswith("chunk:")]
    if not body:
        return None
    vec = np.mean(np.asarray(body, dtype=np.float32), axis=0)
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm else None


def scope_key(item: Item) -> tuple[Any, ...]:
    """Items are compared only within one kind and exact scope (and session, when they have
    neither user nor agent: then the session is their owner)."""
    session = item.session_id if item.user_id is None and item.agent_id is None else None
    return item.kind, item.user_id, item.agent_id, session


def _age(row: Row) -> tuple[float, int]:
    item = row[1]
    when = item.valid_from or item.observed_at or item.recorded_at
    return (when.timestamp() if when else float("inf")), row[0]


class Dedupe:
    """Duplicate merging for one store. `writer` supersedes the copies (write/writer.py);
    `actor` is named in the audit log.

    >>> Dedupe(store, writer, "local:ann").run(cubes=[cube], dry_run=True).groups
    """

    def __init__(self, store: "Store", writer: "Writer", actor: str,
                 settings: DedupeSettings | None = None) -> None:
        self.store, self.writer, self.actor = store, writer, actor
        self.settings = (settings or DedupeSettings()).check()

    def run(self, *, cubes: Sequence["CubeRow"] | None = None, user_id: str | None = None,
            dry_run: bool = False) -> DedupeReport:
        """Merge the duplicates of every cube (or these), of one user's scopes or all."""
        report = DedupeReport(utcnow().timestamp(), dry_run)
        cubes = list(cubes) if cubes is not None else \
            [self.store.cube(c.name) for c in self.store.cubes()]
        for cube in cubes:
            found = self.find(cube, user_id, report)
            if not dry_run:
                self._write(cube, found, report)
            else:
                report.groups += [g for g, _ in found]
        return report

    # finding ------------------------------------------------------------------------------------
    def find(self, cube: "CubeRow", user_id: str | None, report: DedupeReport
             ) -> list[tuple[DuplicateGroup, list[Row]]]:
        """The cube's duplicate groups with their rows (survivor first)."""
        out = []
        for rows in self._scopes(cube, user_id, report).values():
            rows.sort(key=_age)
            vectors = self._vectors(rows)
            kept = [r for r, v in zip(rows, vectors) if v is not None]
            if len(kept) < 2:
                continue
            matrix = np.stack([v for v in vectors if v is not None])  # (n, dim)
            for members in groups([i.content or "" for _, i in kept], matrix, self.settings):
                out.append((_group(cube, [kept[n] for n in members], matrix[members]),
                            [kept[n] for n in members]))
        return out

    def _scopes(self, cube: "CubeRow", user_id: str | None, report: DedupeReport
                ) -> dict[tuple[Any, ...], list[Row]]:
        sel = Selection(cube_ids=(cube.id,), kinds=KINDS, user_id=user_id)
        scopes: dict[tuple[Any, ...], list[Row]] = {}
        after = 0
        while page := self.store.select_items(sel, limit=_PAGE, after_rowid=after):
            after = page[-1][0]
            report.scanned += len(page)
            for rowid, item in page:
                if item.expires_at is None and item.content and not _from_feedback(item):
                    scopes.setdefault(scope_key(item), []).append((rowid, item))
        return scopes

    def _vectors(self, rows: list[Row]) -> list[np.ndarray | None]:
        keys: dict[int, list[tuple[str, np.ndarray]]] = {}
        for start in range(0, len(rows), _PAGE):
            keys.update(self.store.key_vectors_of([r for r, _ in rows[start:start + _PAGE]]))
        return [unit_vector(keys.get(rowid, [])) for rowid, _ in rows]

    # merging ------------------------------------------------------------------------------------
    def _write(self, cube: "CubeRow", found: list[tuple[DuplicateGroup, list[Row]]],
               report: DedupeReport) -> None:
        page: list[tuple[DuplicateGroup, list[Row]]] = []
        for entry in found:
            page.append(entry)
            if sum(len(rows) for _, rows in page) >= _PAGE:
                report.groups += self._merge_page(cube, page)
                page = []
        if page:
            report.groups += self._merge_page(cube, page)

    def _merge_page(self, cube: "CubeRow", page: list[tuple[DuplicateGroup, list[Row]]]
                    ) -> list[DuplicateGroup]:
        """One transaction: each group as it is now (members changed or gone since they were
        read are left out), merged."""
        done = []
        with self.store.transaction():
            for group, rows in page:
                now = self.store.items_by_rowid([r for r, _ in rows])
                same = [(r, now[r]) for r, i in rows if r in now and now[r].status == "active"
                        and now[r].version == i.version]
                if len(same) < 2 or same[0][0] != rows[0][0]:
                    continue  # the survivor changed: the next run looks again
                self._merge(same)
                done.append(_group(cube, same, None, group.similarity))
            if done:
                self.store.bump_generation(cube.id)
                self.store.audit(self.actor, ACTION, cube.name,
                                 [i for g in done for i in (g.kept, *g.merged)],
                                 {"groups": [{"kept": g.kept, "merged": g.merged}
                                             for g in done]})
        return done

    def _merge(self, rows: list[Row]) -> None:
        """Inside the caller's transaction: the survivor takes the group's provenance, tags
        and uses; the others are superseded by it."""
        (rowid, kept), copies = rows[0], rows[1:]
        items = [kept] + [i for _, i in copies]
        seen_at = [i.last_accessed for i in items if i.last_accessed is not None]
        now = utcnow()
        self.store.update_item(rowid, {
            "source_ids": _union(i.source_ids for i in items),
            "tags": _union(i.tags for i in items),
            "access_count": sum(i.access_count for i in items),
            "importance": max(i.importance for i in items),
            "last_accessed": max(seen_at) if seen_at else None,
            "version": kept.version + 1, "updated_at": now})
        merged = [i.id for _, i in copies]
        self.store.add_version(rowid, self.store.items_by_rowid([rowid])[rowid],
                               f"merged duplicates {', '.join(merged)}", self.actor, merged)
        for copy_rowid, copy in copies:
            self.writer.supersede(copy_rowid, copy, kept.id, now, f"duplicate of {kept.id}",
                                  [kept.id])


def _group(cube: "CubeRow", rows: list[Row], vectors: np.ndarray | None,
           similarity: float | None = None) -> DuplicateGroup:
    if similarity is None:
        assert vectors is not None
        similarity = float((vectors @ vectors.T).min())
    kept = rows[0][1]
    return DuplicateGroup(cube.name, kept.kind, kept.user_id, kept.agent_id, kept.id,
                          [i.id for _, i in rows[1:]], kept.content, round(similarity, 4))


def _union(lists: Any) -> list[str]:
    out: dict[str, None] = {}
    for values in lists:
        out.update(dict.fromkeys(values))
    return list(out)


def _from_feedback(item: Item) -> bool:
    """A correction is feedback's own memory: deleting the feedback deletes it, so it must not
    be merged into (or absorb) another item."""
    return "feedback_id" in item.metadata or "corrects" in item.metadata
