"""What every evaluator pool shares: the replica a worker holds, the round state it syncs to,
the chunking of a round's masks, and the driver's scheduler with fault handling.

What crosses to a worker, and when:

- once per worker: how to build the dense model (a snapshot file or bytes, or a spec), the
  recipe of the utility (its config, or the picklable callable itself), the device, the threads;
- once per round: the keep masks of every round so far (a few KB: the worker replays the ones
  it has not applied, as ``--resume`` does, so no weights travel), the structure the replica
  must then have, and the calibration batch (tokens, without the tokenizer after the first);
- per chunk: the keep masks of one group of ``masks_per_forward`` sub-models; back: their scores.

Same result as serial: a chunk is exactly one group the serial ``score_masks`` would batch,
scored by that same function on a replica with the same weights and dtype, so every float
is computed by the same kernels on the same shapes. Scores come back in mask order.
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from bonsai_prune.data.calibration import CalibrationBatch
from bonsai_prune.errors import PruningError

IN_FLIGHT = 2  # chunks queued per worker: it never waits for the driver between chunks


# ---- the replica (worker side) ---------------------------------------------------------------


def snapshot_bytes(model) -> bytes:
    """The whole module pickled by torch (works for sliced and restructured models)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def model_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def model_from_file(path: str):
    return torch.load(path, map_location="cpu", weights_only=False)


def utility_recipe(utility) -> Callable[[], Any]:
    """A picklable zero-argument callable that builds ``utility`` again on a worker.

    A registered utility is rebuilt from its config (its embedding model loads on the worker);
    any other callable is sent as it is and must pickle (a module-level function or class).
    """
    from bonsai_prune.config import UtilityConfig
    from bonsai_prune.utility import UTILITIES, resolve_utility

    config = getattr(utility, "config", None)
    if isinstance(config, UtilityConfig) and config.name in UTILITIES:
        if type(utility) is UTILITIES.get(config.name):
            references = getattr(utility, "self_references", None)
            if references:  # U† with self references: the dense parent's, from the driver
                return partial(_with_references, config, dict(references))
            return partial(resolve_utility, config)
    return partial(_same, utility)


def _same(value):
    return value


def _with_references(config, references: dict[str, str]):
    from bonsai_prune.utility import resolve_utility

    utility = resolve_utility(config)
    utility.use_self_references(references)
    return utility


def batch_to(batch: CalibrationBatch, device, tokenizer=None) -> CalibrationBatch:
    """``batch`` with its tensors on ``device`` and ``tokenizer`` attached (None: detached)."""
    moved = {
        name: getattr(batch, name).to(device)
        for name in (
            "input_ids",
            "attention_mask",
            "target_mask",
            "prompt_ids",
            "prompt_attention_mask",
        )
    }
    return replace(batch, tokenizer=tokenizer, **moved)


@dataclass(frozen=True)
class ReplicaSpec:
    """How a worker builds its replica; picklable (functions travel by name)."""

    build_model: Callable[[], Any]  # -> the model before any of the run's keep masks
    build_utility: Callable[[], Any] | None = None  # -> the run's utility (scoring pools)
    score: Callable | None = None  # the method's serial scorer, ``methods.forward.score_masks``


@dataclass
class RoundState:
    """What a replica needs to score a round's sub-models."""

    version: int  # the driver's round counter: a worker syncs once per version
    keeps: list[torch.Tensor]  # (U_r,) bool keep mask of every round since the dense model
    structure: dict  # adapter.structure of the driver's model: the replica must match it
    n_params: int  # adapter.count_parameters of the driver's model
    batch: CalibrationBatch  # without its tokenizer (sent once per worker)
    tokenizer: Any = None  # set only for a worker that has not received it yet
    # the driver's output-projection weights when compensation refitted them: a replica copies
    # them rather than refit itself, whose forward may differ in the last bit. They change only
    # when a round slices, so they travel to a worker once per number of rounds applied
    # (``projections_for``); a state without them tells a replica that already holds them.
    projections: dict[str, torch.Tensor] | None = None
    projections_for: int | None = None  # len(keeps) they were taken at; None: not compensated


@dataclass
class WorkerRecord:
    """What the driver has sent one worker, so that a state goes once and carries only what
    the worker lacks (a restarted worker gets a fresh record, hence everything)."""

    version: int = -1  # round state last sent
    has_tokenizer: bool = False
    projections_for: int | None = None  # rounds whose output-projection weights it holds

    def outgoing(self, state: RoundState | None) -> RoundState | None:
        """The state to send before this worker's next job (None: it is in sync)."""
        if state is None or self.version == state.version:
            return None
        sent = state
        if self.has_tokenizer:
            sent = replace(sent, tokenizer=None)
        if state.projections is not None and self.projections_for == state.projections_for:
            sent = replace(sent, projections=None)
        self.version, self.has_tokenizer = state.version, True
        self.projections_for = state.projections_for
        return sent


