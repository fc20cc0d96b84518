"""``python -m scheduler.cli``: the ``captrain`` command (tests and workers run it so)."""

from scheduler.cli import main

main()
