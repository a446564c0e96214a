"""The `memstack` command: each command opens the store, calls one library method, prints.

Tables for people by default, --json for machines. Errors map to exit codes in one place
(_common.py): 2 invalid input, 3 not found, 4 store problem, 5 embedding problem, 6 LLM problem
(also: an add whose turns were stored but whose fact extraction failed), 7 busy (another
process holds the maintenance lease), 8 a broken audit chain (`audit verify`), 1 any other
memstack error.

The LLM is configured by --llm-url / --llm-model / --llm-key or MEMSTACK_LLM_URL,
MEMSTACK_LLM_MODEL, MEMSTACK_LLM_API_KEY (any OpenAI-compatible server).

Layout: root.py (the group and its global options) attaches the commands of core.py (memories,
server, keys), bench.py (`memstack bench ...`), tiers.py (activation and parametric tiers) and
govern.py (audit, backup, restore). They share _common.py (govern.py uses tiers.py for `audit
SHARD`, core.py uses govern.py for receipts) and never import root.py.
"""

from .root import cli, main

__all__ = ["cli", "main"]
