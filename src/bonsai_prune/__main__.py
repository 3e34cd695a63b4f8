"""``python -m bonsai_prune ...``: the CLI without the console script (e.g. from a source tree)."""

import sys

from .cli import main

sys.exit(main())
