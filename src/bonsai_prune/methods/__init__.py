"""Pruning methods, one file each, all in Bonsai's units (query heads, MLP neurons) and budget.

``bonsai`` is the forward-only search (rounds of sampled sub-models, regression, selection);
``random``, ``magnitude``, ``wanda``, ``obs`` and ``finercut`` are one-shot baselines. A method is a
function ``(PruneContext) -> MethodResult`` that prunes ``context.model`` in place to
``context.config.sparsity``. To add one, write ``methods/<name>.py`` with a function decorated
``@METHODS.register("<name>")`` and import the module below; the method contract table in
tests/test_methods.py then runs over it.
"""

from bonsai_prune.methods import (  # noqa: F401  (each registers its method)
    bonsai,
    finercut,
    magnitude,
    obs,
    random,
    wanda,
)
from bonsai_prune.methods.base import METHODS, MethodResult, PruneContext

__all__ = ["METHODS", "MethodResult", "PruneContext"]
