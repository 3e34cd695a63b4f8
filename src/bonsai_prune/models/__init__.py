"""Model loading and architecture adapters (one file per family, registered in ADAPTERS)."""

from . import llama  # noqa: F401  (registers the Llama adapter)
from .adapter import ADAPTERS, HEADS, NEURONS, ArchitectureAdapter, UnitLayout, adapter_for
from .loading import load_model

__all__ = [
    "ADAPTERS",
    "HEADS",
    "NEURONS",
    "ArchitectureAdapter",
    "UnitLayout",
    "adapter_for",
    "load_model",
]
