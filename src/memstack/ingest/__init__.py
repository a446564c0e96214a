"""Readers that turn input into items: rule-based now; LLM-based when an LLM is configured."""
