"""The bench's figures as the text table ``bonsai-prune bench`` prints."""

from __future__ import annotations


def format_table(result: dict) -> str:
    ev, sl, pr = result["evaluation"], result["slicing"], result["pruning"]
    rows = [
        (
            "matmul GFLOP/s fp32 / bf16",
            f"{result['matmul_gflops']['fp32']:.0f} / {result['matmul_gflops']['bf16']:.1f}",
        ),
        ("evaluation dtype", ev["fast_dtype"]),
    ]
    for name in ("perplexity", "comprehensive"):
        e = ev[name]
        ceiling = ""
        if "flop_ratio_vs_reference" in e:  # what computing less alone allows
            ceiling = f"; the reference computes {e['flop_ratio_vs_reference']:.2f}x the FLOPs"
        rows.append(
            (
                f"eval_speedup_vs_reference ({name})",
                f"{e['eval_speedup_vs_reference']:.2f}x  "
                f"({e['fast_s_per_eval']:.2f} s per sub-model{ceiling})",
            )
        )
        rows.append((f"utility_rank_corr ({name})", f"{e['utility_rank_corr']:.3f}"))
    rows.append(("gemm_utilisation (vs peak of eval dtype)", f"{result['gemm_utilisation']:.2f}"))
    for name in ("30", "50"):
        for kind, label in (
            ("decode", f"decode_speedup_at_{name}"),
            ("prefill", f"prefill speed-up at {name}%"),
        ):
            spread = sl.get(f"{kind}_speedup_spread_at_{name}")
            rows.append(
                (
                    f"{label} (batch 1 / 8)",
                    " / ".join(
                        ratio_text(sl[f"{kind}_speedup_at_{name}"][b], (spread or {}).get(b))
                        for b in ("batch1", "batch8")
                    ),
                )
            )
        rows.append(
            (
                f"peak RSS, size on disk at {name}% (pruned/dense)",
                f"{sl[f'peak_rss_ratio_at_{name}']:.2f}, {sl[f'size_on_disk_ratio_at_{name}']:.2f}",
            )
        )
    if "bonsai_budget" in result:
        b = result["bonsai_budget"]
        rows.append(
            (
                "time to 50%, Bonsai's budget (perplexity; projected)",
                f"{b['projected_s'] / 60:.1f} min for {b['evaluations']} evaluations in "
                f"{b['rounds']} rounds, {b['projected_over_lower_bound']:.1f}x the FLOP bound "
                f"({b['flops_lower_bound_s'] / 60:.1f} min)",
            )
        )
    phases = ", ".join(f"{k} {v:.0f}" for k, v in pr["prune_phase_s"].items())
    rows.append(("prune_wall_s (U†, 50%)", f"{pr['prune_wall_s']:.0f} s  ({phases})"))
    rows.append(("prune_peak_rss_over_inference", f"{pr['prune_peak_rss_over_inference']:.2f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def ratio_text(value: float, spread: dict | None) -> str:
    """'1.23x [1.18-1.30]', or the range marked as too wide to be a result."""
    if spread is None:
        return f"{value:.2f}x"
    text = f"{value:.2f}x [{spread['min']:.2f}-{spread['max']:.2f}]"
    return text if spread["trusted"] else f"{text} (spread too wide: not a result)"
