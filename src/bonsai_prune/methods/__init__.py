"""Baseline structured-pruning methods in Bonsai's framework: same units (query heads, MLP
neurons), same non-embedding parameter budget, physical slicing through the adapter.

A method is ``(model, tokenizer, adapter, config, *, progress=True) -> MethodResult`` and
prunes ``model`` in place to ``config.sparsity``. To add one, write ``methods/<name>.py`` with
a function decorated ``@METHODS.register("<name>")`` and import the module below.
"""

from . import finercut, magnitude, random, wanda  # noqa: F401  (each registers its method)
from .base import METHODS, MethodResult

__all__ = ["METHODS", "MethodResult"]
