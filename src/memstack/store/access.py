"""Rows of the server's access control: users, API keys, grants (filled in by issue 15)."""

from __future__ import annotations


class AccessRows:
    """Users, API keys and grants, on the store's connection (a mixin of the SQL stores)."""
