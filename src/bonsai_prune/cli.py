"""The ``bonsai-prune`` command: thin argument parsing over the library API.

Every command builds a config and makes one library call. A :class:`BonsaiPruneError` (a
problem the user can fix) is printed as one line on stderr with exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PruneConfig, UtilityConfig
from .errors import BonsaiPruneError
from .utility.weights import format_weights

DEFAULTS, UTILITY_DEFAULTS = PruneConfig(), UtilityConfig()


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake on one line (and exits 2, as argparse does)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="'default' (packaged SmolLM2-135M-Instruct), a local directory, a run directory or a hub id",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32", "fp16"],
        help="auto: bf16 on CUDA or CPUs with native bf16, else fp32",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def _add_utility_options(p: argparse.ArgumentParser, weights: str = "acc=50,lex=25,sem=25") -> None:
    p.add_argument(
        "--weights",
        default=weights,
        help=f"U† weights summing to 100 over acc, lex, sem, prob (default {weights}); "
        "prob (the gold answer's probability) needs a model, so not for 'score'",
    )
    p.add_argument(
        "--accuracy",
        default="strict",
        choices=["strict", "flexible", "contains"],
        help="strict: an answer after a marker or at the end of a finished solution; "
        "flexible: the last number; contains: the original study's rule",
    )
    p.add_argument("--lexical", default="rouge_numbers", choices=["rouge_numbers", "token_f1"])
    p.add_argument(
        "--prompt",
        default="chat",
        choices=["chat", "plain"],
        help="the model's chat template (default) or plain 'Question: ... Answer:' text",
    )
    p.add_argument(
        "--shots", type=int, default=0, help="k worked GSM8K train exemplars in the prompt"
    )


def _utility_config(args, name: str):
    from .config import UtilityConfig
    from .utility.weights import parse_weights

    return UtilityConfig(
        name=name,
        weights=parse_weights(args.weights),
        accuracy=args.accuracy,
        lexical=args.lexical,
        gen_tokens=getattr(args, "gen_tokens", UTILITY_DEFAULTS.gen_tokens),
        prompt=args.prompt,
        shots=args.shots,
        reference=getattr(args, "reference", UTILITY_DEFAULTS.reference),
        stop=getattr(args, "stop", UTILITY_DEFAULTS.stop),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bonsai-prune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = commands.add_parser("prune", help="prune a model with Bonsai")
    _add_model_options(p)
    p.add_argument(
        "--method",
        default=DEFAULTS.method,
        help="bonsai (default), or a one-shot baseline: random, magnitude, wanda, finercut "
        "(baselines ignore --prune-frac, --masks-per-round, --prior and --regression)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=DEFAULTS.sparsity,
        help="target fraction of non-embedding parameters removed",
    )
    p.add_argument(
        "--prune-frac",
        type=float,
        default=DEFAULTS.prune_frac,
        help="fraction of the original parameters removed per round",
    )
    p.add_argument("--masks-per-round", type=int, default=DEFAULTS.masks_per_round)
    p.add_argument(
        "--masks-per-forward",
        type=int,
        default=DEFAULTS.masks_per_forward,
        help="sub-models batched into one generation (U†)",
    )
    p.add_argument("--calib-samples", type=int, default=DEFAULTS.calib_samples)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--prior", default=DEFAULTS.prior)
    p.add_argument("--units", default="both", choices=["both", "heads", "neurons"])
    p.add_argument("--regression", default="ridge", choices=["ridge", "lasso"])
    p.add_argument(
        "--removal-counts",
        default=DEFAULTS.removal_counts,
        choices=["varied", "fixed"],
        help="units each sampled sub-model removes per module: varied (0 to all candidates, "
        "lets the regression compare modules) or fixed (Bonsai's round(f*n))",
    )
    p.add_argument(
        "--allow-empty-modules", action="store_true", help="an MLP may lose all its neurons"
    )
    p.add_argument("--tolerance", type=float, default=DEFAULTS.tolerance)
    p.add_argument(
        "--data",
        default=None,
        help="JSONL of question/answer lines (default: packaged GSM8K train)",
    )
    p.add_argument("--utility", default="perplexity", help="perplexity or comprehensive (U†)")
    p.add_argument(
        "--gen-tokens",
        type=int,
        default=UTILITY_DEFAULTS.gen_tokens,
        help="most tokens each sub-model generates for U† (a row stops after its answer line)",
    )
    p.add_argument(
        "--reference",
        default=UTILITY_DEFAULTS.reference,
        choices=["self", "gold", "gold_prefix"],
        help="what U†'s lexical/semantic terms compare with: self (the dense model's own "
        "solution), gold (GSM8K solution; needs --shots), gold_prefix (the original study's)",
    )
    p.add_argument(
        "--stop",
        default=UTILITY_DEFAULTS.stop,
        choices=["answer", "none"],
        help="answer: a row stops after its answer line; none: at end of sequence only",
    )
    _add_utility_options(p, format_weights(UTILITY_DEFAULTS.weights))
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out after its last completed round",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_prune)

    p = commands.add_parser("score", help="score predictions against references with U†")
    p.add_argument("input", help='JSONL lines of {"prediction", "reference"}')
    _add_utility_options(p)
    p.add_argument("--out", default=None, help="write one JSON object of scores per input line")
    p.set_defaults(run=_cmd_score)

    p = commands.add_parser("evaluate", help="GSM8K test evaluation of a dense or pruned model")
    _add_model_options(p)
    p.add_argument(
        "--limit", type=int, default=None, help="first N test problems (default: all 1,319)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    _add_utility_options(p)
    p.add_argument(
        "--seed", type=int, default=DEFAULTS.seed, help="seed of the bootstrap confidence intervals"
    )
    p.add_argument("--out", required=True, help="directory for summary.json and generations.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_evaluate)

    p = commands.add_parser(
        "bench", help="measure evaluation speed, GEMM use, decode speed-up, memory"
    )
    p.add_argument(
        "--quick", action="store_true", help="small settings, under five minutes on 2 cores"
    )
    p.add_argument("--model", default="default")
    p.add_argument("--out", default=None, help="write the figures as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_bench)

    p = commands.add_parser(
        "experiment", help="prune and evaluate a grid of cells (cached), then report"
    )
    p.add_argument("grid", help="grid YAML file, e.g. results/grid.yaml")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md from the cache")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only cells matching a label, group or key",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_experiment)
    return parser


def _cmd_prune(args) -> int:
    from .api import prune
    from .config import PruneConfig

    config = PruneConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        method=args.method,
        sparsity=args.sparsity,
        prune_frac=args.prune_frac,
        masks_per_round=args.masks_per_round,
        masks_per_forward=args.masks_per_forward,
        calib_samples=args.calib_samples,
        seed=args.seed,
        prior=args.prior,
        units=args.units,
        regression=args.regression,
        removal_counts=args.removal_counts,
        allow_empty_modules=args.allow_empty_modules,
        tolerance=args.tolerance,
        data=args.data,
        utility=_utility_config(args, args.utility),
    )
    _check_registered(config)
    result = prune(
        config,
        out_dir=args.out,
        progress=not args.quiet,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    print(format_summary(result.report, args.out))
    return 0


def _check_registered(config) -> None:
    """Unknown prior or utility names fail before the model is loaded."""
    from .priors import PRIORS
    from .utility import UTILITIES

    PRIORS.get(config.prior)
    UTILITIES.get(config.utility.name)


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


def _cmd_score(args) -> int:
    from .io import atomic_write_text
    from .scoring import load_score_file, score_texts
    from .utility.weights import parse_weights

    predictions, references = load_score_file(args.input)
    result = score_texts(
        predictions,
        references,
        parse_weights(args.weights),
        accuracy_rule=args.accuracy,
        lexical=args.lexical,
    )
    if args.out:
        atomic_write_text(
            Path(args.out), "".join(json.dumps(row) + "\n" for row in result.per_item)
        )
    print(json.dumps(result.aggregate, indent=2))
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import EvalConfig, evaluate, format_summary
    from .utility.weights import parse_weights

    config = EvalConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        prompt=args.prompt,
        shots=args.shots,
        weights=parse_weights(args.weights),
        accuracy=args.accuracy,
        lexical=args.lexical,
        seed=args.seed,
    )
    result = evaluate(config, out_dir=Path(args.out), progress=not args.quiet)
    print(format_summary(result.summary))
    return 0


def _cmd_bench(args) -> int:
    from .bench import BenchConfig, format_table, run_bench
    from .io import atomic_write_json

    result = run_bench(BenchConfig.make(args.quick, args.model), progress=not args.quiet)
    if args.out:
        atomic_write_json(Path(args.out), result)
    print(format_table(result))
    return 0


def _cmd_experiment(args) -> int:
    from .experiments import load_grid, run_experiment
    from .report import write_report

    if args.report_only:
        print(f"report: {write_report(load_grid(args.grid))}")
        return 0
    result = run_experiment(args.grid, progress=not args.quiet, only=args.only)
    print(f"report: {result.report_path} ({result.n_failed} failed cells)")
    return 1 if result.n_failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening; keep stderr clean
    try:
        return args.run(args)
    except BonsaiPruneError as e:
        print(f"bonsai-prune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "bonsai-prune: interrupted; completed rounds are kept (rerun with --resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
