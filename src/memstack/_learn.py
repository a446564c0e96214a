"""Memory's methods for memory that improves with use (issue 18): feedback on hits, answers and
generations; duplicates merged; insights distilled by the LLM. A mixin so that the facade in
_memory.py stays one readable module; the logic lives in the services (learn/)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from ._errors import InvalidInputError
from ._models import AddResult, FeedbackResult, Hit

if TYPE_CHECKING:
    from .learn.dedupe import Dedupe, DedupeReport, DedupeSettings
    from .learn.feedback import Feedback, Target
    from .learn.reflect import Reflection, ReflectSettings
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
        which may UPDATE the fact). Deleting the feedback (its id) undoes it. `user_id` and
        `agent_id`: the scope of the searches it moves, as in search() (an answer's own scope
        by default; else none: searches without a user). `cube_ids`/`check`: the cubes an
        answer may be looked up in and a check of each cube written to (the server's access).

        >>> m.feedback(hit.item.id, "negative", query="where does Ann live", user_id="ann").id
        '5c1f...'
        """
        from ._validate import scope as valid_scope
        from .learn import feedback as fb

        fb.check(signal, query, correction)  # nothing is read or written before this passes
        valid_scope(user_id, agent_id, None)
        if not isinstance(target, str) or not target:
            raise InvalidInputError(f"feedback names a memory, answer or generation id, got "
                                    f"{target!r}")
        targets = self._feedback_targets(target, cube_ids)
        for t in targets:
            if check is not None:
                check(t.cube)
        asked = targets[0] if targets[0].answer_id else None  # the answer's search scope
        scope = {"user_id": user_id if user_id is not None or asked is None else asked.user_id,
                 "agent_id": agent_id if agent_id is not None or asked is None
                 else asked.agent_id}
        return self._feedback().give(targets, signal, query, correction, scope)

    def _undo_feedback(self, cube: str, feedback: Any, purged: Sequence[str]) -> None:
        """A feedback item was deleted: what its correction superseded is current again."""
        from .learn.feedback import restore_superseded

        store = self.store  # type: ignore[attr-defined]
        with store.transaction():
            restored = restore_superseded(store, self.actor, feedback,  # type: ignore[attr-defined]
                                          purged)
            if restored:
                store.audit(self.actor, "feedback_undone", cube, restored,  # type: ignore[attr-defined]
                            {"feedback_id": feedback.id})

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
        if getattr(store, "read_only", False):  # a read replica records nothing: no id
            return ""
        by_cube: dict[int, list[str]] = {}
        for hit in hits:
            by_cube.setdefault(store.cube(hit.item.cube).id, []).append(hit.item.id)
        if not by_cube and cubes:
            by_cube[store.cube(cubes[0]).id] = []
        if not by_cube:
            return ""
        return remember_answer(store, kind, query, scope, by_cube)

    # duplicates merged (learn/dedupe.py) ---------------------------------------------------------
    def dedupe(self, *, cube: str | None = None, user_id: str | None = None,
               dry_run: bool = False, settings: "DedupeSettings | None" = None
               ) -> "DedupeReport":
        """Merge facts, insights and procedures that say the same thing within one scope
        (maintain does this too): the oldest of each group keeps the union of provenance, the
        others are superseded by it and leave search. `cube`: one cube (None: every cube);
        `user_id`: one user's scopes; with `dry_run`, only report the groups.

        >>> [g.merged for g in m.dedupe(user_id="ann").groups]
        [['9c2e...']]
        """
        if user_id is not None and (not isinstance(user_id, str) or not user_id):
            raise InvalidInputError(f"user_id is a non-empty string, got {user_id!r}")
        cubes = None if cube is None else \
            [self._cubes.get(cube, check_model=False)]  # type: ignore[attr-defined]
        return self._deduper(settings=settings).run(cubes=cubes, user_id=user_id,
                                                    dry_run=dry_run)

    def _deduper(self, actor: str | None = None, settings: "DedupeSettings | None" = None
                 ) -> "Dedupe":
        from .learn.dedupe import Dedupe

        self._uses.flush()  # type: ignore[attr-defined]  # the survivor sums the uses
        return Dedupe(self.store, self.writer,  # type: ignore[attr-defined]
                      actor or self.actor, settings)  # type: ignore[attr-defined]

    # insights distilled by the LLM (learn/reflect.py) -------------------------------------------
    def reflect(self, *, user_id: str | None = None, agent_id: str | None = None,
                cube: str | None = None, sessions: int = 5, dry_run: bool = False,
                settings: "ReflectSettings | None" = None) -> "Reflection":
        """Ask the LLM what the newest `sessions` sessions and the facts of a user (or agent)
        show about their preferences and what worked, and store it as `insight` and
        `procedure` items citing their turns and facts (source_ids). Repeats of existing
        insights are skipped. At most learn.reflect.MAX_CALLS (4) LLM calls, a repair
        included. An LLM failure comes back in `error`, stored items untouched; `dry_run`
        asks the LLM but writes nothing. Without an LLM, raises LLMError.

        >>> m.reflect(user_id="ann").insights[0].text
        'Ann prefers short answers with an example.'
        """
        from ._errors import LLMError
        from ._validate import limit as valid_limit
        from ._validate import scope as valid_scope
        from .learn.reflect import Reflection, Reflector

        if self.llm is None:  # type: ignore[attr-defined]
            raise LLMError("reflect needs an LLM: Memory(..., llm=OpenAIChat(base_url=...)), "
                           "or on the command line --llm-url URL (or MEMSTACK_LLM_URL)")
        if user_id is None and agent_id is None:
            raise InvalidInputError("reflect needs user_id or agent_id: insights are about "
                                    "someone")
        scope = valid_scope(user_id, agent_id, None)
        sessions = valid_limit(sessions, "sessions", maximum=100)
        rows = self._cubes.for_reading(cube)  # type: ignore[attr-defined]
        if not rows:  # nothing stored yet
            return Reflection([], [], 0, 0, 0, dry_run=dry_run)
        return Reflector(self.writer, self.searcher, self.llm,  # type: ignore[attr-defined]
                         settings).run(rows[0], scope, sessions, dry_run)