def projection_weights(adapter, model) -> dict[str, torch.Tensor]:
    """``"<layer>.<kind>"`` -> the weight of that module's output projection, on the CPU."""
    return {
        f"{layer}.{kind}": linear.weight.detach().cpu()
        for (layer, kind), (linear, _) in adapter.output_projections(model).items()
    }


@torch.no_grad()
def load_projections(adapter, model, weights: dict[str, torch.Tensor]) -> None:
    """Copy :func:`projection_weights` of the driver's model into this replica's."""
    for (layer, kind), (linear, _) in adapter.output_projections(model).items():
        linear.weight.copy_(weights[f"{layer}.{kind}"])


class Replica:
    """One model replica on a worker: builds, replays the rounds' keep masks, scores chunks."""

    def __init__(self, spec: ReplicaSpec, device: str = "cpu", n_threads: int | None = None):
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        from bonsai_prune.models.adapter import adapter_for

        self.device = torch.device(device)
        self.model = spec.build_model().to(self.device).eval()
        self.adapter = adapter_for(self.model)
        self.utility = spec.build_utility() if spec.build_utility is not None else None
        self.score_fn = spec.score
        self.n_applied = 0  # keep masks of rounds replayed so far
        self.projections_for: int | None = None  # rounds of the driver's weights loaded
        self.tokenizer = None
        self.batch: CalibrationBatch | None = None
        self.version = -1

    def sync(self, state: RoundState) -> None:
        """Replay the rounds not applied yet (slicing is deterministic) and take the batch."""
        if self.n_applied > len(state.keeps):
            raise PruningError("a worker's replica is ahead of the driver's model (a bug)")
        for keep in state.keeps[self.n_applied :]:
            self.adapter.slice(self.model, keep)
            self.n_applied += 1
        if state.projections is not None:
            load_projections(self.adapter, self.model, state.projections)
            self.projections_for = state.projections_for
        elif state.projections_for != self.projections_for:
            raise PruningError("a worker lacks the driver's refitted weights (a bug)")
        if (
            self.adapter.count_parameters(self.model) != state.n_params
            or self.adapter.structure(self.model) != state.structure
        ):
            raise PruningError("a worker's replayed model differs from the driver's (a bug)")
        if state.tokenizer is not None:
            self.tokenizer = state.tokenizer
        self.batch = batch_to(state.batch, self.device, self.tokenizer)
        self.version = state.version

    def score(self, masks: torch.Tensor, masks_per_forward: int) -> torch.Tensor:
        """Scores (G,) float64 of one chunk of keep masks (G, U), as the serial path scores it."""
        return self.score_fn(
            self.adapter, self.model, self.utility, self.batch, masks, masks_per_forward, False
        )

    def run(self, job: tuple):
        """The result of one job: ``("score", masks, masks_per_forward)`` -> scores (G,), or
        ``("call", fn, args)`` -> ``fn(model, *args)``."""
        kind, *args = job
        if kind == "score":
            return self.score(*args)
        fn, fn_args = args
        with torch.no_grad():
            return fn(self.model, *fn_args)


# ---- chunks ----------------------------------------------------------------------------------


def group_size(utility, masks_per_forward: int) -> int:
    """Masks the serial path scores in one forward (``methods.forward.score_masks``)."""
    return masks_per_forward if hasattr(utility, "score_masks") else 1


