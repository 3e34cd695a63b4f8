"""Sub-model evaluation on workers: the serial result, bit for bit, and faults survived.

Serial vs 2 local worker processes vs 2 Ray actors on a tiny Llama: the same scores, betas,
keep masks and pruned tensors; a worker killed mid-round has its chunks re-run elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal

import pytest
import torch
from conftest import tiny_llama_for

from bonsai_prune import PruneConfig, UtilityConfig, prune
from bonsai_prune.config import WorkersConfig
from bonsai_prune.data.calibration import batch_maker
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.distributed import open_pool
from bonsai_prune.distributed.pool import chunk_bounds
from bonsai_prune.errors import ConfigError, PruningError
from bonsai_prune.methods.forward import score_masks
from bonsai_prune.models.adapter import adapter_for
from bonsai_prune.utility import resolve_utility

CONFIG = PruneConfig(sparsity=0.1, prune_fraction=0.05, masks_per_round=8, calib_samples=2, seed=1)
# U† without the embedding model: batched generation, so chunks are groups of masks_per_forward
GENERATING = UtilityConfig(name="comprehensive", weights={"acc": 50, "lex": 50, "sem": 0})

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install ray)"
)


def _run(tokenizer, workers: WorkersConfig, config: PruneConfig = CONFIG, **kwargs):
    model = tiny_llama_for(tokenizer)
    return prune(
        config, model=model, tokenizer=tokenizer, progress=False, workers=workers, **kwargs
    )


def assert_same_run(a, b) -> None:
    assert len(a.rounds) == len(b.rounds) >= 2
    for x, y in zip(a.rounds, b.rounds, strict=True):
        for name in ("masks", "scores", "beta", "keep"):
            assert torch.equal(getattr(x, name), getattr(y, name)), f"round {x.index}: {name}"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def serial(tokenizer):
    return _run(tokenizer, WorkersConfig())


def test_chunks_are_the_serial_groups():
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_bounds(4, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_two_local_workers_give_the_serial_run(serial, tokenizer):
    assert_same_run(serial, _run(tokenizer, WorkersConfig(workers=2)))


def test_two_local_workers_give_the_serial_run_with_batched_generation(tokenizer):
    config = PruneConfig(
        sparsity=0.1,
        prune_fraction=0.05,
        masks_per_round=6,
        masks_per_forward=4,  # chunks of 4 and 2: the serial groups, not 3 and 3
        calib_samples=2,
        seed=2,
        utility=GENERATING,
    )
    assert_same_run(
        _run(tokenizer, WorkersConfig(), config), _run(tokenizer, WorkersConfig(workers=2), config)
    )


def test_resume_on_workers_continues_the_serial_run(serial, tokenizer, tmp_path):
    """A run stopped after round 1 and resumed on workers: they replay round 1's keep mask."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = _run(tokenizer, WorkersConfig(), out_dir=whole)
    resumed.mkdir()
    shutil.copy(whole / "config.json", resumed / "config.json")
    (resumed / "rounds").mkdir()
    for suffix in ("json", "safetensors"):
        shutil.copy(whole / "rounds" / f"round_001.{suffix}", resumed / "rounds")
    again = _run(tokenizer, WorkersConfig(workers=2), out_dir=resumed, resume=True)
    assert [r.index for r in again.rounds] == list(range(2, len(done.rounds) + 1))
    for x, y in zip(done.rounds[1:], again.rounds, strict=True):
        assert torch.equal(x.scores, y.scores) and torch.equal(x.keep, y.keep)
    sa, sb = done.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _round_inputs(tokenizer):
    model = tiny_llama_for(tokenizer)
    adapter = adapter_for(model)
    batch = batch_maker(tokenizer, load_gsm8k("train"), n=2, seed=0)(1)
    utility = resolve_utility(UtilityConfig())
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(8, adapter.layout(model).n_units, generator=generator) > 0.2  # (8, U)
    return model, adapter, batch, utility, masks


PER_FORWARD = 2


