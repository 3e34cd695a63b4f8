"""lm-evaluation-harness against `bonsai-prune evaluate`, same model, problems and prompt.

Runs ``lm_eval`` on an offline task with this project's prompt and ``bonsai-prune evaluate``
on the same first N test problems, then reports: both tools' strict-match and flexible-extract
accuracies with Wilson intervals, the share of problems where they generated the same text, and,
on lm-eval's own generations, how often this project's rules agree with lm-eval's filters.
``--prompt plain``: the ``bonsai_gsm8k_plain`` task (the stock GSM8K task with the fixed worked
exemplars of ``evaluate --prompt plain --shots K``). ``--prompt chat``: ``bonsai_gsm8k_chat``
with ``--apply_chat_template`` (``evaluate``'s default prompt, the study's). ``--ours DIR`` reuses
an evaluation already made with the same prompt, cap and dtype (a study cell's ``eval/``).
Needs ``pip install .[lmeval]``.

    python scripts/lmeval_agreement.py --model default --limit 100 --out results/lmeval/dense
    python scripts/lmeval_agreement.py --model runs/x/model --limit 100 --out results/lmeval/x
    python scripts/lmeval_agreement.py --prompt chat --shots 0 --dtype bf16 --limit 300 \
        --ours results/study/cells/dense-1420c2e3/eval --out results/lmeval/study-dense
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from bonsai_prune.core.metrics import LM_EVAL_RULES, flexible_accuracy, strict_accuracy
from bonsai_prune.eval.stats import wilson_interval
from bonsai_prune.export.lmeval import (
    CHAT_TASK,
    DEFAULT_SHOTS,
    SAME_PROMPT_TASK,
    lm_eval_command,
    write_task,
)
from bonsai_prune.models.loading import dequantised_default

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TASKS = {"plain": SAME_PROMPT_TASK, "chat": CHAT_TASK}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a model folder")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--prompt", default="plain", choices=sorted(TASKS))
    parser.add_argument("--shots", type=int, default=5, help="plain prompt only (chat: 0)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ours", type=Path, help="an existing `evaluate` folder to compare with")
    args = parser.parse_args()
    if args.prompt == "chat" and args.shots:
        parser.error("--prompt chat is zero-shot here (the study's prompt): pass --shots 0")
    task_name = TASKS[args.prompt]
    folder = dequantised_default() if args.model == "default" else Path(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    task = write_task(args.out / "task", shots=args.shots or DEFAULT_SHOTS)  # plain task's shots

    lm_dir = args.out / "lm_eval"
    if not list(lm_dir.rglob(f"samples_{task_name}_*.jsonl")):
        command = lm_eval_command(folder, task, limit=args.limit, task=task_name)
        command[command.index("--model_args") + 1] += f",dtype={DTYPES[args.dtype]}"
        command[command.index("--batch_size") + 1] = str(args.batch_size)
        command += ["--gen_kwargs", f"max_gen_toks={args.max_new_tokens}"]
        subprocess.run([*command, "--log_samples", "--output_path", str(lm_dir)], check=True)
    ours_dir = args.ours or args.out / "bonsai_prune"
    if args.ours:
        _check_same_setting(args, json.loads((ours_dir / "summary.json").read_text())["config"])
    elif not (ours_dir / "summary.json").is_file():
        subprocess.run(
            ["bonsai-prune", "evaluate", "--model", args.model, "--prompt", args.prompt,
             "--shots", str(args.shots), "--limit", str(args.limit), "--dtype", args.dtype,
             "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
             "--quiet", "--out", str(ours_dir)],
            check=True,
        )  # fmt: skip
    report = compare(lm_dir, ours_dir, task_name)
    report.update(
        model=args.model, limit=args.limit, prompt=args.prompt, shots=args.shots,
        dtype=args.dtype, max_new_tokens=args.max_new_tokens, ours=str(ours_dir),
    )  # fmt: skip
    (args.out / "agreement.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def _check_same_setting(args: argparse.Namespace, config: dict) -> None:
    """Stop when ``--ours`` was evaluated with another prompt, cap or too few problems."""
    wanted = {"prompt": args.prompt, "shots": args.shots, "max_new_tokens": args.max_new_tokens}
    differ = {k: (config.get(k), v) for k, v in wanted.items() if config.get(k) != v}
    if config.get("dtype") not in (args.dtype, "auto"):  # auto: bf16 where native, as here
        differ["dtype"] = (config.get("dtype"), args.dtype)
    if config.get("limit") is not None and config["limit"] < args.limit:
        differ["limit"] = (config["limit"], args.limit)
    if differ:
        raise SystemExit(f"--ours was evaluated with another setting (theirs, asked): {differ}")


def _lm_eval_samples(lm_dir: Path, task_name: str) -> dict[int, dict]:
    """doc_id -> {"text", "strict-match", "flexible-extract"} from lm-eval's logged samples."""
    path = sorted(lm_dir.rglob(f"samples_{task_name}_*.jsonl"))[-1]
    samples: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        entry = samples.setdefault(row["doc_id"], {"text": row["resps"][0][0]})
        entry[row["filter"]] = float(row["exact_match"])
    return samples


