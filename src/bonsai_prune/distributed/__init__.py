"""Sub-model evaluation on workers: ``--workers N`` (local processes) and ``--ray ADDRESS``.

Sub-model evaluations are independent given their masks, so a round's masks are cut into the
groups the serial path would batch, and each group is scored on a worker holding a replica of
the current model; the driver regresses and selects as before. The result is the serial
result, bit for bit, whatever the number of workers (``pool.py`` says why).

``evaluator_pool(config, model, keeps, utility, serial)`` gives the function a method calls to
score masks: ``serial`` itself (``methods.forward.score_masks``) when no worker is asked for.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from bonsai_prune.config import WorkersConfig
from bonsai_prune.distributed.local_pool import LocalBackend, threads_per_worker
from bonsai_prune.distributed.pool import (
    EvaluatorPool,
    ReplicaSpec,
    model_from_file,
    snapshot_bytes,
    utility_recipe,
)
from bonsai_prune.errors import ConfigError

__all__ = ["EvaluatorPool", "evaluator_pool", "open_pool"]  # evaluate.generate_on_workers


@contextmanager
def evaluator_pool(
    config: WorkersConfig,
    model,
    keeps: list[torch.Tensor],
    utility,
    serial: Callable,
    compensates: bool = False,
) -> Iterator[Callable]:
    """The function that scores a round's masks: ``serial`` itself, or a pool's (closed on exit).

    model: the model as it is before any of ``keeps`` is applied (workers replay them).
    keeps: the method's list of round keep masks, appended to as rounds finish.
    utility: the run's utility (rebuilt on each worker from its config, or pickled).
    serial: the method's scorer, ``(adapter, model, utility, batch, masks, masks_per_forward,
        progress) -> (N,)``; each worker calls it on its chunks (it travels by name).
    compensates: the method refits output projections before slicing: replicas receive them.
    """
    if not config.enabled:
        yield serial
        return
    pool = open_pool(config, model, keeps, utility, serial, compensates)
    try:
        yield pool.score_masks
    finally:
        pool.close()


def open_pool(
    config: WorkersConfig,
    model,
    keeps: list[torch.Tensor] | None = None,
    utility=None,
    serial: Callable | None = None,
    compensates: bool = False,
) -> EvaluatorPool:
    """Start the workers of ``config``; each builds a replica of ``model`` (the caller closes).

    Without ``utility`` and ``serial`` the pool only runs calls (``EvaluatorPool.map``), e.g.
    ``distributed.evaluate.generate_on_workers`` for a GSM8K evaluation.
    """
    keeps = [] if keeps is None else keeps
    cuda = next(model.parameters()).device.type == "cuda"
    recipe = utility_recipe(utility) if utility is not None else None
    spec = ReplicaSpec(None, recipe, serial)
    if config.ray is not None:
        from bonsai_prune.distributed.ray_pool import RayBackend, connect, import_ray

        ray = import_ray()
        connect(config.ray, ray)
        resources = ray.cluster_resources()
        n_workers = config.workers or int(resources.get("GPU", 0))
        if n_workers == 0:
            raise ConfigError("--ray on a cluster without GPUs needs --workers N (Ray actors)")
        threads = 1 if cuda else max(1, int(resources.get("CPU", 1)) // n_workers)
        backend = RayBackend(n_workers, snapshot_bytes(model), spec, cuda, threads, config.ray)
        return EvaluatorPool(backend, n_workers, keeps, ship_projections=compensates)
    folder = tempfile.TemporaryDirectory(prefix="bonsai-replica-")
    path = Path(folder.name) / "model.pt"
    torch.save(model, path)  # read by each worker at start and by any restarted one
    spec = replace(spec, build_model=partial(model_from_file, str(path)))
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else ["cpu"]
    backend = LocalBackend(
        config.workers, spec, devices, threads_per_worker(config.workers), snapshot=folder
    )
    return EvaluatorPool(backend, config.workers, keeps, ship_projections=compensates)
