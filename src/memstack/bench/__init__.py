"""Benchmark harnesses run by `memstack bench ...`: retrieval quality and speed."""