def _share(hits: list[float]) -> dict:
    low, high = wilson_interval(sum(hits), len(hits))
    return {"mean": sum(hits) / len(hits), "ci": [low, high], "n": len(hits)}


def _common_prefix(a: str, b: str) -> int:
    """How many leading characters two texts share."""
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def compare(lm_dir: Path, ours_dir: Path, task_name: str = SAME_PROMPT_TASK) -> dict:
    """Both tools' accuracies, same-text share, and rule agreement on lm-eval's generations."""
    lm = _lm_eval_samples(lm_dir, task_name)
    ours = [json.loads(x) for x in (ours_dir / "generations.jsonl").read_text().splitlines()]
    ours = [row for row in ours if row["index"] in lm]
    texts = [(row["prediction"].strip(), lm[row["index"]]["text"].strip()) for row in ours]
    same = [float(a == b) for a, b in texts]
    # where greedy texts part: late (bf16 rounding between two code paths) or at once (a
    # different model); the dense model's rarely part, a pruned one's low margins part sooner
    parted = [_common_prefix(a, b) for a, b in texts if a != b]
    # this project's rules on lm-eval's text, taken as finished (lm-eval cut it at its stop)
    ours_on_lm = [strict_accuracy(lm[r["index"]]["text"], r["reference"]) for r in ours]
    lm_strict = [lm[r["index"]]["strict-match"] for r in ours]
    flexible_on_lm = [flexible_accuracy(lm[r["index"]]["text"], r["reference"]) for r in ours]
    lm_flexible = [lm[r["index"]]["flexible-extract"] for r in ours]
    return {
        "lm_eval_strict_match": _share(lm_strict),
        "lm_eval_flexible_extract": _share(lm_flexible),
        # scored again with this version's rules, so a saved run reports what the rules say now
        "bonsai_prune_strict": _share(
            [strict_accuracy(r["prediction"], r["reference"], r["finished"]) for r in ours]
        ),
        "bonsai_prune_flexible": _share(
            [flexible_accuracy(r["prediction"], r["reference"], r["finished"]) for r in ours]
        ),
        # lm-eval's own rules on this project's text: what lm-eval would report for it
        **{
            f"bonsai_prune_{name}": _share([rule(r["prediction"], r["reference"]) for r in ours])
            for name, rule in LM_EVAL_RULES.items()
        },
        "same_generation": _share(same),
        "diverged_at_char": {
            "median": float(np.median(parted)) if parted else None,
            "n": len(parted),
        },
        "strict_rule_agreement_on_lm_eval_text": _share(
            [float(a == b) for a, b in zip(ours_on_lm, lm_strict, strict=True)]
        ),
        "flexible_rule_agreement_on_lm_eval_text": _share(
            [float(a == b) for a, b in zip(flexible_on_lm, lm_flexible, strict=True)]
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
