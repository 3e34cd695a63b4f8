"""Utilities that score a sub-model (higher is better): perplexity and U† (comprehensive).

Each named utility is a class in its own file, registered in ``UTILITIES``; importing this
package registers them. A plain callable ``(model, batch) -> float`` works as well.
"""

from bonsai_prune.utility import comprehensive, perplexity  # noqa: F401  (register the named utilities)
from bonsai_prune.utility.base import UTILITIES, Utility

__all__ = ["UTILITIES", "Utility", "resolve_utility"]


def resolve_utility(config) -> Utility:
    """The named utility of ``config`` (a UtilityConfig), constructed."""
    return UTILITIES.get(config.name)(config)
