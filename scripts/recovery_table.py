"""Issue 15's table: prune, evaluate, recover and re-evaluate, one cell at a time, resumable.

For each (utility, sparsity) the script runs ``bonsai-prune prune`` -> ``evaluate`` ->
``recover`` -> ``evaluate`` through the CLI (what a user would type), skipping a step whose
output is already complete, so a killed run continues where it stopped. The dense model is
evaluated once. Every step's wall time is recorded; the table goes to ``OUT/table.md`` and the
figures to ``OUT/table.json`` after every step, so a partial table is readable.

    python scripts/recovery_table.py --out results/recovery --limit 200 --max-new-tokens 256

Recovery runs with `recover`'s defaults (the parent's own solutions) unless `--recover-args` says
otherwise, e.g. `--recover-args "--data gold"`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

UTILITIES = {"ppl": ["--utility", "perplexity"], "udagger": ["--utility", "comprehensive"]}
LABELS = {"ppl": "Bonsai+perplexity", "udagger": "Bonsai+U†"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/recovery"))
    parser.add_argument("--work", type=Path, default=Path("runs/recovery"), help="run directories")
    parser.add_argument("--limit", type=int, default=200, help="GSM8K test problems evaluated")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sparsities", default="0.2,0.35,0.5")
    parser.add_argument("--utilities", default="ppl,udagger")
    parser.add_argument("--recover-args", default="", help="extra arguments for recover")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    timings_path = args.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def step(name: str, done: Path, command: list[str]) -> None:
        if done.is_file() and (done.name != "report.json" or _complete(done)):
            return
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)}", flush=True)
        began = time.perf_counter()
        subprocess.run(["bonsai-prune", *command], check=True)
        timings[name] = time.perf_counter() - began
        timings_path.write_text(json.dumps(timings, indent=2))
        _write_table(args, timings)

    evaluate = ["--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens), "--quiet"]
    step(
        "eval dense",
        args.work / "eval-dense/summary.json",
        ["evaluate", "--model", "default", *evaluate, "--out", str(args.work / "eval-dense")],
    )
    for sparsity in args.sparsities.split(","):
        for utility in args.utilities.split(","):
            cell = f"{utility}{round(float(sparsity) * 100)}"
            run, rec = args.work / cell, args.work / f"{cell}-rec"
            step(
                f"prune {cell}",
                run / "model/config.json",
                [
                    "prune",
                    *UTILITIES[utility],
                    "--sparsity",
                    sparsity,
                    "--no-check",
                    "--out",
                    str(run),
                    *(["--resume"] if (run / "config.json").is_file() else []),
                ],
            )
            step(
                f"eval {cell}",
                args.work / f"eval-{cell}/summary.json",
                [
                    "evaluate",
                    "--model",
                    str(run),
                    *evaluate,
                    "--out",
                    str(args.work / f"eval-{cell}"),
                ],
            )
            step(
                f"recover {cell}",
                rec / "report.json",
                [
                    "recover",
                    str(run),
                    "--out",
                    str(rec),
                    *args.recover_args.split(),
                    *(["--resume"] if (rec / "recover_config.json").is_file() else []),
                ],
            )
            step(
                f"eval {cell}-rec",
                args.work / f"eval-{cell}-rec/summary.json",
                [
                    "evaluate",
                    "--model",
                    str(rec),
                    *evaluate,
                    "--out",
                    str(args.work / f"eval-{cell}-rec"),
                ],
            )
    _write_table(args, timings)


def _complete(report: Path) -> bool:
    return bool(json.loads(report.read_text()).get("complete"))


def _summary(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_table(args: argparse.Namespace, timings: dict) -> None:
    """Rows: dense, then each cell before and after recovery; a missing step shows '-'."""
    dense = _summary(args.work / "eval-dense/summary.json")
    header = (
        "| model | sparsity | recovered | reference ppl (x dense) | U† (% of dense) "
        "| strict acc. [95% CI] | solutions finished | recovery wall time |"
    )
    lines = [header, "|" + "---|" * 8]
    figures: dict[str, dict] = {}

    def row(label: str, sparsity: str, recovered: str, summary: dict | None, wall: str) -> None:
        if summary is None:
            lines.append(f"| {label} | {sparsity} | {recovered} | - | - | - | - | {wall} |")
            return
        ppl, u = summary.get("reference_perplexity"), summary.get("u_dagger")
        ratio = f" ({ppl / dense['reference_perplexity']:.2f}x)" if dense and ppl else ""
        share = (
            f" ({100 * u / dense['u_dagger']:.0f}%)"
            if dense and u and dense.get("u_dagger")
            else ""
        )
        low, high = summary.get("accuracy_strict_ci") or (0, 0)
        lines.append(
            f"| {label} | {sparsity} | {recovered} | {ppl:.2f}{ratio} | {u:.1f}{share} "
            f"| {100 * summary['accuracy_strict']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] "
            f"| {summary.get('n_finished', '-')}/{summary.get('n', '-')} | {wall} |"
        )
        figures[f"{label} {sparsity} {recovered}"] = {
            key: summary.get(key)
            for key in (
                "reference_perplexity",
                "u_dagger",
                "u_dagger_ci",
                "accuracy_strict",
                "accuracy_strict_ci",
                "accuracy_flexible",
                "answer_prob",
                "n",
                "n_finished",
                "wall_s",
            )
        }

    row("dense", "0%", "-", dense, "-")
    for sparsity in args.sparsities.split(","):
        for utility in args.utilities.split(","):
            cell = f"{utility}{round(float(sparsity) * 100)}"
            pct = f"{round(float(sparsity) * 100)}%"
            row(LABELS[utility], pct, "no", _summary(args.work / f"eval-{cell}/summary.json"), "-")
            wall = timings.get(f"recover {cell}")
            row(
                LABELS[utility],
                pct,
                "yes",
                _summary(args.work / f"eval-{cell}-rec/summary.json"),
                f"{wall / 60:.1f} min" if wall else "-",
            )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "table.json").write_text(
        json.dumps({"figures": figures, "timings": timings}, indent=2)
    )


if __name__ == "__main__":
    sys.exit(main())
