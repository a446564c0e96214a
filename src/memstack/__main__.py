"""python -m memstack: the memstack command."""

from .cli import main

main()