def _survive_a_death(tokenizer, workers: WorkersConfig, kill) -> None:
    """Kill worker 0 right after it is handed its second chunk; the round, and the next one,
    give the serial scores.

    Chunks of 2 sub-models: the 8 masks make 4 chunks, 2 in flight per worker. The kill comes
    after the submit, so both of the victim's chunks are certainly in flight: killing it after
    a chunk *completes* raced its already finished results (CI saw no chunk to re-run)."""
    model, adapter, batch, utility, masks = _round_inputs(tokenizer)
    keeps: list[torch.Tensor] = []
    pool = open_pool(workers, model, keeps, utility, score_masks)
    try:
        victim = pool.backend.live()[0]
        handed: list[int] = []
        submit = pool.backend.submit

        def submit_then_kill(worker, task, state, job) -> None:
            submit(worker, task, state, job)
            if worker == victim:
                handed.append(task)
                if len(handed) == 2:
                    kill(pool.backend, victim)

        pool.backend.submit = submit_then_kill
        expected = score_masks(adapter, model, utility, batch, masks, PER_FORWARD, False)
        assert torch.equal(
            pool.score_masks(adapter, model, utility, batch, masks, PER_FORWARD, False), expected
        )
        assert pool.stats.n_deaths == 1 and pool.stats.n_rerun >= 1
        assert victim not in pool.backend.live()
        pool.backend.submit = submit

        # next round: the dead worker is replaced and replays the round's keep mask
        keep = torch.ones(adapter.layout(model).n_units, dtype=torch.bool)
        keep[[0, 5, 9]] = False
        adapter.slice(model, keep)
        keeps.append(keep)
        masks = masks[:, keep]
        expected = score_masks(adapter, model, utility, batch, masks, PER_FORWARD, False)
        assert torch.equal(
            pool.score_masks(adapter, model, utility, batch, masks, PER_FORWARD, False), expected
        )
        assert pool.stats.n_restarts == 1 and len(pool.backend.live()) == 2
    finally:
        pool.close()


def test_a_local_worker_killed_mid_round_is_re_run_elsewhere(tokenizer):
    _survive_a_death(
        tokenizer,
        WorkersConfig(workers=2),
        lambda backend, worker: os.kill(backend.pid(worker), signal.SIGKILL),
    )


def test_ray_without_ray_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'bonsai-prune\[ray\]'"):
        WorkersConfig(ray="auto")


def test_workers_must_be_a_count():
    with pytest.raises(ConfigError, match="workers"):
        WorkersConfig(workers=-1)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray)")
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
        )
    yield ray
    ray.shutdown()


@needs_ray
def test_two_ray_workers_give_the_serial_run(serial, tokenizer, ray_cluster):
    assert_same_run(serial, _run(tokenizer, WorkersConfig(workers=2, ray="auto")))


@needs_ray
def test_a_ray_worker_killed_mid_round_is_re_run_elsewhere(tokenizer, ray_cluster):
    _survive_a_death(
        tokenizer,
        WorkersConfig(workers=2, ray="auto"),
        lambda backend, worker: ray_cluster.kill(backend.handle(worker)),
    )


def test_gsm8k_generation_on_workers_gives_the_serial_texts(tokenizer):
    from bonsai_prune.distributed.evaluate import generate_on_workers
    from bonsai_prune.eval.gsm8k import first_problems, generate_solutions

    model = tiny_llama_for(tokenizer)
    prompts = [p.question for p in first_problems("test", 5)]
    serial = generate_solutions(
        model, tokenizer, prompts, max_new_tokens=6, batch_size=2, progress=False
    )
    pool = open_pool(WorkersConfig(workers=2), model)
    try:
        spread = generate_on_workers(
            pool, generate_solutions, tokenizer, prompts, max_new_tokens=6, batch_size=2
        )
    finally:
        pool.close()
    assert spread.texts == serial.texts and spread.n_new_tokens == serial.n_new_tokens


class BrokenUtility:
    """A utility that fails on every sub-model (module level: it pickles to the workers)."""

    def __call__(self, model, batch):
        raise ValueError("broken utility")


def test_an_error_inside_a_worker_is_raised_not_re_run(tokenizer):
    model, adapter, batch, _, masks = _round_inputs(tokenizer)
    pool = open_pool(WorkersConfig(workers=2), model, [], BrokenUtility(), score_masks)
    try:
        with pytest.raises(PruningError, match="broken utility"):
            pool.score_masks(adapter, model, BrokenUtility(), batch, masks, 8, False)
        assert pool.stats.n_deaths == 0 and pool.stats.n_rerun == 0
    finally:
        pool.close()


def test_a_worker_gets_the_refitted_weights_once_per_slice_and_the_tokenizer_once():
    from bonsai_prune.distributed.pool import RoundState, WorkerRecord

    weights = {"0.heads": torch.ones(2, 2)}

    def state(version: int, rounds: int) -> RoundState:
        keeps = [torch.ones(3, dtype=torch.bool)] * rounds
        return RoundState(version, keeps, {}, 0, None, "tokenizer", weights, rounds)

    record = WorkerRecord()
    first = record.outgoing(state(1, 0))
    assert first.tokenizer == "tokenizer" and first.projections is weights
    assert record.outgoing(state(1, 0)) is None  # the same round state: nothing to send
    again = record.outgoing(state(2, 0))  # a second batch of sub-models, no slice between
    assert again.tokenizer is None and again.projections is None and again.projections_for == 0
    sliced = record.outgoing(state(3, 1))
    assert sliced.projections is weights and sliced.tokenizer is None
    restarted = WorkerRecord()  # a worker started again knows nothing
    assert restarted.outgoing(state(3, 1)).projections is weights
