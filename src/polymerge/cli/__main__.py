"""``python -m polymerge.cli``: the same as the ``polymerge`` command."""

import sys

from polymerge.cli import main

sys.exit(main())
