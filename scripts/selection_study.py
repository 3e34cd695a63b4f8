"""How round 1's scores become a selection: several rules on the same sub-models, measured.

Reads round 1 of a finished Bonsai run (its masks, scores and candidates), refits the regression
and selects the round's units under each rule below, slices a fresh dense model accordingly and
measures the held-out reference perplexity on the first N GSM8K test problems. No sub-model is
scored again, so every rule sees the same evidence; the rules differ only in how a head and a
neuron are compared:

- ``unit``: ridge on the keep masks, remove the lowest beta per unit (the default);
- ``keep-heads``: the same betas, heads never removed (what ``--units neurons`` selects);
- ``cost-prior``: ridge with a prior variance proportional to each unit's parameters (the
  columns scaled by sqrt(cost)), so a head may carry 57x a neuron's effect before the penalty
  bites; remove the lowest beta per unit;
- ``cost-prior/param``: the same fit, remove the lowest beta per parameter freed;
- ``per-param``: the default fit, remove the lowest beta per parameter freed;
- ``prior``: no regression, the prior's rank within each module (what a round with no signal does);
- ``prior-neurons``: the same, heads never removed (a one-shot activation-weighted ranking of MLP
  neurons, about as many removed in every layer).

    python scripts/selection_study.py runs/graded/ppl20 --limit 200 --out results/selection/round1.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from bonsai_prune.config import PruneConfig
from bonsai_prune.core.budget import min_keep_per_module, round_budget, selection_costs
from bonsai_prune.core.regression import fit_importance
from bonsai_prune.core.selection import select_units
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.eval.gsm8k import reference_nll
from bonsai_prune.methods.base import PruneContext
from bonsai_prune.methods.bonsai import round_generator
from bonsai_prune.methods.forward import unit_prior
from bonsai_prune.models import adapter_for, load_model
from bonsai_prune.models.adapter import HEADS
from bonsai_prune.utility.validity import prior_tiebreak

RULES = (
    "unit",
    "keep-heads",
    "cost-prior",
    "cost-prior/param",
    "per-param",
    "prior",
    "prior-neurons",
)


def importance(rule: str, masks, scores, candidates, costs, is_head) -> torch.Tensor:
    """(U,) the score select_units walks up from; +inf = never removed."""
    score = torch.full(candidates.shape, math.inf, dtype=torch.float64)
    x = masks[:, candidates]
    if rule.startswith("prior"):
        score[candidates] = 0.0  # ties: the prior's rank in its module decides (tiebreak)
        if rule == "prior-neurons":
            score[is_head] = math.inf
        return score
    if rule.startswith("cost-prior"):
        beta = fit_importance(x, scores, prior_scale=costs[candidates].sqrt()).beta
    else:
        beta = fit_importance(x, scores).beta
    if rule.endswith("param"):
        beta = beta / costs[candidates]
    score[candidates] = beta
    if rule == "keep-heads":
        score[is_head] = math.inf
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a Bonsai run directory with rounds/round_001.*")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = PruneConfig.from_saved(json.loads((args.run / "config.json").read_text()))
    saved = load_file(str(args.run / "rounds/round_001.safetensors"))
    masks, scores, candidates = saved["masks"], saved["scores"], saved["candidates"]
    scores = torch.where(torch.isfinite(scores), scores, scores[torch.isfinite(scores)].min())

    dense, tokenizer = load_model(config.model, dtype="auto")
    adapter = adapter_for(dense)
    layout = adapter.layout(dense)
    n_original = adapter.count_parameters(dense)
    budget = round_budget(n_original, n_original, config.sparsity, config.prune_fraction)
    costs, shared = selection_costs(adapter, dense)
    costs = costs.double()
    floors = min_keep_per_module(adapter, layout, config.allow_empty_modules)
    is_head = layout.kind_mask((HEADS,))
    # the round's prior, recomputed as the run did (same batch, same generator)
    batch = PruneContext.create(dense, tokenizer, config, progress=False).make_batch(1)
    prior = unit_prior(adapter, dense, batch, config.prior, round_generator(config.seed, 1))
    tiebreak = prior_tiebreak(prior, layout.module_index)
    problems = load_gsm8k("test")[: args.limit]

    figures = {"run": str(args.run), "limit": args.limit, "budget": budget, "rules": {}}
    for rule in args.rules.split(","):
        score = importance(rule, masks, scores, candidates, costs, is_head)
        selection = select_units(
            score, costs, budget, layout.module_index, floors, shared=shared, tiebreak=tiebreak
        )
        model = copy.deepcopy(dense)
        adapter.slice(model, selection.keep)
        nll, _ = reference_nll(
            model, tokenizer, problems, prompt="chat", shots=0, batch_size=8, progress=False
        )
        removed = ~selection.keep
        figures["rules"][rule] = {
            "reference_perplexity": math.exp(float(nll[torch.isfinite(nll)].mean())),
            "heads_removed": int((removed & is_head).sum()),
            "neurons_removed": int((removed & ~is_head).sum()),
            "removed_params": selection.removed_params,
            "parameters": adapter.count_parameters(model),
        }
        print(rule, figures["rules"][rule], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
