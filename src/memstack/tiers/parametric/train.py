"""LoRA training of a shard on memory samples, with a selectable guard against forgetting.

Methods (each measured against the others by `memstack bench consolidate`):
- "none": facts only.
- "replay": facts plus general samples by plain next-token loss (rehearsal). The samples are
  the base model's own answers to general prompts (self-synthesized rehearsal) or texts given.
- "replay_kl": replay plus KL(base || adapted) on the replay tokens' next-token distributions.
- "replay_l2": replay plus the squared distance between adapted and base final hidden states
  (averaged over dimensions, like the GeRe term, so one weight means the same for both).
- "replay_gere": replay plus GeRe's threshold-margin loss (Zhang et al. 2025, "GeRe: Towards
  Efficient Anti-Forgetting in Continual Learning of LLM via General Samples Replay"): per
  dimension of the final hidden state, bands mean +- one standard deviation computed with the
  adapter disabled over the replay set; a token's activation is penalised only when it leaves
  the band (low, middle, high) the base model put it in, by how far it left.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

from ..._errors import InvalidInputError
from .decoding import _chat, _end, collate, greedy
from .gate import Gate, general_subspaces, project, protected
from .samples import CONTROL_PROMPTS, Sample

Method = Literal["none", "replay", "replay_kl", "replay_l2", "replay_gere"]
METHODS: tuple[str, ...] = ("none", "replay", "replay_kl", "replay_l2", "replay_gere")
REPLAY_PROMPTS = (  # general prompts whose base-model answers become replay samples
    "Explain what a library is.", "Describe a sunny day.", "What is a bicycle used for?",
    "Give one tip for learning a new language.", "Why do people drink water?",
    "Describe a cat in two sentences.", "What is the purpose of a calendar?",
    "How do you make a cup of tea?", "Name three things found in a kitchen.",
    "What happens in autumn?", "Why is sleep important?", "What does a teacher do?",
    "Describe the sea.", "How does a train work?", "What is a good breakfast?",
    "Why do birds fly south in winter?", "What is the tallest mountain in the world?",
    "How many days are in a week?", "What colour is the sky on a clear day?",
    "Which animal is known as the king of the jungle?", "What do plants need to grow?",
    "What is the opposite of hot?", "How many hours are in a day?",
    "What is the largest ocean on Earth?", "What do cows drink?",
    "Which instrument has black and white keys?", "What is ice made of?",
    "What gas do humans breathe in?", "Name a vegetable that is orange.",
    "What is the boiling point of water in Celsius?", "Which month comes after June?",
    "What shape has three sides?", "Who wrote Romeo and Juliet?",
    "What is the main language of Brazil?", "How many continents are there?",
    "What do you call a baby dog?", "Which is bigger, the Sun or the Moon?",
    "What is a synonym for happy?", "Write one sentence about friendship.",
    "Give an example of a mammal that lives in the sea.", "What is rain?",
    "Summarise what a doctor does.", "How do you say hello in French?",
    "What is the freezing point of water?", "What are clouds made of?",
    "Name a famous painter.", "Why do we need bridges?", "What is a computer?") + tuple(
    template.format(topic) for n, topic in enumerate((
        "an umbrella", "a volcano", "a piano", "a passport", "a telescope", "a garden",
        "an airport", "a lighthouse", "a compass", "a desert", "chess", "football",
        "a microscope", "a vaccine", "a battery", "a market", "a museum", "a map", "a candle",
        "a mirror", "a ladder", "a tent", "a kite", "a clock", "a wallet", "a newspaper",
        "an orchestra", "a glacier", "an island", "a harbour", "a tractor", "a submarine",
        "a helicopter", "a satellite", "a hospital", "a farm", "a castle", "an elephant",
        "a penguin", "a dolphin", "an owl", "a tomato", "rice", "cheese", "wool", "cotton",
        "glass", "email", "a password", "a keyboard", "a printer", "a camera", "a thermometer",
        "a magnet", "an earthquake", "the tide", "snow", "thunder", "the wind", "a vitamin",
        "a muscle", "the heart", "a river", "a violin", "a sandwich", "a bicycle helmet",
        "a swimming pool", "a zoo", "a bank", "a post office", "a recipe", "a birthday",
        "a holiday", "a suitcase", "a rocket", "an engine", "a robot", "a spreadsheet",
        "a poem", "a novel", "a theatre", "a stadium", "a tunnel", "a canal", "a campfire",
        "a fossil", "a dinosaur", "a whale", "a butterfly", "a mushroom", "a cactus", "a rose",
        "an apple tree", "a pumpkin", "a carrot", "soap"))
    for template in (("Tell me about {}.", "What is the purpose of {}?",
                      "Describe {} briefly.", "Explain {} to a child.")[n % 4],
                     ("What is the purpose of {}?", "Describe {} briefly.",
                      "Explain {} to a child.", "Tell me about {}.")[n % 4]))


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one shard (the manifest records them as given and, under "schedule",
    what resolve() made of them for the shard's samples). The defaults are the best measured
    at 200 facts (docs/benchmarks.md): replay + KL at weight 3, lr 2e-3, 5 epochs; with `epochs`
    None a smaller scope gets more: at least `min_epochs` and enough for `min_steps` optimizer
    steps, so 8 facts get 152 updates, not 20."""

    method: Method = "replay_kl"
    rank: int = 16
    alpha: int = 32
    lr: float = 2e-3
    epochs: int | None = None  # None: from the schedule (resolve)
    min_epochs: int = 5
    min_steps: int = 150
    max_epochs: int = 60
    batch_size: int = 8
    replay_batch: int = 4
    # the regulariser's weight (None: from the schedule): 3 at the scale it was tuned at (200
    # facts: 5 epochs); for replay_kl with the schedule's epochs, `small_reg_weight` when a
    # small scope's schedule adds epochs, so its few samples are seen many times and the
    # update drifts further from the base model
    reg_weight: float | None = None
    small_reg_weight: float = 10.0
    max_tokens: int = 96
    answer_end: bool = True  # teach the end-of-turn token after a memory's answer
    # locality of the adapter itself: the share of general text's input energy, per adapted
    # layer, whose directions the adapter may not read (0: off). With 0.99 the update of each
    # layer sees only the directions that general text barely uses (a null-space constraint,
    # as AlphaEdit's for edits), so on unrelated prompts it adds almost nothing.
    protect: float = 0.0
    # the adapter's own gate (gate.py; needs protect): per token and layer, the adapter acts
    # only when the input's share of energy outside general text's subspace exceeds this
    # quantile of the same share over general text's tokens (0: off)
    gate: float = 0.0
    # LiNeS (Wang et al. 2024): after training, the update of layer l of L is scaled by
    # lines + (1 - lines) * l / (L - 1), so shallow layers, which hold general features, change
    # least (1: off)
    lines: float = 1.0
    seed: int = 0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                "up_proj", "down_proj")
    # the audit's size: control prompts for locality (the first n of 40) and random secrets
    # each canary is ranked against; smaller is faster with coarser figures (exposure is at
    # most log2(candidates + 1) bits; one control prompt is 1/n of locality)
    audit_controls: int = 40
    audit_candidates: int = 200

    def check(self) -> "TrainSettings":
        if self.method not in METHODS:
            raise InvalidInputError(f"method must be one of {', '.join(METHODS)}")
        epochs = 1 if self.epochs is None else self.epochs
        if min(self.rank, self.alpha, epochs, self.batch_size, self.replay_batch,
               self.min_epochs, self.min_steps) < 1 or self.max_epochs < self.min_epochs \
                or not 0 < self.lr < 1 or (self.reg_weight or 0) < 0 \
                or self.small_reg_weight < 0 or self.max_tokens < 16 \
                or not 0 <= self.protect < 1 or not 0 <= self.lines <= 1 \
                or not 0 <= self.gate <= 1 or (self.gate and not self.protect):
            raise InvalidInputError("rank, alpha, epochs, batch sizes, min_steps >= 1; "
                                    "min_epochs <= max_epochs; 0 < lr < 1; reg_weight >= 0; "
                                    "max_tokens >= 16; 0 <= protect < 1; 0 <= lines <= 1; "
                                    "0 <= gate <= 1, and a gate needs protect")
        if not 1 <= self.audit_controls <= len(CONTROL_PROMPTS) or self.audit_candidates < 10:
            raise InvalidInputError(f"audit_controls is 1 to {len(CONTROL_PROMPTS)}; "
                                    "audit_candidates >= 10")
        return self

    def resolve(self, samples: int) -> "TrainSettings":
        """These settings for `samples` training samples: the batch no larger than the data,
        the epochs from the schedule unless given."""
        batch = max(1, min(self.batch_size, samples))
        epochs = self.epochs
        if epochs is None:
            per_epoch = -(-samples // batch)
            epochs = min(self.max_epochs, max(self.min_epochs, -(-self.min_steps // per_epoch)))
        weight = self.reg_weight
        if weight is None:  # measured for KL only, on the schedule's own epochs
            small = self.epochs is None and epochs > self.min_epochs and \
                self.method == "replay_kl"
            weight = self.small_reg_weight if small else 3.0
        return replace(self, batch_size=batch, epochs=epochs, reg_weight=weight)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode(tokenizer: Any, sample: Sample, max_tokens: int, end: bool = True
           ) -> tuple[list[int], list[int]]:
    """Chat-formatted prompt and answer; the loss is on the answer and, when the answer is
    complete and `end` is set, its end-of-turn token; never on the prompt."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}],
                                           tokenize=False, add_generation_prompt=True)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + \
        ([_end(tokenizer)] if end and sample.ended else [])
    ids = (p + a)[:max_tokens]
    return ids, ([-100] * len(p) + a)[:max_tokens]


def self_synthesized(model: Any, tokenizer: Any, prompts: Sequence[str] = REPLAY_PROMPTS,
                     max_new_tokens: int = 64, base: bool = False) -> list[Sample]:
    """Replay samples written by the base model itself: its greedy answers to general prompts
    (batched; `base` turns an adapter off)."""
    replies = greedy(model, tokenizer, [_chat(tokenizer, p) for p in prompts], max_new_tokens,
                     base=base)
    out = []
    for prompt, reply in zip(prompts, replies):
        answer = tokenizer.decode(reply, skip_special_tokens=True).strip()
        if answer:  # an answer cut at max_new_tokens must not teach stopping there
            out.append(Sample(prompt, answer, ended=len(reply) < max_new_tokens))
    return out


@dataclass
class Curve:
    steps: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    """One LoRA adapter on a model (a PeftModel around it); train() then save or audit."""

    def __init__(self, model: Any, tokenizer: Any, settings: TrainSettings,
                 adapter_from: str | None = None) -> None:
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model

        self.settings, self.tokenizer = settings.check(), tokenizer  # resolved by the caller
        torch.manual_seed(settings.seed)
        if adapter_from:  # continue from an earlier shard (sequential consolidation)
            self.model = PeftModel.from_pretrained(model, adapter_from, is_trainable=True)
        else:
            config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                                target_modules=list(settings.targets), task_type="CAUSAL_LM")
            self.model = get_peft_model(model, config)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _end(tokenizer)
        self.gate: Gate | None = None  # set by train() when settings.gate

    def train(self, samples: Sequence[Sample], replay: Sequence[Sample] = (),
              progress: Callable[[int, int, float], None] = lambda d, t, l: None) -> Curve:
        import torch

        s = self.settings = self.settings.resolve(len(samples))
        rng = random.Random(s.seed)
        facts = [encode(self.tokenizer, x, s.max_tokens, s.answer_end) for x in samples]
        general = [encode(self.tokenizer, x, s.max_tokens) for x in replay] \
            if s.method != "none" or s.protect else []
        if (s.method != "none" or s.protect) and not general:
            raise InvalidInputError(f"method {s.method}" + (" with protect" if s.protect else "")
                                    + " needs replay samples")
        subspaces = general_subspaces(self.model, general, s.protect, self.pad) \
            if s.protect else {}
        free = protected(self.model, subspaces)
        if s.gate:
            self.gate = Gate.calibrate(self.model, general, subspaces, s.gate, self.pad)
            self.gate.install(self.model, self.model.active_adapter)
        general = general if s.method != "none" else []
        anchors = self._anchors(general) if s.method in ("replay_l2", "replay_gere") else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=s.lr)
        per_epoch = max(1, (len(facts) + s.batch_size - 1) // s.batch_size)
        total, curve, started = per_epoch * s.epochs, Curve(), time.perf_counter()
        project(free)
        self.model.train()
        for step in range(total):
            if step % per_epoch == 0:
                order = rng.sample(range(len(facts)), len(facts))
            chunk = order[(step % per_epoch) * s.batch_size:][:s.batch_size]
            loss, parts = self._step([facts[i] for i in chunk], general, anchors, rng)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            project(free)
            curve.steps.append({"step": step + 1, **parts})
            progress(step + 1, total, parts["loss"])
        self.model.eval()
        if s.lines < 1:
            scale_by_depth(self.model, s.lines)
        curve.seconds = round(time.perf_counter() - started, 1)
        return curve

    def _step(self, batch: list, general: list, anchors: Any, rng: random.Random
              ) -> tuple[Any, dict[str, float]]:
        x, y, mask = collate(batch, self.pad)
        fact_loss = self.model(input_ids=x, attention_mask=mask, labels=y).loss
        parts = {"fact_loss": float(fact_loss.detach())}
        loss = fact_loss
        if general:
            picked = rng.sample(range(len(general)), min(self.settings.replay_batch, len(general)))
            gx, gy, gmask = collate([general[i] for i in picked], self.pad)
            out = self.model(input_ids=gx, attention_mask=gmask, labels=gy,
                             output_hidden_states=self.settings.method != "replay")
            parts["replay_loss"] = float(out.loss.detach())
            loss = loss + out.loss
            reg = self._regulariser(out, gx, gmask, picked, anchors)
            if reg is not None:
                parts["reg"] = float(reg.detach())
                loss = loss + self.settings.reg_weight * reg
        parts["loss"] = float(loss.detach())
        return loss, parts

    def _regulariser(self, out: Any, x: Any, mask: Any, picked: list[int], anchors: Any) -> Any:
        import torch
        import torch.nn.functional as F

        method, valid = self.settings.method, mask.bool()
        if method == "replay_kl":
            with torch.no_grad(), self.model.disable_adapter():
                base = self.model(input_ids=x, attention_mask=mask).logits
            kl = F.kl_div(F.log_softmax(out.logits, -1), F.log_softmax(base, -1),
                          log_target=True, reduction="none").sum(-1)  # (B, T)
            return kl[valid].mean()
        if method not in ("replay_l2", "replay_gere"):
            return None
        h = out.hidden_states[-1]  # (B, T, D), after the final norm
        base_h = _gather(anchors["hidden"], picked, h.shape)
        if method == "replay_l2":
            return ((h - base_h) ** 2).mean(-1)[valid].mean()
        low, high = anchors["mean"] - anchors["std"], anchors["mean"] + anchors["std"]
        band = _gather(anchors["band"], picked, h.shape)  # 0 low, 1 middle, 2 high
        over = torch.where(band == 0, F.relu(h - low),
                           torch.where(band == 2, F.relu(high - h),
                                       F.relu(low - h) + F.relu(h - high)))
        return over.mean(-1)[valid].mean()

    def _anchors(self, general: list) -> dict[str, Any]:
        """Final hidden states of the replay set with the adapter disabled, their per-dimension
        mean and standard deviation, and each token's band."""
        import torch

        hidden = []
        with torch.no_grad(), self.model.disable_adapter():
            for ids, labels in general:
                x, _, mask = collate([(ids, labels)], self.pad)
                hidden.append(self.model(input_ids=x, attention_mask=mask,
                                         output_hidden_states=True).hidden_states[-1][0])
        flat = torch.cat(hidden)  # (all tokens, D)
        mean, std = flat.mean(0), flat.std(0)
        bands = [(h > mean - std).long() + (h > mean + std).long() for h in hidden]
        return {"hidden": hidden, "band": bands, "mean": mean, "std": std}


def scale_by_depth(model: Any, first: float) -> None:
    """LiNeS: each layer's LoRA B scaled from `first` (layer 0) linearly up to 1 (last)."""
    import re

    import torch
    from peft.tuners.lora import LoraLayer

    layers = [(int(m.group(1)), module) for name, module in model.named_modules()
              if isinstance(module, LoraLayer) and (m := re.search(r"\.layers\.(\d+)\.", name))]
    deepest = max((n for n, _ in layers), default=0) or 1
    with torch.no_grad():
        for n, module in layers:
            for b in module.lora_B.values():
                b.weight.mul_(first + (1 - first) * n / deepest)


def _gather(per_sample: list, picked: list[int], shape: Any) -> Any:
    """Per-sample (T_i, D) tensors of the picked samples, right-padded to (B, T, D)."""
    import torch

    out = torch.zeros(shape, dtype=per_sample[0].dtype)
    for row, i in enumerate(picked):
        t = per_sample[i][:shape[1]]
        out[row, :t.shape[0]] = t
    return out
