"""Round-1 validity of the utilities of issue 13 on the packaged model (see src/bonsai_prune/study/validity.py).

    nice -n 10 python scripts/measure_validity.py --masks 32 --problems 8 --gen-tokens 128 \
        --out results/validity/round1.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bonsai_prune.config import PruneConfig, UtilityConfig
from bonsai_prune.core.sampling import REMOVAL_COUNTS
from bonsai_prune.core.weights import parse_weights
from bonsai_prune.study.validity import issue_variants, measure_validity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=32)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--weights", default="prob=40,lex=30,sem=30", help="the proposed default")
    parser.add_argument("--extra", action="append", default=[], help="more mixes to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--removal-counts", default="varied", choices=REMOVAL_COUNTS)
    parser.add_argument(
        "--only", action="append", default=[], help="keep only these variants (by name)"
    )
    parser.add_argument(
        "--no-gold", action="store_true", help="skip the 2-shot gold variant (a second generation)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    default = UtilityConfig(
        name="comprehensive", weights=parse_weights(args.weights), gen_tokens=args.gen_tokens
    )
    config = PruneConfig(
        masks_per_round=args.masks,
        calib_samples=args.problems,
        seed=args.seed,
        removal_counts=args.removal_counts,
        utility=default,
    )
    variants = issue_variants(default)
    if args.no_gold:
        variants = [(name, u) for name, u in variants if u is None or u.reference != "gold"]
    if args.only:
        variants = [(name, u) for name, u in variants if name in args.only]
    for spec in args.extra:
        variants.append(
            (
                f"self {spec}",
                UtilityConfig(
                    name="comprehensive", weights=parse_weights(spec), gen_tokens=args.gen_tokens
                ),
            )
        )
    result = measure_validity(config, variants, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))


def format_table(result: dict) -> str:
    """A markdown table of the validity rows."""
    lines = [
        "| utility | unmasked | sub-model mean | share beaten | rank corr. | ridge alpha "
        "(grid max?) | held-out R^2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["variants"]:
        rho = row["rank_correlation"]
        r2 = row["held_out_r2"]
        lines.append(
            f"| {row['name']} | {row['unmasked']:.3f} | {row['sub_model_mean']:.3f} | "
            f"{100 * row['share_beaten']:.0f}% | {'n/a' if rho is None else f'{rho:.2f}'} | "
            f"{row['ridge_alpha']:.3g} ({row['ridge_alpha_is_grid_max']}) | "
            f"{'n/a' if r2 is None else f'{r2:.2f}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
