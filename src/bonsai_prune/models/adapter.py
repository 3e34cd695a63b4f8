"""The architecture adapter: everything the pruner needs to know about a model family.

A *unit* is the smallest thing Bonsai removes: a query head (its q rows, its o columns and its
share of the K/V projections) or an MLP intermediate neuron (its gate and up rows and its down
column). All units of a model are numbered in one global vector: layer by layer, the attention
heads of the layer and then its MLP neurons. A *keep mask* over that vector (True = kept) is
how every other module talks about a sub-model; only adapters know which weights a unit owns.

To support a new family, write ``models/<family>.py`` with a class implementing
:class:`ArchitectureAdapter` and decorate it with ``@ADAPTERS.register("<model_type>", ...)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch

from bonsai_prune.errors import UnsupportedModelError
from bonsai_prune.registry import Registry

HEADS, NEURONS = "heads", "neurons"
# what ``--unit-kinds`` accepts, and the module kinds each choice prunes
UNIT_KINDS: dict[str, tuple[str, ...]] = {"both": (HEADS, NEURONS), HEADS: (HEADS,), NEURONS: (NEURONS,)}


@dataclass(frozen=True)
class ModuleUnits:
    """One prunable module: the heads of one attention layer or the neurons of one MLP."""

    layer: int
    kind: str  # HEADS or NEURONS
    n_units: int
    offset: int  # index of this module's first unit in the global unit vector

    @property
    def name(self) -> str:
        return f"layer{self.layer}.{self.kind}"

    @property
    def units(self) -> slice:
        return slice(self.offset, self.offset + self.n_units)


@dataclass(frozen=True)
class UnitLayout:
    """How the global unit vector maps onto modules."""

    modules: tuple[ModuleUnits, ...]

    @classmethod
    def from_sizes(cls, sizes: list[tuple[int, str, int]]) -> UnitLayout:
        """Build from ``(layer, kind, n_units)`` triples in global order."""
        modules, offset = [], 0
        for layer, kind, n in sizes:
            modules.append(ModuleUnits(layer, kind, n, offset))
            offset += n
        return cls(tuple(modules))

    @property
    def n_units(self) -> int:
        return sum(m.n_units for m in self.modules)

    @cached_property
    def module_index(self) -> torch.Tensor:
        """LongTensor (U,): the module id of each unit."""
        sizes = torch.tensor([m.n_units for m in self.modules])
        return torch.repeat_interleave(torch.arange(len(self.modules)), sizes)

    def kind_mask(self, kinds: tuple[str, ...]) -> torch.Tensor:
        """BoolTensor (U,): True for units whose module kind is in ``kinds``."""
        mask = torch.zeros(self.n_units, dtype=torch.bool)
        for m in self.modules:
            if m.kind in kinds:
                mask[m.units] = True
        return mask

    def split(self, values: torch.Tensor) -> Iterator[tuple[ModuleUnits, torch.Tensor]]:
        """Yield each module with its slice of ``values`` (..., U) along the last dimension."""
        for m in self.modules:
            yield m, values[..., m.units]


class ArchitectureAdapter(Protocol):
    """What the pruner asks of a model family. Methods take the (possibly pruned) model."""

    def layout(self, model) -> UnitLayout:
        """The current units of ``model``."""

    def unit_costs(self, model) -> torch.Tensor:
        """FloatTensor (U,): parameters freed by removing each unit alone from the current model."""

    def count_parameters(self, model) -> int:
        """Prunable-scope parameters: everything except embeddings and the LM head."""

    def min_units(self, kind: str, allow_empty: bool = False) -> int:
        """Fewest units a module of this kind may keep for the model to still run.

        allow_empty: the caller accepts a module losing all its units where the adapter can
        stand in for the emptied sub-layer (0 then); without it, what the stock module needs.
        """

    def apply_masks(self, model, keep: torch.Tensor) -> AbstractContextManager[None]:
        """Virtually remove units: keep (U,) or (B, U), one row per batch row. No weight changes."""

    def collect_stats(self, model) -> AbstractContextManager[Any]:
        """Record activation statistics during forwards; ``.result()`` gives UnitStats."""

    def slice(self, model, keep: torch.Tensor) -> None:
        """Physically remove the units where ``keep`` (U,) is False, in place."""

    def structure(self, model) -> dict:
        """JSON-safe per-layer sizes, enough to rebuild the pruned shapes with ``restructure``."""

    def restructure(self, model, structure: dict) -> None:
        """Give a freshly built dense model the (uninitialised) shapes described by ``structure``."""


ADAPTERS: Registry[type] = Registry("architecture")


def adapter_for(model) -> ArchitectureAdapter:
    """The adapter registered for ``model.config.model_type``."""
    model_type = getattr(model.config, "model_type", "?")
    check_supported(model_type)
    return ADAPTERS.get(model_type)()


def check_supported(model_type: str) -> None:
    """Fail with the list of supported families unless ``model_type`` has an adapter."""
    if model_type not in ADAPTERS:
        supported = ", ".join(ADAPTERS.names())
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported yet; supported: {supported}"
        )
