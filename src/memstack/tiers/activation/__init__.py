"""The activation tier: KV caches of hot memory blocks for a local transformers model.

>>> from memstack.tiers.activation import LocalModel
>>> lm = LocalModel.load("smollm2")            # or any local RoPE causal LM folder
>>> m.activation(lm).schedule()                # hot items -> KV blocks within the budget
>>> m.generate("Where does Ann live?", model=lm, user_id="ann").text
"""

from .block import KVBlock, block_overhead, build_block, compose, load_block, render_block, save_block
from .model import SMOLLM2, TEMPLATE_VERSION, LocalModel, models_dir, smollm2_folder
from .tier import ActivationTier, ScheduleReport, Stream

__all__ = ["LocalModel", "KVBlock", "ActivationTier", "ScheduleReport", "Stream", "build_block", "block_overhead",
           "compose", "load_block", "save_block", "render_block", "models_dir", "smollm2_folder",
           "SMOLLM2", "TEMPLATE_VERSION"]
