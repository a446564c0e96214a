"""The write path of the text tier: drafts, the Writer (one transaction per change), repairs."""
