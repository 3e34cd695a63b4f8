"""The ``bonsai-prune`` command: thin argument parsing over the library API.

Every command builds a config and makes one library call. A :class:`BonsaiPruneError` (a
problem the user can fix) is printed as one line on stderr with exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from bonsai_prune.cli_options import add_config_options, config_from_args
from bonsai_prune.config import (
    EvalConfig,
    PruneConfig,
    RecoverConfig,
    UtilityConfig,
    WorkersConfig,
)
from bonsai_prune.errors import BonsaiPruneError
from bonsai_prune.models.loading import DTYPES
from bonsai_prune.validation import check_out_dir, check_out_file

DESCRIPTION = (
    "Forward-only structured pruning of LLMs for math reasoning: Bonsai (sub-models scored "
    "with forward passes only, by perplexity or U† on GSM8K), baselines, recovery by "
    "distillation, evaluation and export. 'bonsai-prune COMMAND --help' for each command."
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake on one line (and exits 2, as argparse does)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


SCORE_FIELDS = ("weights", "accuracy", "lexical")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bonsai-prune", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = commands.add_parser("prune", help="prune a model (Bonsai or a baseline method)")
    add_config_options(p, PruneConfig)
    add_config_options(p, WorkersConfig)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--recover",
        action="store_true",
        help="then distil the pruned model from its parent into OUT/recovered (recover defaults)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the closing check (held-out perplexity and decode speed, dense vs pruned)",
    )
    p.set_defaults(
        handler=_cmd_prune,
        kept="completed rounds (FinerCut: removals) are kept; rerun with --resume",
    )

    p = commands.add_parser("recover", help="distil a pruned run from its dense parent")
    p.add_argument("run", help="run directory of a pruned model (bonsai-prune prune --out)")
    add_config_options(p, RecoverConfig)
    p.add_argument("--teacher", default=None, help="the dense parent (default: the run's --model)")
    p.add_argument("--out", required=True, help="run directory for the recovered model")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_recover, kept="the last checkpoint is kept; rerun with --resume")

    p = commands.add_parser(
        "export", help="write a pruned model for other runtimes: llama.cpp GGUF, lm-eval task"
    )
    p.add_argument("run", help="run directory or model folder")
    p.add_argument("--format", default="gguf", choices=["gguf", "lm-eval-task"])
    p.add_argument("--dtype", default="f16", choices=["f16", "q8_0"], help="GGUF weight type")
    p.add_argument(
        "--mlp-multiple",
        type=int,
        default=None,
        help="GGUF: pad each MLP with zero neurons (exact) to a multiple of N; default 32 with "
        "q8_0, 1 with f16; 256 lets llama-quantize's k-quants (Q4_K_M) reach the down projection",
    )
    p.add_argument("--out", required=True, help="the .gguf file, or the task folder")
    p.set_defaults(handler=_cmd_export)

    p = commands.add_parser("score", help="score predictions against references with U†")
    p.add_argument("input", help='JSONL lines of {"prediction", "reference"}')
    add_config_options(p, UtilityConfig, only=SCORE_FIELDS)
    p.add_argument("--out", default=None, help="write one JSON object of scores per input line")
    p.set_defaults(handler=_cmd_score)

    p = commands.add_parser("evaluate", help="GSM8K evaluation of a dense or pruned model")
    add_config_options(p, EvalConfig)
    p.add_argument("--out", required=True, help="directory for summary.json and generations.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(
        handler=_cmd_evaluate,
        kept="finished batches are kept; run the same command to resume",
    )

    p = commands.add_parser(
        "compare", help="evaluations against a baseline's on the same problems, paired"
    )
    p.add_argument("eval", nargs="+", help="`evaluate --out` folders (the pruned models', say)")
    p.add_argument("--baseline", required=True, help="the folder to compare with (the dense)")
    p.add_argument("--out", default=None, help="write the comparison as JSON")
    p.set_defaults(handler=_cmd_compare)

    p = commands.add_parser(
        "bench", help="measure evaluation speed, GEMM use, decode speed-up, memory"
    )
    p.add_argument("--quick", action="store_true", help="small settings, minutes on 2 cores")
    p.add_argument("--model", default="default")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPES),
        help="of the project's path (the reference loop is fp32): fp32 on a CPU with native "
        "bf16 measures what a CPU without it would",
    )
    p.add_argument("--out", default=None, help="write the figures as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_cmd_bench)

    p = commands.add_parser(
        "experiment", help="prune and evaluate a grid of cells (cached), then report"
    )
    p.add_argument("grid", help="grid YAML file, e.g. results/grid.yaml")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md from the cache")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only cells matching a label, group or key ('dense': no cell, only the dense "
        "model and, with full_eval, the whole-split evaluations of the best models so far)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_experiment, kept="finished cells are kept; run it again to resume")
    return parser


def _cmd_prune(args) -> int:
    from bonsai_prune.api import prune

    config = config_from_args(PruneConfig, args)
    result = prune(
        config,
        out_dir=args.out,
        progress=not args.quiet,
        resume=args.resume,
        overwrite=args.overwrite,
        workers=config_from_args(WorkersConfig, args),
    )
    print(format_summary(result.report, args.out))
    if args.recover:
        from bonsai_prune.recover import recover

        recovered = recover(
            args.out, Path(args.out) / "recovered", RecoverConfig(), progress=not args.quiet
        )
        print(f"recovered model: {recovered.out_dir}")
        result.model = recovered.model
    if not args.no_check:
        from bonsai_prune.eval.quick import format_check, quick_check
        from bonsai_prune.models import load_model

        dense = load_model(config.model, dtype=config.dtype, device=config.device)
        pruned = (result.model, result.tokenizer)
        check = quick_check({"dense": dense, "pruned": pruned})
        print(format_check(check, args.out, parent=config.model))
    return 0


def format_summary(report: dict, out: str | None) -> str:
    lines = [
        f"parameters (non-embedding): {report['params_before']:,} -> {report['params_after']:,}",
        f"parameters (total):         {report['total_params_before']:,} -> {report['total_params_after']:,}",
        f"sparsity reached: {report['sparsity']:.4f} (target {report['config']['sparsity']})"
        f" in {report['n_rounds']} round(s)",
    ]
    for r in report["rounds"]:
        lines.append(
            f"  round {r['index']}: utility {r['utility_before']:.4f} -> sparsity {r['sparsity']:.4f}"
            f" ({sum(r['timings'].values()):.0f} s, {r['n_failed']} failed sub-models)"
        )
    if report.get("utility_final") is not None:
        lines.append(f"  final utility: {report['utility_final']:.4f}")
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in report["phase_seconds"].items())
    lines.append(
        f"time: {report['wall_s']:.0f} s ({phases}; model load {report['model_load_s']:.0f} s)"
    )
    if out:
        lines.append(f"pruned model and report: {out}")
    return "\n".join(lines)


def _cmd_recover(args) -> int:
    from bonsai_prune.recover import recover

    result = recover(
        args.run,
        args.out,
        config_from_args(RecoverConfig, args),
        teacher=args.teacher,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(json.dumps({k: v for k, v in result.report.items() if not isinstance(v, list)}, indent=2))
    return 0


def _cmd_export(args) -> int:
    if args.format == "gguf":
        from bonsai_prune.export.gguf_writer import export_gguf

        path = export_gguf(args.run, args.out, dtype=args.dtype, mlp_multiple=args.mlp_multiple)
        print(f"wrote {path}")
    else:
        from bonsai_prune.export.lmeval import (
            CHAT_TASK,
            SAME_PROMPT_TASK,
            lm_eval_command,
            write_task,
        )

        folder = write_task(args.out)
        print(
            f"wrote the offline tasks to {folder}; lm-eval's own GSM8K (random exemplars):\n"
            f"  {' '.join(lm_eval_command(args.run, folder))}\n"
            "the prompt of `bonsai-prune evaluate --prompt plain --shots 5`:\n"
            f"  {' '.join(lm_eval_command(args.run, folder, task=SAME_PROMPT_TASK))}\n"
            "the prompt of `bonsai-prune evaluate` (chat template, zero-shot):\n"
            f"  {' '.join(lm_eval_command(args.run, folder, task=CHAT_TASK))}"
        )
    return 0


def _cmd_score(args) -> int:
    from bonsai_prune.rundir.files import atomic_write_text
    from bonsai_prune.utility.combine import load_score_file, score_texts

    config = config_from_args(UtilityConfig, args)
    if args.out:
        check_out_file(args.out)
    predictions, references = load_score_file(args.input)
    result = score_texts(
        predictions,
        references,
        config.weights,
        accuracy_rule=config.accuracy,
        lexical=config.lexical,
    )
    if args.out:
        atomic_write_text(
            Path(args.out), "".join(json.dumps(row) + "\n" for row in result.per_item)
        )
    print(json.dumps(result.aggregate, indent=2))
    return 0


def _cmd_evaluate(args) -> int:
    from bonsai_prune.eval.gsm8k import evaluate, format_summary

    config = config_from_args(EvalConfig, args)
    check_out_dir(args.out)  # before the evaluation, not after it
    result = evaluate(config, out_dir=Path(args.out), progress=not args.quiet)
    print(format_summary(result.summary))
    return 0


def _cmd_compare(args) -> int:
    from bonsai_prune.eval.compare import compare_evaluations, format_comparison, format_overview
    from bonsai_prune.rundir.files import atomic_write_json

    if args.out:
        check_out_file(args.out)
    # every folder is read and checked before anything is printed or written
    comparisons = {folder: compare_evaluations(folder, args.baseline) for folder in args.eval}
    print(f"baseline: {args.baseline}")
    if len(comparisons) == 1:
        [(folder, comparison)] = comparisons.items()
        print(f"model: {folder}\n{format_comparison(comparison)}")
    else:
        print(
            f"paired 95% CIs on the problems each model and the baseline both answered\n"
            f"{format_overview(comparisons)}"
        )
    if args.out:
        saved = {folder: c.to_json() for folder, c in comparisons.items()}
        atomic_write_json(Path(args.out), {"baseline": args.baseline, "models": saved})
    return 0


def _cmd_bench(args) -> int:
    from bonsai_prune.bench import BenchConfig, format_table, run_bench
    from bonsai_prune.rundir.files import atomic_write_json

    if args.out:
        check_out_file(args.out)
    result = run_bench(
        BenchConfig.make(args.quick, args.model, args.dtype), progress=not args.quiet
    )
    if args.out:
        atomic_write_json(Path(args.out), result)
    print(format_table(result))
    return 0


def _cmd_experiment(args) -> int:
    from bonsai_prune.study.grid import load_grid
    from bonsai_prune.study.report import write_report
    from bonsai_prune.study.runner import run_experiment

    if args.report_only:
        print(f"report: {write_report(load_grid(args.grid))}")
        return 0
    result = run_experiment(args.grid, progress=not args.quiet, only=args.only)
    print(f"report: {write_report(result)} ({result.n_failed} failed cells)")
    return 1 if result.n_failed else 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line a user can read, not a source excerpt with a file path."""
    print(f"bonsai-prune: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening; keep stderr clean
    warnings.showwarning = _one_line_warning
    try:
        return args.handler(args)
    except BonsaiPruneError as e:
        print(f"bonsai-prune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # each command says what it had saved
        kept = getattr(args, "kept", "nothing was written")
        print(f"bonsai-prune: interrupted; {kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
