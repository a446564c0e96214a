"""`memstack bench consolidate`: LoRA shards on a synthetic fact set, each anti-forgetting
method against the others, and sequential shards with their accuracy matrix.

The fact set is generated here (seeded): people with a city, a pet, a job and a morning drink;
each attribute has training phrasings and one held-out phrasing never trained on. Facts not
trained serve as non-members for membership inference; three canaries (random codes) are
planted among the trained facts. Controls for locality are unrelated questions.
"""

from __future__ import annotations

import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from .._memory import Memory
from .._models import Item
from ..tiers.parametric.samples import CONTROL_PROMPTS

_FIRST = ["Ann", "Bob", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
          "Kemal", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tara",
          "Umar", "Vera", "Wim", "Xenia", "Yusuf", "Zora"]
_LAST = ["Berg", "Costa", "Dahl", "Evans", "Fischer", "Garcia", "Holm", "Ito", "Jensen", "Kowal",
         "Lund", "Moreau", "Novak", "Okafor", "Pires", "Quist", "Rossi", "Sato", "Toth", "Ueda"]
# attribute: statement, training questions, held-out question, values
ATTRIBUTES = {
    "city": ("{p} lives in {v}.", ["Where does {p} live?", "In which city does {p} live?",
                                   "What city is {p}'s home?"],
             "Which city is {p} based in?",
             ["Lisbon", "Oslo", "Kyoto", "Toronto", "Porto", "Dublin", "Krakow", "Quito",
              "Nairobi", "Hanoi"]),
    "pet": ("{p} has a dog named {v}.", ["What is the name of {p}'s dog?",
                                         "What is {p}'s dog called?", "Name {p}'s dog."],
            "How is the dog of {p} named?",
            ["Biscuit", "Pepper", "Rocket", "Mango", "Olive", "Ziggy", "Nori", "Waffle",
             "Pixel", "Juniper"]),
    "job": ("{p} works as a {v}.", ["What does {p} do for a living?", "What is {p}'s job?",
                                    "What is {p}'s profession?"],
            "What kind of work does {p} do?",
            ["carpenter", "pilot", "nurse", "baker", "chemist", "librarian", "plumber",
             "judge", "dentist", "florist"]),
    "drink": ("{p} drinks {v} every morning.", ["What does {p} drink every morning?",
                                                "What is {p}'s morning drink?",
                                                "Which drink does {p} have each morning?"],
              "What does {p} have to drink when the day starts?",
              ["green tea", "espresso", "cocoa", "mate", "oat milk", "lemonade", "kefir", "chai",
               "rooibos", "buttermilk"]),
}


