"""Model loading and architecture adapters (one file per family, registered in ADAPTERS)."""

from bonsai_prune.models import llama  # noqa: F401  (registers the Llama adapter)
from bonsai_prune.models.adapter import (
    ADAPTERS,
    HEADS,
    NEURONS,
    ArchitectureAdapter,
    UnitLayout,
    adapter_for,
)
from bonsai_prune.models.loading import load_model

__all__ = [
    "ADAPTERS",
    "HEADS",
    "NEURONS",
    "ArchitectureAdapter",
    "UnitLayout",
    "adapter_for",
    "load_model",
]
