"""Entry point of the bench's measuring child processes (``python -m bonsai_prune.bench``):
each figure's memory is that process's alone."""

from __future__ import annotations

import json
import sys

from bonsai_prune.bench.slicing import measure_memory, measure_speed
from bonsai_prune.memory import peak_resident_bytes


def _child(argv: list[str]) -> None:
    """Entry point of the measuring child processes (their RSS is measured alone)."""
    if argv[0] == "speed":
        print(json.dumps(measure_speed(json.loads(argv[1]), int(argv[2]), argv[3])))
    elif argv[0] == "memory":
        print(json.dumps(measure_memory(argv[1], int(argv[2]), argv[3])))
    elif argv[0] == "prune":
        from bonsai_prune.api import prune
        from bonsai_prune.config import PruneConfig

        config = PruneConfig.from_dict(json.loads(argv[1]))
        report = prune(config, out_dir=argv[2], progress=False).report
        print(json.dumps({**report, "peak_rss_bytes": peak_resident_bytes()}))
    else:
        raise SystemExit(f"unknown benchmark child {argv[0]!r}")


if __name__ == "__main__":
    _child(sys.argv[1:])
