"""``python -m polymerge.cli``: the same as the ``polymerge`` command."""

from polymerge.cli import run

run()
