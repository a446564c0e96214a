"""Memory that improves with use: feedback (feedback.py), duplicates merged (dedupe.py),
insights distilled by an LLM (reflect.py). Services: each gets the narrow collaborators it needs
(a Store, a Writer, a Searcher), never Memory."""