def chunk_bounds(n_masks: int, group: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk: exactly the serial path's groups, so numerics match."""
    return [(start, min(start + group, n_masks)) for start in range(0, n_masks, group)]


# ---- the driver's scheduler ------------------------------------------------------------------


@dataclass
class Done:
    worker: int
    task: int
    result: Any


@dataclass
class Died:
    worker: int
    reason: str


class Backend(Protocol):
    """How a pool reaches its workers (local processes or Ray actors)."""

    def live(self) -> list[int]: ...  # ids of the workers that can take chunks

    def start_missing(self) -> int: ...  # start workers up to the pool size; how many started

    def submit(self, worker: int, task: int, state: RoundState | None, job: tuple) -> None: ...

    def wait(self) -> Iterable[Done | Died]: ...  # blocks until at least one event


@dataclass
class PoolStats:
    """What the pool did, for the run's report."""

    n_workers: int
    n_deaths: int = 0  # workers lost (killed, crashed, out of memory)
    n_restarts: int = 0  # workers started again at a round's start
    n_rerun: int = 0  # chunks re-run on another worker because theirs died
    seconds: list[float] = field(default_factory=list)  # scoring wall time per round


def run_jobs(
    backend: Backend,
    state: RoundState | None,
    jobs: list[tuple],
    stats: PoolStats,
    max_restarts: int,
    on_done: Callable[[int, int], None] | None = None,
) -> list:
    """The result of each job, in job order, computed over the pool's workers.

    A job is ``("score", masks (G, U), masks_per_forward)`` or ``("call", fn, args)``
    (``fn(model, *args)`` on the replica); ``state`` is synced to a worker before its first job.
    A worker that dies loses nothing: its jobs go back to the queue and run on another
    worker. If every worker is gone, they are started again (at most ``max_restarts`` in all).
    on_done(task, worker): called after each job (progress, tests).
    """
    results: list = [None] * len(jobs)
    pending = deque(range(len(jobs)))
    assigned: dict[int, list[int]] = {}
    done: set[int] = set()
    while len(done) < len(jobs):
        if not backend.live():
            _restart(backend, stats, max_restarts)
        for worker in backend.live():
            queue = assigned.setdefault(worker, [])
            while pending and len(queue) < IN_FLIGHT:
                task = pending.popleft()
                backend.submit(worker, task, state, jobs[task])
                queue.append(task)
        for event in backend.wait():
            if isinstance(event, Died):
                lost = [t for t in assigned.pop(event.worker, []) if t not in done]
                stats.n_deaths += 1
                stats.n_rerun += len(lost)
                pending.extendleft(reversed(lost))
                continue
            assigned.get(event.worker, []).remove(event.task)
            if event.task in done:
                continue
            results[event.task] = event.result
            done.add(event.task)
            if on_done is not None:
                on_done(event.task, event.worker)
    return results


def _restart(backend: Backend, stats: PoolStats, max_restarts: int) -> None:
    if stats.n_restarts >= max_restarts:
        raise PruningError(
            f"every worker died and {stats.n_restarts} restarts are spent; completed rounds are "
            "kept: rerun with --resume (fewer --workers, or more memory per worker)"
        )
    stats.n_restarts += backend.start_missing()


class EvaluatorPool:
    """Scores a round's sub-models on workers; called like ``methods.forward.score_masks``.

    keeps: the driver's list of the keep masks of the rounds so far (the method appends to
    it), so that a replica built from the dense model can replay them.
    ship_projections: the run compensates (``models.compensation``): each round state also
    carries the driver's output-projection weights, which slicing alone does not reproduce.
    """

    def __init__(
        self,
        backend: Backend,
        n_workers: int,
        keeps: list[torch.Tensor],
        max_restarts: int | None = None,
        ship_projections: bool = False,
    ) -> None:
        self.backend = backend
        self.keeps = keeps
        self.ship_projections = ship_projections  # compensation: send refitted weights
        self._shipped: tuple[dict[str, torch.Tensor], int] | None = None
        self.stats = PoolStats(n_workers)
        self.max_restarts = n_workers if max_restarts is None else max_restarts
        self.version = 0

    def score_masks(
        self,
        adapter,
        model,
        utility,
        batch: CalibrationBatch,
        masks: torch.Tensor,
        masks_per_forward: int,
        progress: bool,
    ) -> torch.Tensor:
        """Utility of each virtual sub-model (N,), exactly as the serial path computes it."""
        started = time.perf_counter()
        if len(self.backend.live()) < self.stats.n_workers and self.version > 0:
            self.stats.n_restarts += self.backend.start_missing()  # top up between rounds
        self.version += 1  # a new round state: each worker syncs to it before its first chunk
        state = RoundState(
            self.version,
            list(self.keeps),
            adapter.structure(model),
            adapter.count_parameters(model),
            batch_to(batch, "cpu", None),
            batch.tokenizer,
            *self._projections(adapter, model),
        )
        bounds = chunk_bounds(masks.shape[0], group_size(utility, masks_per_forward))
        jobs = [("score", masks[a:b], masks_per_forward) for a, b in bounds]
        sizes = [b - a for a, b in bounds]
        results = self.run(jobs, state, sizes, "  sub-models", progress)
        self.stats.seconds.append(time.perf_counter() - started)
        return torch.cat(results) if results else torch.empty(0, dtype=torch.float64)

    def _projections(self, adapter, model) -> tuple[dict[str, torch.Tensor] | None, int | None]:
        """(weights, rounds they follow) of the driver's output projections when the run
        compensates, read again only after a slice (they change with nothing else)."""
        if not self.ship_projections:
            return None, None
        if self._shipped is None or self._shipped[1] != len(self.keeps):
            self._shipped = (projection_weights(adapter, model), len(self.keeps))
        return self._shipped

    def map(
        self, fn: Callable, args: list[tuple], sizes: list[int], desc: str, progress: bool = True
    ) -> list:
        """``[fn(model, *a) for a in args]`` on the workers' replicas, in order.

        fn: a picklable function (module level); sizes: items per call, for the progress bar.
        """
        return self.run([("call", fn, a) for a in args], None, sizes, desc, progress)

    def run(
        self,
        jobs: list[tuple],
        state: RoundState | None,
        sizes: list[int],
        desc: str,
        progress: bool,
    ) -> list:
        """Run ``jobs`` over the pool with a progress bar of items done across the workers."""
        with tqdm(total=sum(sizes), desc=desc, leave=False, disable=not progress) as bar:

            def on_done(task: int, worker: int) -> None:
                bar.update(sizes[task])
                bar.set_postfix(workers=len(self.backend.live()))

            return run_jobs(self.backend, state, jobs, self.stats, self.max_restarts, on_done)

    def close(self) -> None:
        self.backend.close()
