"""Memory's methods for the derived tiers (activation: KV blocks of a local model; parametric:
LoRA shards). A mixin so that the facade in _memory.py stays one readable module."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ._errors import InvalidInputError
from ._models import Generation
from ._validate import limit as _limit
from .ingest.rules import clean_text

if TYPE_CHECKING:
    from .store.kvblocks import BlockRow
    from .tiers.activation import ActivationTier, LocalModel, Stream
    from .tiers.maintenance import Maintenance, MaintenanceReport, MaintenanceSettings
    from .tiers.parametric import ParametricTier, ShardReport, TrainSettings


_LOADING = threading.Lock()


class TiersMixin:
    _tiers: dict[str, "ActivationTier"]
    _models: dict[str, "LocalModel"]

    def local_model(self, model: "LocalModel | str | Path") -> "LocalModel":
        """A LocalModel, loaded once per Memory from a spec ("smollm2" or a folder)."""
        from .tiers.activation import LocalModel

        if isinstance(model, LocalModel):
            return model
        if not isinstance(model, (str, Path)) or not str(model):
            raise InvalidInputError("model is a LocalModel, 'smollm2' or a model folder")
        key = str(model)
        with _LOADING:  # the server's requests and its maintenance thread load it once
            if key not in self._models:
                self._models[key] = LocalModel.load(model)
        return self._models[key]

    def activation(self, model: "LocalModel | str | Path", **settings: Any) -> "ActivationTier":
        """The activation tier (KV blocks) of this memory for a local model. `settings`
        (budget_bytes, block_tokens, half_life_days, min_heat, max_blocks) change the tier's;
        those not given keep their values.

        >>> m.activation("smollm2", budget_bytes=64 << 20).schedule().built
        ['kv_3f2a...']
        """
        from .tiers.activation import ActivationTier

        lm = self.local_model(model)
        tier = self._tiers.get(lm.key)
        merged = {**(tier.settings if tier else {}), **settings}
        if tier is None or merged != tier.settings:
            tier = ActivationTier(self.store, lm, before_schedule=self._uses.flush,  # type: ignore[attr-defined]
                                  **merged)
            self._tiers[lm.key] = tier
        return tier

    def parametric(self, model: "LocalModel | str | Path") -> "ParametricTier":
        """The parametric tier (LoRA shards) of this memory for a local model."""
        from .tiers.parametric import ParametricTier

        lm = self.local_model(model)
        key = f"parametric:{lm.key}"
        if key not in self._tiers:
            self._tiers[key] = ParametricTier(self.store, self.searcher,  # type: ignore[attr-defined]
                                              lm)  # type: ignore[assignment]
        return self._tiers[key]  # type: ignore[return-value]

    def consolidate(self, *, model: "LocalModel | str | Path", user_id: str | None = None,
                    agent_id: str | None = None, cube: str | None = None,
                    selection: str | Sequence[str] = "facts",
                    settings: "TrainSettings | None" = None, replay: Sequence[str] | None = None,
                    parent: str | None = None, progress: Any = None) -> "ShardReport":
        """Train a LoRA shard on stable items of a scope (facts first), audit it and save it.

        >>> m.consolidate(model="smollm2", user_id="ann").audit["reliability"]
        1.0
        """
        from .tiers.parametric import TrainSettings

        tier = self.parametric(model)
        items = tier.select(user_id=user_id, agent_id=agent_id, cube=cube, selection=selection)
        return tier.consolidate(items, settings or TrainSettings(), replay=replay, parent=parent,
                                **({"progress": progress} if progress else {}))

    def audit(self, shard_id: str, *, model: "LocalModel | str | Path",
              nonmembers: Sequence[Any] | None = None) -> dict[str, Any]:
        """Audit a shard again on its items as they are now (reliability, generalization,
        locality, perplexity, extractability, canary exposure, membership inference).
        Membership inference needs items never trained into the shard: by default up to as many
        active facts of the same cube outside the shard (skipped below 5); `()` skips it."""
        from .tiers.parametric.samples import item_samples

        tier = self.parametric(model)
        row = tier._shard(shard_id)
        live = [i for i in self.store.items_by_id(row.item_ids).values()  # type: ignore[attr-defined]
                if i.status == "active"]
        if not live:
            raise InvalidInputError(f"shard {shard_id} holds no active item; run maintain")
        if nonmembers is None:
            held = set(row.item_ids)
            outside = [i for i in tier.select(cube=live[0].cube) if i.id not in held]
            nonmembers = outside[-len(live):] if len(outside) >= 5 else ()
        return tier.audit_model(tier.load(shard_id), [item_samples(i) for i in live], nonmembers,
                                **tier.audit_size(shard_id))

    def ask(self, question: str, *, model: "LocalModel | str | Path", shard: str = "auto",
            user_id: str | None = None, agent_id: str | None = None,
            cube: str | Sequence[str] | None = None, max_new_tokens: int = 64
            ) -> dict[str, Any]:
        """Answer from a shard's weights alone, no retrieval; shard "auto" routes the question
        to the shard holding most of its best search hits in `cube` (the default cube when
        None), and a question close to no consolidated memory goes to the base model (shard
        None). Returns {"shard", "text"}.

        >>> m.ask("Where does Ann live?", model="smollm2", user_id="ann")["text"]
        'Ann lives in Lisbon.'
        """
        question = clean_text(question, what="question")
        max_new_tokens = _limit(max_new_tokens, "max_new_tokens", maximum=4096)
        tier = self.parametric(model)
        chosen = tier.route(question, user_id=user_id, agent_id=agent_id, cube=cube) \
            if shard == "auto" else shard
        return {"shard": chosen, "text": tier.ask(question, chosen,
                                                  max_new_tokens=max_new_tokens)}

    def merge_shards(self, shard_ids: Sequence[str], *, model: "LocalModel | str | Path",
                     combination: str = "cat", weights: Sequence[float] | None = None,
                     replace: bool = False) -> "ShardReport":
        """One shard from several ("cat": exactly the sum of their updates; "ties", "dare_ties",
        "svd", "linear"), audited; with `replace` the sources are dropped."""
        return self.parametric(model).merge(shard_ids, combination=combination,
                                            weights=weights, replace=replace)

    def maintain(self, *, model: "LocalModel | str | Path", cpu_seconds: float | None = None,
                 budget_bytes: int | None = None) -> "MaintenanceReport":
        """One maintenance run now, under the store's lease (LockHeldError when another
        process runs one): retention (expiry, archiving and purges under the cubes' rules,
        govern/retention.py), the KV scheduler, then stale shards retrained without the items
        changed or deleted since (or dropped), until `cpu_seconds` are spent.

        >>> [s["retrained"] for s in m.maintain(model="smollm2").shards]
        ['shard_3f2a...']
        """
        from .tiers.maintenance import MaintenanceSettings

        settings = MaintenanceSettings(every=0, cpu_seconds=cpu_seconds,
                                       budget_bytes=budget_bytes)
        return self.maintenance(model=model, settings=settings).run()

    def maintenance(self, *, model: "LocalModel | str | Path | None",
                    settings: "MaintenanceSettings | None" = None,
                    last_activity: "Callable[[], float | None] | None" = None
                    ) -> "Maintenance":
        """The maintenance service of this memory: retention, duplicates merged
        (learn/dedupe.py), then (with a model) the KV scheduler and the retraining of stale
        shards; `.run()` once, `.start()` in a
        background thread, `.loop()` in the foreground (tiers/maintenance.py). The model
        loads at the first run. `last_activity` gives the time of the last request (the
        server's), for the quiet time."""
        from .tiers.maintenance import ACTOR, Maintenance, MaintenanceSettings

        settings = (settings or MaintenanceSettings()).check()
        kv = {} if settings.budget_bytes is None else {"budget_bytes": settings.budget_bytes}
        store = self.store  # type: ignore[attr-defined]
        tiers = None if model is None else \
            (lambda: (self.activation(model, **kv), self.parametric(model)))
        retainer = self._retainer  # type: ignore[attr-defined]
        deduper = self._deduper  # type: ignore[attr-defined]
        return Maintenance(store, tiers, settings, last_activity=last_activity or (lambda: None),
                           retention=lambda: retainer(ACTOR).apply(),
                           dedupe=lambda: deduper(ACTOR).run())

    def kv_blocks(self) -> "list[BlockRow]":
        """Every KV block of every model: id, model key, scope, item ids, tokens, bytes, uses."""
        return self.store.blocks()  # type: ignore[attr-defined]

    def drop_kv_blocks(self, block_ids: Sequence[str] | None = None) -> list[str]:
        """Delete KV blocks (rows, placements and files; all of them without ids); the scheduler
        rebuilds them from current text when their items are hot. Returns the ids dropped."""
        store = self.store  # type: ignore[attr-defined]
        ids = [b.id for b in store.blocks()] if block_ids is None else list(block_ids)
        with store.transaction():
            return store.drop_blocks(ids)

    def generate(self, query: str, *, model: "LocalModel | str | Path",
                 user_id: str | None = None, agent_id: str | None = None,
                 session_id: str | None = None, run_id: str | None = None,
                 cube: str | Sequence[str] | None = None, top_k: int = 10,
                 max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                 use_cache: bool = True, stream: bool = False) -> "Generation | Stream":
        """Answer with a local model: search the scope, take hits that sit in KV blocks from
        their caches and the rest as text, and decode. With `stream`, an iterator of text
        pieces whose `.result` is the Generation once it is exhausted.

        >>> m.generate("What is my cat called?", model="smollm2", user_id="ann").text
        'Your cat is called Milo.'
        """
        query = clean_text(query, what="query")
        max_new_tokens = _limit(max_new_tokens, "max_new_tokens", maximum=4096)
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 5:
            raise InvalidInputError("temperature is a number from 0 (greedy) to 5")
        tier = self.activation(model)
        hits = self.search(query, user_id=user_id, agent_id=agent_id,  # type: ignore[attr-defined]
                           session_id=session_id or run_id, cube=cube, top_k=top_k)
        out = tier.generate(query, hits, use_cache=use_cache, max_new_tokens=max_new_tokens,
                            temperature=float(temperature), seed=seed,
                            session_id=session_id or run_id)
        scope = {"user_id": user_id, "agent_id": agent_id}
        cubes = [cube] if isinstance(cube, str) else list(cube or [])
        out.then(lambda g: dataclasses.replace(g, id=self._remember(  # type: ignore[attr-defined]
            "generation", query, scope, [h for h in hits if h.item.id in g.memory_ids], cubes)))
        return out if stream else out.collect()
