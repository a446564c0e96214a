"""Memory's methods for memory that improves with use (issue 18): feedback on hits, answers and
generations; duplicates merged; insights distilled by the LLM. A mixin so that the facade in
_memory.py stays one readable module; the logic lives in the services (learn/)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from ._errors import InvalidInputError
from ._models import AddResult, FeedbackResult, Hit

if TYPE_CHECKING:
    from .learn.feedback import Feedback, Target
    from .store.base import CubeRow


class LearnMixin:
    # feedback (learn/feedback.py, retrieve/feedback.py) -----------------------------------------
    def feedback(self, target: str, signal: str, *, query: str | None = None,
                 correction: str | None = None, user_id: str | None = None,
                 agent_id: str | None = None, cube_ids: Sequence[int] | None = None,
                 check: "Callable[[CubeRow], None] | None" = None) -> FeedbackResult:
        """Say whether a memory, or the memories of an answer or generation (its id), helped:
        `signal` "positive" or "negative". Given with the `query` (an answer's own question by
        default), later searches of the same user for similar queries rank those memories up
        or down, within a bound, fading with time; `correction` (text) becomes a memory of its
        own ranked just ahead of the memory it corrects (with an LLM: said to the fact manager,
        which may UPDATE the fact). Deleting the feedback (its id) undoes it. `user_id`: who
        gave it (default: the memory's or the answer's user). `cube_ids`/`check`: the cubes an
        answer may be looked up in and a check of each cube written to (the server's access).

        >>> m.feedback(hit.item.id, "negative", query="where does Ann live", user_id="ann").id
        '5c1f...'
        """
        from .learn import feedback as fb

        fb.check(signal, query, correction)  # nothing is read or written before this passes
        if not isinstance(target, str) or not target:
            raise InvalidInputError(f"feedback names a memory, answer or generation id, got "
                                    f"{target!r}")
        targets = self._feedback_targets(target, cube_ids)
        for t in targets:
            if check is not None:
                check(t.cube)
        owner = targets[0]
        scope = {"user_id": user_id if user_id is not None else owner.user_id,
                 "agent_id": agent_id if agent_id is not None else owner.agent_id}
        return self._feedback().give(targets, signal, query, correction, scope)

    def _feedback_targets(self, target: str, cube_ids: Sequence[int] | None) -> "list[Target]":
        from .learn import feedback as fb

        found = self.store.item_by_id(target)  # type: ignore[attr-defined]
        if found is None:
            return fb.answer_targets(self.store, target, cube_ids)  # type: ignore[attr-defined]
        _, item = self._live(target)  # type: ignore[attr-defined]
        return [fb.item_target(self._cubes.get(item.cube, check_model=False),  # type: ignore[attr-defined]
                               item)]

    def _feedback(self) -> "Feedback":
        from .learn.feedback import Feedback

        say = None
        if getattr(self, "facts", None) is not None:
            def say(text: str, scope: dict[str, Any], cube: str) -> AddResult:
                return self.add([{"role": "user", "content": text}],  # type: ignore[attr-defined]
                                cube=cube, **scope)
        return Feedback(self.store, self.writer, self.embedder,  # type: ignore[attr-defined]
                        self.actor, say)  # type: ignore[attr-defined]

    def _remember(self, kind: str, query: str, scope: dict[str, Any], hits: Sequence[Hit],
                  cubes: Sequence[str]) -> str:
        """An id for an answer or generation, recorded with the memories it used."""
        from .learn.feedback import remember_answer

        store = self.store  # type: ignore[attr-defined]
        by_cube: dict[int, list[str]] = {}
        for hit in hits:
            by_cube.setdefault(store.cube(hit.item.cube).id, []).append(hit.item.id)
        if not by_cube and cubes:
            by_cube[store.cube(cubes[0]).id] = []
        if not by_cube:
            return ""
        return remember_answer(store, kind, query, scope, by_cube)
