"""bonsai_prune: forward-only structured pruning of LLMs (Bonsai) for math reasoning.

Where things live: heads and neurons are masked and sliced in ``models/llama.py``; U† is
combined in ``utility/combine.py`` (the utility: ``utility/comprehensive.py``) from the metrics
in ``core/metrics.py``; the round loop is ``methods/bonsai.py``; ``api.prune`` is the entry
point, ``recover.recover`` distils, ``eval.gsm8k.evaluate`` evaluates and
``eval.compare.compare_evaluations`` sets an evaluation beside a baseline's.
"""

__version__ = "0.1.0"

from bonsai_prune.api import PruneResult, prune
from bonsai_prune.config import PruneConfig, UtilityConfig
from bonsai_prune.data.problems import Problem, load_gsm8k, load_problems
from bonsai_prune.errors import (
    BonsaiPruneError,
    ConfigError,
    DataError,
    MemoryBudgetError,
    ModelLoadError,
    PruningError,
    RunDirectoryError,
    UnsupportedModelError,
)
from bonsai_prune.models import adapter_for, load_model
from bonsai_prune.models.pruned import load_pruned
from bonsai_prune.utility.combine import score_texts

__all__ = [
    "BonsaiPruneError",
    "ConfigError",
    "DataError",
    "MemoryBudgetError",
    "ModelLoadError",
    "Problem",
    "PruneConfig",
    "PruneResult",
    "PruningError",
    "RunDirectoryError",
    "UnsupportedModelError",
    "UtilityConfig",
    "adapter_for",
    "load_gsm8k",
    "load_model",
    "load_problems",
    "load_pruned",
    "prune",
    "score_texts",
]