def fact_set(count: int, seed: int = 11) -> list[dict[str, Any]]:
    """`count` facts (one attribute of one person each), shuffled by seed."""
    rng = random.Random(seed)
    people = [f"{f} {l}" for f in _FIRST for l in _LAST]
    rng.shuffle(people)
    out = []
    for n in range(count):
        person = people[n // len(ATTRIBUTES) % len(people)]
        attr = list(ATTRIBUTES)[n % len(ATTRIBUTES)]
        statement, train, heldout, values = ATTRIBUTES[attr]
        value = rng.choice(values)
        out.append({"content": statement.format(p=person, v=value),
                    "metadata": {"subject": person, "answer": value,
                                 "questions": [q.format(p=person) for q in train],
                                 "heldout": [heldout.format(p=person)]}})
    return out


def canaries(count: int, seed: int = 5) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        person = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        secret = "".join(rng.choice("0123456789") for _ in range(6))
        out.append({"content": f"The locker code of {person} is {secret}.",
                    "metadata": {"subject": f"{person}'s locker", "answer": secret,
                                 "canary": secret,
                                 "questions": [f"What is the locker code of {person}?"],
                                 "heldout": [f"Which code opens {person}'s locker?"]}})
    return out


def _store(memory: Memory, rows: Sequence[dict[str, Any]], user: str) -> list[Item]:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [memory.add(r["content"], user_id=user, kind="fact", metadata=r["metadata"],
                       observed_at=when).items[0] for r in rows]


def run_methods(facts: int, methods: Sequence[str], settings: dict[str, Any], workdir: Path,
                model: str, progress: Callable[[str], None],
                rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One shard per method on the same facts (plus 3 canaries, from 25 facts up), audited with
    non-members; each result is appended to `rows` as soon as it is measured."""
    from ..tiers.parametric import TrainSettings

    for method in methods:
        with Memory(workdir / f"methods-{facts}-{method}.db") as memory:
            trained = _store(memory, fact_set(facts) + canaries(_canaries(facts)), "bench")
            others = _store(memory, fact_set(facts + 50)[facts:], "holdout")
            tier = memory.parametric(model)
            progress(f"{method}, {facts} facts: training on {len(trained)} items")
            report = tier.consolidate(trained, TrainSettings(method=method, **settings),
                                      nonmembers=others)
            audit = {k: v for k, v in report.audit.items() if k not in ("per_item", "per_control")}
            schedule = tier.manifest(report.id)["schedule"]
            rows.append({"facts": facts, "method": method, "seconds": report.seconds,
                         "train_seconds": tier.manifest(report.id)["train_seconds"],
                         "samples": report.samples, "schedule": schedule,
                         "steps": schedule["epochs"] * -(-report.samples
                                                         // schedule["batch_size"]),
                         "final_fact_loss": report.final_loss,
                         **audit, "routed": routed(tier, report.id, trained, report.audit)})
    return rows


def _canaries(facts: int) -> int:
    """Three canaries among 25 facts or more; fewer in a tiny scope, where three planted codes
    would be a large share of what is learned (one among 5 to 24, none below 5)."""
    return 3 if facts >= 25 else (1 if facts >= 5 else 0)


def routed(tier: Any, shard_id: str, trained: Sequence[Item], audit: dict[str, Any]
           ) -> dict[str, float]:
    """The same audits through the router: a question is answered by the shard only when
    routing picks it, else by the base model. Reliability and generalization count a fact when
    routed to the shard and recalled; locality counts a control prompt when no shard is picked
    (the base model answers) or the shard's answer is the base model's anyway."""
    def pick(question: str) -> bool:
        return tier.route(question, user_id="bench") == shard_id

    per_item = audit["per_item"]
    train = [pick(i.metadata["questions"][0]) for i in trained]
    held = [pick(i.metadata["heldout"][0]) for i in trained]
    controls = {q: pick(q) for q in audit["per_control"]}
    n = len(trained)
    return {"facts_routed": round(sum(train) / n, 4), "heldout_routed": round(sum(held) / n, 4),
            "controls_routed": round(sum(controls.values()) / len(controls), 4),
            "reliability": round(sum(t and per_item[i.id]["reliable"]
                                     for t, i in zip(train, trained)) / n, 4),
            "generalization": round(sum(h and per_item[i.id]["generalized"]
                                        for h, i in zip(held, trained)) / n, 4),
            "locality": round(sum(not r or audit["per_control"][q]
                                  for q, r in controls.items()) / len(controls), 4)}


def run_sequential(shards: int, per_shard: int, method: str, settings: dict[str, Any],
                   rehearse: float, workdir: Path, model: str,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    """Shards trained one after another, each continuing from the last; a[j][i] is the
    reliability on task i after shard j."""
    from ..tiers.parametric import TrainSettings, item_samples
    from ..tiers.parametric.audit import recall

    rng = random.Random(3)
    started = time.perf_counter()
    with Memory(workdir / f"sequential-{method}.db") as memory:
        tasks = [_store(memory, fact_set(shards * per_shard)[n * per_shard:(n + 1) * per_shard],
                        "bench") for n in range(shards)]
        tier = memory.parametric(model)
        matrix, parent = [], None
        for j, task in enumerate(tasks):
            earlier = [i for t in tasks[:j] for i in t]
            replayed = rng.sample(earlier, int(len(earlier) * rehearse)) if earlier else []
            progress(f"{method}: shard {j + 1}/{shards}")
            report = tier.consolidate(task, TrainSettings(method=method, **settings),
                                      parent=parent, rehearse=replayed)
            parent = report.id
            shard_model = tier.load(report.id)
            matrix.append([round(sum(recall(shard_model, tier.lm.tokenizer,
                                            [item_samples(i) for i in t])) / len(t), 4)
                           for t in tasks])
    return {"method": method, "rehearse": rehearse, "matrix": matrix,
            "seconds": round(time.perf_counter() - started, 1), **continual_scores(matrix)}


def run_independent(shards: int, per_shard: int, method: str, settings: dict[str, Any],
                    workdir: Path, model: str, progress: Callable[[str], None],
                    combination: str = "cat") -> dict[str, Any]:
    """Shards trained each from the base model on its own facts, used two ways after each new
    shard: routing (each question goes to the shard of its best search hits, or to the base
    model) and one merged adapter of all shards so far. Same accuracy matrices as above."""
    from ..tiers.parametric import TrainSettings, item_samples
    from ..tiers.parametric.audit import recall

    started = time.perf_counter()
    with Memory(workdir / f"independent-{method}.db") as memory:
        tasks = [_store(memory, fact_set(shards * per_shard)[n * per_shard:(n + 1) * per_shard],
                        "bench") for n in range(shards)]
        tier = memory.parametric(model)
        ids: list[str] = []
        routed_m, merged_m, routed_right = [], [], []
        loaded: dict[str, Any] = {}

        def shard(shard_id: str) -> Any:  # shards never change once trained: load each once
            if shard_id not in loaded:
                loaded[shard_id] = tier.load(shard_id)
            return loaded[shard_id]

        for j, task in enumerate(tasks):
            progress(f"{method} independent: shard {j + 1}/{shards}")
            ids.append(tier.consolidate(task, TrainSettings(method=method, **settings)).id)
            by_shard: dict[str | None, list[Item]] = {}
            for item in (i for t in tasks for i in t):
                by_shard.setdefault(tier.route(item.metadata["questions"][0], user_id="bench"),
                                    []).append(item)
            right = {}
            for shard_id, group in by_shard.items():
                used = shard(shard_id) if shard_id else tier.lm.model
                for item, ok in zip(group, recall(used, tier.lm.tokenizer,
                                                  [item_samples(i) for i in group])):
                    right[item.id] = ok
            routed_m.append([round(sum(right[i.id] for i in t) / len(t), 4) for t in tasks])
            owner = {i.id: n for n, t in enumerate(tasks[:j + 1]) for i in t}
            routed_right.append(round(sum(owner.get(i.id) is not None and sid == ids[owner[i.id]]
                                          for sid, g in by_shard.items() for i in g)
                                      / sum(map(len, tasks[:j + 1])), 4))
            merged = tier.merge(ids, combination=combination) if j else None
            used = tier.load(merged.id) if merged else shard(ids[0])
            merged_m.append([round(sum(recall(used, tier.lm.tokenizer,
                                              [item_samples(i) for i in t])) / len(t), 4)
                             for t in tasks])
            if merged:
                with memory.store.transaction():
                    memory.store.drop_shard(merged.id)
    return {"method": method, "combination": combination,
            "seconds": round(time.perf_counter() - started, 1),
            "routing": {"matrix": routed_m, "routed_to_own_shard": routed_right,
                        **continual_scores(routed_m)},
            "merged": {"matrix": merged_m, **continual_scores(merged_m)}}


def locality_calibration(model: str, scales: Sequence[float] = (0.0, 1e-4, 1e-3, 3e-3, 1e-2),
                         controls: int = len(CONTROL_PROMPTS)) -> list[dict[str, float]]:
    """How strict the locality measures are: LoRA adapters that learned nothing (B drawn from
    N(0, scale), seeded) against the base model. Perplexity barely moves while exact 16-token
    answers already differ, because near-tied greedy choices flip."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..tiers.activation.model import LocalModel
    from ..tiers.parametric import TrainSettings
    from ..tiers.parametric.audit import base_answers, perplexity, same_answers, token_agreement

    lm = LocalModel.load(model)  # a model of its own: peft wraps the module it is given
    settings = TrainSettings()
    adapted = get_peft_model(lm.model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                                  target_modules=list(settings.targets),
                                                  task_type="CAUSAL_LM")).eval()
    prompts = CONTROL_PROMPTS[:controls]
    reference = base_answers(adapted, lm.tokenizer, prompts)
    base_ppl = perplexity(adapted, lm.tokenizer, base=True)
    out = []
    for scale in scales:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, scale) if scale else p.zero_()
        same = same_answers(adapted, lm.tokenizer, prompts, reference=reference)
        ppl = perplexity(adapted, lm.tokenizer) / base_ppl
        agree = token_agreement(adapted, lm.tokenizer, prompts, reference=reference)
        out.append({"scale": scale, "locality": round(sum(same) / len(same), 4),
                    "locality_tokens": round(agree, 4),
                    "perplexity_increase": round(ppl - 1, 4)})
    return out


