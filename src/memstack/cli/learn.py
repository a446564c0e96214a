"""Commands of memory that improves with use: feedback, dedupe, reflect."""

from __future__ import annotations

import click

from ._common import emit, open_memory  # noqa: F401
