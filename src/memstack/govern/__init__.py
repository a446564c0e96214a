"""Governance services over the Store: the audit chain's verification (chain.py)."""
