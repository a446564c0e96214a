"""The derived memory tiers: activation (KV blocks of a local model) and, later, parametric."""
