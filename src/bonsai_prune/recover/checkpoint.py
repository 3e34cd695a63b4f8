"""Resumable checkpoints in one safetensors file: trained tensors, AdamW state, RNG, step.

No pickle: the optimizer state is flattened to named tensors, the step and figures go to the
file's JSON metadata. Written atomically (temp file + rename, io.atomic_save_tensors), so a
run killed while saving keeps the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from bonsai_prune.rundir.files import atomic_save_tensors

PARAM, STATE, RNG = "param.", "adam.", "rng.cpu"


@dataclass
class Checkpoint:
    step: int
    params: dict[str, torch.Tensor]  # trained tensors by parameter name
    optimizer_state: dict[str, dict[str, torch.Tensor]] | None  # per parameter name
    rng_state: torch.Tensor | None
    meta: dict


def save_checkpoint(
    path: Path,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    names: list[str],
    meta: dict,
) -> None:
    """Write ``params`` (and, if given, ``optimizer``'s per-parameter state) at ``step``.

    names: the parameter names in the optimizer's order (its state is keyed by position).
    """
    tensors = {PARAM + k: v.detach().clone() for k, v in params.items()}
    if optimizer is not None:
        state = optimizer.state_dict()["state"]
        for index, name in enumerate(names):
            for key, value in state.get(index, {}).items():
                tensors[f"{STATE}{name}.{key}"] = torch.as_tensor(value).clone()
        tensors[RNG] = torch.get_rng_state()
    atomic_save_tensors(path, tensors, metadata={"step": str(step), "meta": json.dumps(meta)})


def load_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path``, its tensors copied out of the file: safetensors' tensors
    stay backed by its memory map, which would keep a replaced checkpoint's pages resident
    (measured: 1.1 GB after a resumed recovery) and its disk space held."""
    params: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    rng = None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            if key.startswith(PARAM):
                params[key[len(PARAM) :]] = f.get_tensor(key).clone()
            elif key.startswith(STATE):
                name, _, field = key[len(STATE) :].rpartition(".")
                state.setdefault(name, {})[field] = f.get_tensor(key).clone()
            elif key == RNG:
                rng = f.get_tensor(key).clone()
    return Checkpoint(
        int(metadata["step"]), params, state or None, rng, json.loads(metadata["meta"])
    )


def restore_optimizer(
    optimizer: torch.optim.Optimizer, names: list[str], state: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Load per-name AdamW state back into ``optimizer`` (parameters in ``names`` order)."""
    full = optimizer.state_dict()
    full["state"] = {i: state[n] for i, n in enumerate(names) if n in state}
    optimizer.load_state_dict(full)
