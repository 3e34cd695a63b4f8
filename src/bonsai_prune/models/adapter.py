"""The architecture adapter: everything the pruner needs to know about a model family.

A *unit* is the smallest thing Bonsai removes: a query head (its q rows, its o columns and its
share of the K/V projections) or an MLP intermediate neuron (its gate and up rows and its down
column). All units of a model are numbered in one global vector: layer by layer, the attention
heads of the layer and then its MLP neurons. A *keep mask* over that vector (True = kept) is
how every other module talks about a sub-model; only adapters know which weights a unit owns.

To support a new family, write ``models/<family>.py`` with a class implementing
:class:`ArchitectureAdapter` (for a Llama-shaped decoder, subclass ``LlamaAdapter`` and override
only what differs), decorate it with ``@ADAPTERS.register("<model_type>")``, import the module
in ``models/__init__.py`` and add a row to tests/test_adapter_contract.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, TypedDict

import torch

from bonsai_prune.errors import UnsupportedModelError
from bonsai_prune.registry import Registry

HEADS, NEURONS = "heads", "neurons"
# what ``--unit-kinds`` accepts, and the module kinds each choice prunes
UNIT_KINDS: dict[str, tuple[str, ...]] = {
    "both": (HEADS, NEURONS),
    HEADS: (HEADS,),
    NEURONS: (NEURONS,),
}


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


@dataclass(frozen=True)
class UnitStats:
    """Per-unit statistics the model adapter records in one forward over calibration data.

    Both are vectors over the global unit axis (all heads and neurons of the model, U long).
    They live here, not with the priors, because only an adapter knows which channels and
    weights make up a unit; priors turn them into importance guesses.
    """

    wanda: torch.Tensor  # (U,) sum over the unit's channels of mean|activation| x column norm
    weight_norm: torch.Tensor  # (U,) L2 norm of all the unit's weights


class LayerStructure(TypedDict):
    """One layer's entry in ``structure()["layers"]``: what a fresh dense model needs to take
    the pruned shapes. Saved as JSON next to the weights (bonsai_structure.json)."""

    query_heads: int  # query heads left (0: the attention sub-layer is empty)
    kv_heads: int  # K/V heads left (those read by at least one query head)
    kv_head_index: list[int]  # (query_heads,) the K/V head each query head reads
    intermediate_size: int  # MLP neurons left


class StatsCollector(Protocol):
    """What ``collect_stats`` yields: call ``result()`` after the forwards have run."""

    def result(self) -> UnitStats: ...


class ArchitectureAdapter(Protocol):
    """The contract of a model family: everything the pruner may ask about a model.

    Outside ``models/`` no code names a weight; it talks in units (see the module docstring).
    Methods take the (possibly already sliced) model, so every answer reflects its current
    shapes. An adapter keeps no state between calls: pruned shapes live on the model's modules
    and in ``structure()``.

    Invariants every registered adapter passes (tests/test_adapter_contract.py, one row per
    family, on a tiny random model built from the family's config class):

    - masked forward equals sliced forward: ``apply_masks(model, keep)`` then forward gives the
      logits the model gives after ``slice(model, keep)``;
    - each row of a (B, U) mask is its own sub-model: batch row b under ``keep[b]`` equals that
      row alone under ``keep[b]``;
    - ``count_parameters`` after slicing is exact, and removing whole modules frees exactly the
      sum of their ``unit_costs``;
    - ``structure()`` -> a fresh dense model -> ``restructure()`` -> ``load_state_dict`` gives
      the same logits and the same greedily generated tokens.
    """

    def layout(self, model) -> UnitLayout:
        """The current units of ``model``: per layer its query heads, then its MLP neurons."""

    def unit_costs(self, model) -> torch.Tensor:
        """FloatTensor (U,): parameters freed by removing each unit alone from the current model.

        Parameters shared by a module's units (a K/V head, per-head norms) are split equally
        among the units that share them, so removing all of them frees exactly their sum.
        """

    def count_parameters(self, model) -> int:
        """Prunable-scope parameters: everything except embeddings and the LM head."""

    def min_units(self, kind: str, allow_empty: bool = False) -> int:
        """Fewest units a module of this kind may keep for the model to still run.

        allow_empty: the caller accepts a module losing all its units where the adapter can
        stand in for the emptied sub-layer (0 then); without it, what the stock module needs.
        """

    def output_projections(self, model) -> dict[tuple[int, str], tuple[torch.nn.Linear, int]]:
        """(layer, kind) -> (the linear reading the module's units, input channels per unit)
        for every module with units: where masks scale, statistics and Gram matrices are
        recorded, and compensation refits (``models/compensation.py``)."""

    def apply_masks(self, model, keep: torch.Tensor) -> AbstractContextManager[None]:
        """Virtually remove units: keep (U,) or (B, U), one row per batch row. No weight changes."""

    def collect_stats(self, model) -> AbstractContextManager[StatsCollector]:
        """Record activation statistics during forwards; ``.result()`` gives UnitStats."""

    def slice(self, model, keep: torch.Tensor) -> None:
        """Physically remove the units where ``keep`` (U,) is False, in place."""

    def structure(self, model) -> dict:
        """JSON-safe ``{"family": model_type, "layers": [LayerStructure, ...]}``."""

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
