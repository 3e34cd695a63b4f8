"""Model loading and architecture adapters (one file per family, registered in ADAPTERS)."""

from bonsai_prune.models import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3  # noqa: F401  (register adapters)
from bonsai_prune.models.adapter import (
    ADAPTERS,
    HEADS,
    NEURONS,
    ArchitectureAdapter,
    LayerStructure,
    UnitLayout,
    UnitStats,
    adapter_for,
)
from bonsai_prune.models.loading import load_model

__all__ = [
    "ADAPTERS",
    "HEADS",
    "NEURONS",
    "ArchitectureAdapter",
    "LayerStructure",
    "UnitLayout",
    "UnitStats",
    "adapter_for",
    "load_model",
]