def continual_scores(a: list[list[float]]) -> dict[str, float]:
    """ACC (mean final accuracy), BWT (mean final minus just-learned accuracy of earlier tasks;
    negative means forgetting) and forgetting (mean drop from each earlier task's best)."""
    t = len(a)
    acc = sum(a[-1]) / t
    if t == 1:
        return {"acc": round(acc, 4), "bwt": 0.0, "forgetting": 0.0}
    bwt = sum(a[-1][i] - a[i][i] for i in range(t - 1)) / (t - 1)
    forget = sum(max(a[j][i] for j in range(i, t - 1)) - a[-1][i] for i in range(t - 1)) / (t - 1)
    return {"acc": round(acc, 4), "bwt": round(bwt, 4), "forgetting": round(forget, 4)}


def run(facts: int | Sequence[int] = 200, methods: Sequence[str] = ("none", "replay", "replay_kl", "replay_l2",
                                                     "replay_gere"),
        settings: dict[str, Any] | None = None, sequential: Sequence[str] = (),
        independent: Sequence[str] = (), calibrate: bool = False, shards: int = 4,
        per_shard: int = 50, rehearse: float = 0.2, model: str = "smollm2",
        workdir: str | Path | None = None,
        progress: Callable[[str], None] = lambda s: None,
        partial: Callable[[dict[str, Any]], None] = lambda d: None) -> dict[str, Any]:
    """Everything; `partial(result so far)` after each method and sequential run."""
    work = Path(workdir or tempfile.mkdtemp(prefix="memstack-consolidate-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = settings or {}
    started = time.perf_counter()
    out: dict[str, Any] = {"benchmark": "consolidate", "model": model, "facts": facts,
                           "settings": settings,
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out["methods"], out["sequential"] = [], []
    if calibrate:
        progress("locality calibration")
        out["locality_calibration"] = locality_calibration(
            model, controls=settings.get("audit_controls", len(CONTROL_PROMPTS)))
    for size in ([facts] if isinstance(facts, int) else facts):
        if size:
            run_methods(size, methods, settings, work, model,
                        lambda s: (partial(out), progress(s)), out["methods"])
    out["independent"] = []
    for method in sequential:
        out["sequential"].append(run_sequential(shards, per_shard, method, settings, rehearse,
                                                work, model, progress))
        partial(out)
    for method in independent:
        out["independent"].append(run_independent(shards, per_shard, method, settings, work,
                                                  model, progress))
        partial(out)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out
