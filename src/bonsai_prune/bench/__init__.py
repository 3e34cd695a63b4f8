"""``bonsai-prune bench``: where pruning time goes, and what slicing buys, measured in one run.

Every ratio compares two measurements taken in the same run on the same machine:

* sub-model evaluation, the project's path against a *reference loop* written the way the
  original Bonsai code works (fp32, one mask at a time, masks in Python hooks, the LM head at
  every position; for U†, one prompt at a time), on the same masks and calibration problems;
* the model FLOP/s of that evaluation against this machine's measured matmul peak;
* decode/prefill speed, memory and size of sliced models against the dense one. Speed depends
  only on the shapes, so the 30% and 50% models are sliced at random units under the same
  parameter budget Bonsai uses (measuring a Bonsai-chosen model of the same shapes is equal);
* the wall time and peak memory of a real pruning run against plain inference;
* the time to 50% sparsity with Bonsai's own budget (5% per round, 200 sub-models, 8
  problems, perplexity), *projected* from the measured cost of one evaluation, the prior and a
  ridge fit of that size and a compensation (``project_search``), against the bound its FLOPs
  set at the peak.

Memory is each child process's own peak (VmHWM), so each figure is that job's alone. Timed
comparisons alternate their two sides, so a busy machine slows both alike.

Modules: ``config`` (what a run measures), ``measure`` (timer, matmul peak, peak memory, child
processes, ratios over rounds), ``reference`` (the reference loop), ``evaluation`` (sub-model
evaluation and the projected search), ``slicing`` (sliced models' speed, memory and size; a
real prune's), ``table`` (the printed table); ``__main__`` runs the measuring children.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bonsai_prune.bench.config import BenchConfig
from bonsai_prune.bench.evaluation import bench_evaluation, project_search
from bonsai_prune.bench.measure import matmul_gflops
from bonsai_prune.bench.slicing import bench_pruning, bench_slicing, slice_at_random
from bonsai_prune.bench.table import format_table

__all__ = ["BenchConfig", "format_table", "run_bench", "slice_at_random"]


def run_bench(config: BenchConfig, progress: bool = True) -> dict:
    """All figures of the benchmark, in one dictionary (see the module docstring)."""
    began = time.perf_counter()
    peaks = {
        "fp32": matmul_gflops(torch.float32),
        "bf16": matmul_gflops(torch.bfloat16, repeats=2, trials=2),
    }
    result: dict = {"quick": config.quick, "machine": _machine(), "matmul_gflops": peaks}
    result["evaluation"] = bench_evaluation(config, progress)
    achieved = result["evaluation"]["perplexity"]["model_gflops_per_s"]
    fast_dtype = (
        result["evaluation"]["fast_dtype"].replace("float32", "fp32").replace("bfloat16", "bf16")
    )
    result["gemm_utilisation"] = achieved / peaks[fast_dtype]
    result["gemm_utilisation_vs_bf16_peak"] = achieved / peaks["bf16"]
    ppl = result["evaluation"]["perplexity"]
    result["bonsai_budget"] = project_search(
        ppl["fast_s_per_eval"],
        config.calib_samples,
        ppl["body_flops_per_eval"],
        ppl["head_flops_per_eval"],
        peaks[fast_dtype] * 1e9,
        result["evaluation"]["round_overhead"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        result["slicing"] = bench_slicing(config, Path(tmp))
        result["pruning"] = bench_pruning(config, Path(tmp))
    result["wall_s"] = time.perf_counter() - began
    return result


def _machine() -> dict:
    import platform

    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
