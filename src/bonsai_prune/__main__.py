"""``python -m bonsai_prune ...``: the CLI without the console script (e.g. from a source tree)."""

import sys

from bonsai_prune.cli import main

sys.exit(main())
