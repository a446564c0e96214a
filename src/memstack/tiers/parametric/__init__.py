"""The parametric tier: LoRA shards trained on stable memories, with replay against forgetting,
and audits of what they memorized.

>>> report = m.consolidate(model="smollm2", user_id="ann")
>>> report.audit["reliability"], report.audit["perplexity_increase"]
"""

from .samples import ItemSamples, Sample, item_samples
from .tier import ParametricTier, ShardReport
from .train import METHODS, Trainer, TrainSettings

__all__ = ["ParametricTier", "ShardReport", "TrainSettings", "Trainer", "METHODS", "Sample",
           "ItemSamples", "item_samples"]
