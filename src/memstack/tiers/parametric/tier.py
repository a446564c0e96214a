"""The parametric tier of one Memory for one local model: consolidation of stable items into LoRA
shards, their audits, and their upkeep when items change or are deleted.

A shard is a folder `<db>.shards/<id>/`: the adapter (peft, safetensors) and manifest.json with
the base model's identity, the items' ids and content hashes, the hyperparameters, the training
curve and the audit results. Its row in the `shards` table says which items it holds; a change to
any of them marks it stale, and maintain() retrains it on what is left (or drops it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..._errors import InvalidInputError, NotFoundError, TierError
from ..._models import Item, utcnow
from ...store.selection import Selection
from ...store.shards import ShardRow
from ..activation.model import LocalModel, models_dir
from . import audit as audits
from .gate import GATE_FILE, install_saved
from .samples import CONTROL_PROMPTS, ItemSamples, Sample, item_samples
from .train import REPLAY_PROMPTS, Trainer, TrainSettings, self_synthesized

if TYPE_CHECKING:
    from ...retrieve.searcher import Searcher
    from ...store.base import Store

STABLE_KINDS = ("core", "fact", "insight", "procedure")  # facts first; turns only on request
# Embedding similarity (all-MiniLM-L6-v2 cosine) a hit needs to route a query to its shard.
# On the bench's 200 facts: questions about them >= 0.60 (held-out phrasings included), the
# 40 control prompts <= 0.35, the 48 hand-written replay prompts <= 0.47 (docs/parametric.md).
ROUTE_MIN_SIMILARITY = 0.55
MERGES = ("cat", "linear", "svd", "ties", "dare_ties")
_REPLAY: dict[str, list[Sample]] = {}  # self-synthesized replay per base model, per process
_BASE: dict[str, dict[str, Any]] = {}  # the base model's side of every audit, per process
HOSTED = 8  # adapters `ask` keeps loaded beside one copy of the base model (least recently used)


@dataclass(frozen=True)
class ShardReport:
    id: str
    items: int
    samples: int
    seconds: float
    final_loss: float
    audit: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ParametricTier:
    def __init__(self, store: "Store", searcher: "Searcher", model: LocalModel) -> None:
        self.store, self.searcher, self.lm = store, searcher, model
        self._host: Any = None  # one copy of the base model holding the adapters asked of
        self._hosted: OrderedDict[str, None] = OrderedDict()
        self._hosting = threading.RLock()

    # consolidation ---------------------------------------------------------------------------
    def select(self, *, user_id: str | None = None, agent_id: str | None = None,
               cube: str | None = None, selection: str | Sequence[str] = "facts") -> list[Item]:
        """Items to consolidate: "facts" (core, fact, insight, procedure), "all" (turns too),
        or a list of item ids; only active items, oldest first."""
        store = self.store
        if not isinstance(selection, str):
            found = store.items_by_id(selection)
            missing = [i for i in selection if i not in found]
            if missing:
                raise NotFoundError(f"no memory with id {missing[0]!r}")
            return [found[i] for i in selection if found[i].status == "active"]
        if selection not in ("facts", "all"):
            raise InvalidInputError("selection is 'facts', 'all' or a list of item ids")
        kinds = STABLE_KINDS + (("turn",) if selection == "all" else ())
        sel = Selection.of(cube_ids=[store.cube(cube or self.searcher.cubes.default).id],
                           kinds=kinds, scope={"user_id": user_id, "agent_id": agent_id})
        return [item for _, item in store.select_items(sel)]

    def consolidate(self, items: Sequence[Item], settings: TrainSettings = TrainSettings(),
                    *, replay: Sequence[str] | None = None, parent: str | None = None,
                    rehearse: Sequence[Item] = (), nonmembers: Sequence[Item] = (),
                    progress: Callable[[int, int, float], None] = lambda d, t, l: None
                    ) -> ShardReport:
        """Train a shard on `items` (and `rehearse`: earlier items replayed), continuing from
        `parent` when given; audit it; save adapter and manifest; register it.

        The shard is recorded as holding everything in its weights: its items, the rehearsed
        ones and its parent's, so deleting any of them makes it stale too."""
        if not items:
            raise InvalidInputError("nothing to consolidate: no active items in the selection")
        started = time.perf_counter()
        per_item = [item_samples(i) for i in items]
        train = [s for p in per_item for s in p.train] + \
            [s for i in rehearse for s in item_samples(i).train]
        model = self._fresh_model()
        parent_row = self._shard(parent) if parent else None
        trainer = Trainer(model, self.lm.tokenizer, settings,
                          str(self._folder(parent_row)) if parent_row else None)
        replayed = self._replay_samples(trainer, replay) \
            if settings.method != "none" or settings.protect else []
        curve = trainer.train(train, replayed, progress)
        result = self.audit_model(trainer.model, per_item, nonmembers,
                                  controls=settings.audit_controls,
                                  candidates=settings.audit_candidates)
        items = self._lineage(items, rehearse, parent_row)
        shard_id = f"shard_{uuid.uuid4().hex[:12]}"
        folder = self.store.shard_dir / shard_id
        trainer.model.save_pretrained(str(folder))
        if trainer.gate is not None:
            trainer.gate.save(folder)
        manifest = self._manifest(shard_id, items, settings, curve, result, parent, replay,
                                  len(replayed), len(train))
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        self._register(shard_id, items, parent)
        return ShardReport(shard_id, len(items), len(train),
                           round(time.perf_counter() - started, 1),
                           round(curve.steps[-1]["fact_loss"], 4), result)

    def merge(self, shard_ids: Sequence[str], *, combination: str = "cat",
              weights: Sequence[float] | None = None, replace: bool = False,
              nonmembers: Sequence[Item] = ()) -> ShardReport:
        """One shard from several (peft add_weighted_adapter): "cat" stacks the adapters, so the
        merged update is exactly the weighted sum of theirs (rank = sum of ranks); "ties" and
        "dare_ties" trim and sign-elect (density 0.5); "svd" refits the sum at the largest rank.
        The new shard holds every item its sources held and is audited on their live items;
        with `replace` the sources are dropped in the same transaction as it is registered."""
        if len(shard_ids) < 2 or len(set(shard_ids)) != len(shard_ids):
            raise InvalidInputError("merge needs two or more different shards")
        if combination not in MERGES:
            raise InvalidInputError(f"combination must be one of {', '.join(MERGES)}")
        weights = list(weights) if weights is not None else [1.0] * len(shard_ids)
        if len(weights) != len(shard_ids):
            raise InvalidInputError("one weight per shard")
        from peft import PeftModel

        started = time.perf_counter()
        rows = [self._shard(s) for s in shard_ids]
        if any(r.model_key != self.lm.key for r in rows):
            raise TierError("shards of another base model cannot be merged here")
        gate = _same_gate([self._folder(r) for r in rows])
        model = PeftModel.from_pretrained(self._fresh_model(), str(self._folder(rows[0])),
                                          adapter_name="s0")
        for n, row in enumerate(rows[1:], 1):
            model.load_adapter(str(self._folder(row)), adapter_name=f"s{n}")
        names = [f"s{n}" for n in range(len(rows))]
        extra = {"density": 0.5} if "ties" in combination or "dare" in combination else {}
        model.add_weighted_adapter(names, weights, "merged", combination_type=combination,
                                   **extra)
        model.set_adapter("merged")
        for name in names:
            model.delete_adapter(name)
        if gate is not None:  # the sources' gate (one, shared) gates the sum of their updates
            install_saved(model, gate, "merged")
        model.eval()
        held = self.store.items_by_id([i for r in rows for i in r.item_ids])
        live = [i for i in held.values() if i.status == "active"]
        result = self.audit_model(model, [item_samples(i) for i in live], nonmembers,
                                  **self.audit_size(shard_ids[0]))
        shard_id = f"shard_{uuid.uuid4().hex[:12]}"
        folder = self.store.shard_dir / shard_id
        model.save_pretrained(str(folder), selected_adapters=["merged"])
        _flatten(folder, "merged")
        if gate is not None:
            shutil.copyfile(gate / GATE_FILE, folder / GATE_FILE)
        manifest = {**self._manifest(shard_id, list(held.values()), None, None, result, None,
                                     None, 0, 0),
                    "merged_from": list(shard_ids), "combination": combination,
                    "weights": weights}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        self._register(shard_id, list(held.values()), None,
                       drop=list(shard_ids) if replace else [])
        return ShardReport(shard_id, len(held), 0, round(time.perf_counter() - started, 1),
                           0.0, result)

    def _lineage(self, items: Sequence[Item], rehearse: Sequence[Item],
                 parent: ShardRow | None) -> list[Item]:
        held = {i.id: i for i in [*items, *rehearse]}
        inherited = self.store.items_by_id(parent.item_ids) if parent else {}
        for item_id, item in inherited.items():
            held.setdefault(item_id, item)
        return list(held.values())

    def _fresh_model(self) -> Any:
        """A model of its own for training (peft changes the module it wraps)."""
        return LocalModel.load(self.lm.folder).model

    def _replay_samples(self, trainer: Trainer, given: Sequence[str] | None) -> list[Sample]:
        if given:
            return [Sample("Continue the text.", t) for t in given]
        if self.lm.key not in _REPLAY:  # the base model's own answers, made once per model
            _REPLAY[self.lm.key] = self._self_synthesized(trainer)
        return _REPLAY[self.lm.key]

    def _self_synthesized(self, trainer: Trainer) -> list[Sample]:
        """Read from the cache directory when this model already answered these prompts."""
        digest = hashlib.sha256(json.dumps([self.lm.key, REPLAY_PROMPTS]).encode()).hexdigest()
        path = models_dir() / "replay" / f"{digest[:24]}.json"
        try:
            return [Sample(**row) for row in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            pass
        samples = self_synthesized(trainer.model, self.lm.tokenizer, base=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps([s.__dict__ for s in samples]))
            tmp.replace(path)
        except OSError:  # a read-only cache only costs the next process the same minute
            pass
        return samples

    def _manifest(self, shard_id: str, items: Sequence[Item], settings: TrainSettings | None,
                  curve: Any, result: dict[str, Any], parent: str | None,
                  replay: Sequence[str] | None, replayed: int, samples: int) -> dict[str, Any]:
        return {"id": shard_id, "base": self.lm.identity, "parent": parent,
                "items": [{"id": i.id, "content_hash": i.content_hash} for i in items],
                "settings": settings.to_dict() if settings else {}, "samples": samples,
                "schedule": _schedule(settings.resolve(samples)) if settings else {},
                "replay": {"source": "given" if replay else "self-synthesized",
                           "samples": replayed},
                "curve": curve.steps if curve else [],
                "train_seconds": curve.seconds if curve else 0.0, "audit": result,
                "created_at": time.time()}

    def _register(self, shard_id: str, items: Sequence[Item], parent: str | None,
                  drop: Sequence[str] = ()) -> None:
        store = self.store
        with store.transaction():
            for old in drop:
                store.drop_shard(old)
            current = store.items_by_id([i.id for i in items])
            changed = [i.id for i in items if i.id not in current
                       or current[i.id].content_hash != i.content_hash
                       or current[i.id].status != "active"]
            row = ShardRow(shard_id, store.cube(items[0].cube).id, self.lm.key, shard_id,
                           [i.id for i in items], parent, "stale" if changed else "active",
                           changed, time.time())
            store.insert_shard(row)

    # audits ----------------------------------------------------------------------------------
    def audit_model(self, model: Any, per_item: Sequence[ItemSamples],
                    nonmembers: Sequence[Item] = (), *, controls: int = len(CONTROL_PROMPTS),
                    candidates: int = 200) -> dict[str, Any]:
        """Every audit of an adapted model on its items. `controls` (the first n control
        prompts) and `candidates` (random secrets per canary) size it; both are recorded in
        the result, and a later audit of the same shard uses them again."""
        tok, prompts = self.lm.tokenizer, CONTROL_PROMPTS[:controls]
        reliable = audits.recall(model, tok, per_item)
        general = audits.recall(model, tok, per_item, heldout=True)
        base = self._base_side(model, prompts)
        answers = [base["answers"][p] for p in prompts]
        ppl, base_ppl = audits.perplexity(model, tok), base["perplexity"]
        same = audits.same_answers(model, tok, prompts, reference=answers)
        out: dict[str, Any] = {
            "reliability": round(sum(reliable) / len(reliable), 4),
            "generalization": round(sum(general) / len(general), 4),
            "locality": round(sum(same) / len(same), 4),
            "locality_tokens": round(audits.token_agreement(model, tok, prompts,
                                                            reference=answers), 4),
            "perplexity": round(ppl, 3), "base_perplexity": round(base_ppl, 3),
            "perplexity_increase": round(ppl / base_ppl - 1, 4),
            "k_extractable": round(audits.extractable(model, tok, per_item), 4),
            "controls": len(prompts), "canary_candidates": candidates,
            "per_item": {s.item.id: {"reliable": r, "generalized": g}
                         for s, r, g in zip(per_item, reliable, general)},
            "per_control": dict(zip(prompts, same))}
        canaries = [(s, s.item.metadata.get("canary")) for s in per_item
                    if isinstance((s.item.metadata or {}).get("canary"), str)]
        if canaries:
            out["canary_exposure"] = {
                s.item.id: round(audits.exposure(model, tok, s, secret, candidates), 3)
                for s, secret in canaries}
        if nonmembers:
            out["membership_auc"] = audits.membership(model, tok, per_item,
                                                      [item_samples(i) for i in nonmembers])
        return out

    def _base_side(self, model: Any, prompts: Sequence[str]) -> dict[str, Any]:
        """The base model's answers to the control prompts and its perplexity (adapter off):
        the same for every shard of this model, so computed once per process and prompt."""
        base = _BASE.setdefault(self.lm.key, {"answers": {}})
        missing = [p for p in prompts if p not in base["answers"]]
        if missing:
            base["answers"].update(zip(missing, audits.base_answers(model, self.lm.tokenizer,
                                                                    missing)))
        if "perplexity" not in base:
            base["perplexity"] = audits.perplexity(model, self.lm.tokenizer, base=True)
        return base

    def audit_size(self, shard_id: str) -> dict[str, int]:
        """The size its last audit had (the defaults for shards audited before it was kept)."""
        audit = self.manifest(shard_id).get("audit") or {}
        return {"controls": audit.get("controls", len(CONTROL_PROMPTS)),
                "candidates": audit.get("canary_candidates", 200)}

    def load(self, shard_id: str) -> Any:
        """The base model with the shard's adapter, a model of its own (for audits)."""
        from peft import PeftModel

        folder = self._checked(shard_id)
        model = PeftModel.from_pretrained(self._fresh_model(), str(folder))
        install_saved(model, folder, "default")
        return model.eval()

    def _checked(self, shard_id: str) -> Any:
        """The folder of a shard trained on this tier's base model."""
        row = self._shard(shard_id)
        if self.manifest(shard_id)["base"]["weights_sha256"] != self.lm.weights:
            raise TierError(f"shard {shard_id} was trained on another base model")
        return self._folder(row)

    def _hosted_model(self, shard_id: str) -> Any:
        """The shard's adapter active on the host model: loaded once, kept while it is among
        the HOSTED most recently asked (a shard's weights never change: a retrain is a new
        shard). The caller holds `_hosting` while it uses the model."""
        from peft import PeftModel

        if shard_id not in self._hosted:
            folder = self._checked(shard_id)
            if self._host is None:
                self._host = PeftModel.from_pretrained(self._fresh_model(), str(folder),
                                                       adapter_name=shard_id)
            else:
                self._host.load_adapter(str(folder), adapter_name=shard_id)
            install_saved(self._host, folder, shard_id)
            self._hosted[shard_id] = None
        self._hosted.move_to_end(shard_id)
        self._host.set_adapter(shard_id)
        while len(self._hosted) > HOSTED:
            self._host.delete_adapter(self._hosted.popitem(last=False)[0])
        return self._host.eval()

    def manifest(self, shard_id: str) -> dict[str, Any]:
        return json.loads((self._folder(self._shard(shard_id)) / "manifest.json").read_text())

    # use -------------------------------------------------------------------------------------
    def route(self, query: str, *, user_id: str | None = None, agent_id: str | None = None,
              cube: str | Sequence[str] | None = None, top_k: int = 10,
              min_similarity: float = ROUTE_MIN_SIMILARITY) -> str | None:
        """The active shard of this model that holds most of the query's best search hits
        (weighted by rank): routing by similarity between the query and each shard's items.
        Only hits whose embedding similarity to the query reaches `min_similarity` vote, so a
        question about nothing consolidated goes to no shard (the base model answers it).
        Only the cubes searched (`cube`, or the default) vote, and a shard is chosen only if
        all it holds is in them."""
        votes: dict[str, float] = {}
        cubes = {c.name for c in self.searcher.cubes.for_reading(cube)}
        for rank, hit in enumerate(self.searcher.find(query, user_id=user_id, agent_id=agent_id,
                                                     cube=cube, top_k=top_k,
                                                     feedback=False)):
            if hit.scores.get("vector", 0.0) < min_similarity:
                continue
            for shard_id in hit.item.shards:
                votes[shard_id] = votes.get(shard_id, 0.0) + 1.0 / (rank + 1)
        for shard_id in sorted(votes, key=votes.get, reverse=True):  # type: ignore[arg-type]
            row = self.store.shard(shard_id)
            if row and row.status == "active" and row.model_key == self.lm.key and \
                    self._within(row.item_ids, user_id, agent_id, cubes):
                return shard_id
        return None

    def _within(self, item_ids: Sequence[str], user_id: str | None, agent_id: str | None,
                cubes: set[str]) -> bool:
        """A shard answers a scoped question only if everything in its weights is of that
        scope: a shard trained on a whole cube also holds other users' memories, and one
        trained on chosen ids (or continued from a parent) may hold other cubes' items."""
        items, now = self.store.items_by_id(item_ids), utcnow()
        return len(items) == len(set(item_ids)) and all(
            i.cube in cubes and (user_id is None or i.user_id == user_id) and
            (agent_id is None or i.agent_id == agent_id) and
            (i.expires_at is None or i.expires_at > now)  # expired: not until retrained
            for i in items.values())

    def ask(self, question: str, shard_id: str | None, *, max_new_tokens: int = 64) -> str:
        """The shard's model (the base model for None) answers from its weights alone (no
        retrieval), greedily."""
        from .audit import _chat, greedy

        if shard_id and self._shard(shard_id).status != "active":
            raise InvalidInputError(f"shard {shard_id} is stale (an item it holds changed or was "
                                    "deleted): run maintain, or ask another shard")
        prompt = [_chat(self.lm.tokenizer, question)]
        if shard_id is None:
            reply = greedy(self.lm.model, self.lm.tokenizer, prompt, max_new_tokens)[0]
        else:
            with self._hosting:  # the host's active adapter is shared state
                reply = greedy(self._hosted_model(shard_id), self.lm.tokenizer, prompt,
                               max_new_tokens)[0]
        return self.lm.tokenizer.decode(reply, skip_special_tokens=True).strip()

    # upkeep ----------------------------------------------------------------------------------
    def maintain(self, settings: TrainSettings | None = None,
                 progress: Callable[[int, int, float], None] = lambda d, t, l: None
                 ) -> list[dict[str, Any]]:
        """Retrain each stale shard of this model on its items that are still active (their
        current text), from the base model, or drop it when none is left."""
        return [self.retrain(row, settings, progress) for row in self.stale()]

    def stale(self) -> list[ShardRow]:
        """This model's stale shards, oldest first."""
        return [r for r in self.store.shards(status="stale") if r.model_key == self.lm.key]

    def retrain(self, row: ShardRow, settings: TrainSettings | None = None,
                progress: Callable[[int, int, float], None] = lambda d, t, l: None
                ) -> dict[str, Any]:
        """One stale shard retrained on its live items with its own settings (or `settings`),
        or dropped when none is left; the old shard goes either way."""
        left = [i for i in self.store.items_by_id(row.item_ids).values()
                if i.status == "active"]
        new = None
        if left:
            old = self.manifest(row.id)
            kept = settings or TrainSettings(**{k: tuple(v) if k == "targets" else v
                                                for k, v in old["settings"].items()})
            new = self.consolidate(left, kept, progress=progress).id
        with self.store.transaction():
            self.store.drop_shard(row.id)
        return {"stale": row.id, "changed_items": row.changed_items, "retrained": new}

    def _shard(self, shard_id: str) -> ShardRow:
        row = self.store.shard(shard_id)
        if row is None:
            raise NotFoundError(f"no shard {shard_id!r}; list them with `memstack shards`")
        return row

    def _folder(self, row: ShardRow) -> Any:
        return self.store.shard_dir / row.folder


def _schedule(settings: TrainSettings) -> dict[str, Any]:
    """What the schedule made of the settings for this shard's samples."""
    return {"epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr,
            "reg_weight": settings.reg_weight}


def _same_gate(folders: Sequence[Any]) -> Any:
    """The folder of the gate the shards share (None when none has one); shards with
    different gates, or some gated and some not, cannot be merged."""
    digests = {hashlib.sha256((f / GATE_FILE).read_bytes()).hexdigest()
               if (f / GATE_FILE).exists() else None for f in folders}
    if len(digests) > 1:
        raise InvalidInputError("these shards were trained with different gates (or some "
                                "with one and some without): they cannot be merged; ask them "
                                "through routing instead")
    return folders[0] if digests != {None} else None


def _flatten(folder: Any, adapter: str) -> None:
    """peft saves a non-default adapter in a subfolder; a shard keeps its adapter at the top."""
    sub = folder / adapter
    if sub.is_dir():
        for path in sub.iterdir():
            path.replace(folder / path.name)
        sub.rmdir()
