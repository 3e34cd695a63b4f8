"""``--ray ADDRESS|auto|local``: one Ray actor per worker, each holding one model replica.

An actor asks for one GPU when the driver's model is on CUDA (Ray sets its
``CUDA_VISIBLE_DEVICES``), else for ``threads`` CPUs. The dense model goes into Ray's object
store once (``ray.put``) and every actor, on any node, builds its replica from it; the round
state goes in once per round. Actor method calls run in submission order, so a state message
sent before a chunk is applied before it. An actor that dies (``ray.kill``, its node lost, out
of memory) fails its pending calls with ``RayActorError``: the scheduler re-runs those chunks
on the other actors. Ray is optional: ``pip install 'bonsai-prune[ray]'``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from bonsai_prune.distributed.pool import (
    Died,
    Done,
    Replica,
    ReplicaSpec,
    RoundState,
    WorkerRecord,
    model_from_bytes,
)
from bonsai_prune.errors import ConfigError, PruningError

INSTALL_HINT = "--ray needs Ray: pip install 'bonsai-prune[ray]' (or pip install ray)"


def import_ray():
    """The ``ray`` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


class ReplicaActor:
    """The actor body: a :class:`Replica` built from the object store's model bytes."""

    def __init__(self, model_bytes: bytes, spec: ReplicaSpec, device: str, n_threads: int):
        spec = replace(spec, build_model=partial(model_from_bytes, model_bytes))
        self.replica = Replica(spec, device, n_threads)

    def sync(self, state: RoundState) -> None:
        self.replica.sync(state)

    def run(self, job: tuple):
        return self.replica.run(job)


@dataclass
class _Actor:
    handle: Any
    sent: WorkerRecord = field(default_factory=WorkerRecord)


def connect(address: str, ray=None) -> None:
    """Join the cluster at ``address`` ('auto': the running one), or start a local one ('local')."""
    ray = ray or import_ray()
    if ray.is_initialized():
        return
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    runtime_env = {"env_vars": env} if env else None
    try:
        ray.init(
            address=None if address == "local" else address,
            runtime_env=runtime_env,
            log_to_driver=False,
            include_dashboard=False,
        )
    except ConnectionError as error:
        raise ConfigError(
            f"--ray {address}: no Ray cluster answers there ({error}); start one with "
            "'ray start --head', or use --ray local"
        ) from None


class RayBackend:
    """Ray actors; the driver waits on their pending calls with ``ray.wait``."""

    def __init__(
        self,
        n_workers: int,
        model_bytes: bytes,
        spec: ReplicaSpec,
        cuda: bool,
        n_threads: int,
        address: str = "auto",
    ) -> None:
        self.ray = import_ray()
        connect(address, self.ray)
        self.n_workers = n_workers
        self.model_ref = self.ray.put(model_bytes)
        self.spec = spec  # its build_model is replaced by the object store's bytes
        options = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": n_threads}
        self.actor_class = self.ray.remote(max_restarts=0, max_task_retries=0, **options)(
            ReplicaActor
        )
        self.device = "cuda" if cuda else "cpu"  # Ray shows an actor only its own GPU
        self.n_threads = n_threads
        self.actors: dict[int, _Actor] = {}
        self.pending: dict[Any, tuple[int, int]] = {}  # object ref -> (worker, task)
        self.next_id = 0
        self.start_missing()

    def start_missing(self) -> int:
        missing = self.n_workers - len(self.actors)
        for _ in range(missing):
            handle = self.actor_class.remote(self.model_ref, self.spec, self.device, self.n_threads)
            self.actors[self.next_id] = _Actor(handle)
            self.next_id += 1
        return missing

    def live(self) -> list[int]:
        return list(self.actors)

    def handle(self, worker: int):
        return self.actors[worker].handle

    def submit(self, worker: int, task: int, state: RoundState | None, job: tuple) -> None:
        actor = self.actors[worker]
        sent = actor.sent.outgoing(state)
        if sent is not None:
            actor.handle.sync.remote(sent)  # errors surface in the next job
        ref = actor.handle.run.remote(job)
        self.pending[ref] = (worker, task)

    def wait(self):
        ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=None)
        events, dead = [], set()
        for ref in ready:
            worker, task = self.pending.pop(ref)
            try:
                events.append(Done(worker, task, self.ray.get(ref)))
            except self.ray.exceptions.RayActorError as error:
                dead.add(worker)
                reason = type(error).__name__
            except self.ray.exceptions.RayTaskError as error:
                raise PruningError(f"Ray worker {worker} failed:\n{error}") from None
        for worker in dead:
            self.actors.pop(worker, None)
            for ref, (owner, _) in list(self.pending.items()):
                if owner == worker:
                    del self.pending[ref]
            events.append(Died(worker, reason))
        return events

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor.handle)
        self.actors.clear()
        self.pending.clear()
