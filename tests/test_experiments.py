"""Experiment grids: parsing and validation, cell keys, and a cached run on a tiny random Llama."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_llama

from bonsai_prune.errors import ConfigError
from bonsai_prune.study import rebuild
from bonsai_prune.study import runner as experiments
from bonsai_prune.study.grid import (
    CELL_KEYS,
    PRUNE_KEYS,
    RECOVER_KEYS,
    UTILITY_KEYS,
    load_grid,
    parse_grid,
)
from bonsai_prune.study.report import write_report
from bonsai_prune.study.runner import run_experiment

EVAL = {"limit": 2, "max_new_tokens": 4, "batch_size": 2, "n_bootstrap": 50}
BASE = {"masks_per_round": 4, "calib_samples": 2, "tolerance": 0.01}


def grid(*cells, **top):
    return {"eval": EVAL, "base": BASE, "cells": list(cells), **top}


# ---- parsing and validation --------------------------------------------------------------------

BAD_GRIDS = {
    "unknown cell key": (
        grid({"method": "wanda", "sparsities": [0.2]}, {"name": "typo", "sparsty": 0.3}),
        "cells[1] (typo): unknown key 'sparsty'; known: " + ", ".join((*CELL_KEYS, *PRUNE_KEYS)),
    ),
    "unknown utility key": (
        grid({"method": "bonsai", "utility": {"nmae": "comprehensive"}}),
        "cells[0] utility: unknown key 'nmae'; known: " + ", ".join(UTILITY_KEYS),
    ),
    "bad sparsity": (
        grid({"method": "wanda", "sparsities": [0.2, 1.5]}),
        "cells[0]: sparsity must be in (0, 1), got 1.5; e.g. --sparsity 0.5",
    ),
    "unknown method": (
        grid({"name": "w", "method": "wandda"}),
        "cells[0] (w): unknown method 'wandda'; choose one of: "
        "bonsai, finercut, magnitude, obs, random, wanda",
    ),
    "unknown utility": (
        grid({"method": "bonsai", "utility": {"name": "perplexty"}}),
        "cells[0]: unknown utility 'perplexty'; choose one of: comprehensive, perplexity",
    ),
    "weights": (
        grid({"method": "bonsai", "utility": {"name": "comprehensive", "weights": {"acc": 90}}}),
        "cells[0]: U† weights must sum to 100, got acc=90 (90); e.g. --weights acc=50,lex=25,sem=25",
    ),
    "sparsity twice": (
        grid({"method": "wanda", "sparsity": 0.2, "sparsities": [0.3]}),
        "cells[0]: give 'sparsity' or 'sparsities', not both",
    ),
    "seeds not a list": (
        grid({"method": "random", "seeds": 3}),
        "cells[0]: 'seeds' must be a non-empty list, got 3",
    ),
    "top-level key": (
        {**grid({"method": "wanda"}), "cell": []},
        "grid file: unknown key 'cell'; known: "
        "out, report, eval, base, recover, full_eval, contrast, cells",
    ),
    "contrast not two labels": (
        {**grid({"method": "wanda"}), "contrast": ["wanda"]},
        "grid file: 'contrast' must list two different method labels, got ['wanda']",
    ),
    "contrast names no main cell": (
        {
            **grid({"method": "wanda"}, {"method": "random", "group": "ablation: x"}),
            "contrast": ["wanda", "random"],
        },
        "grid file: contrast names 'random', which is not a main cell's name; use one of 'wanda'",
    ),
    "full_eval not a flag": (
        {**grid({"method": "wanda"}), "full_eval": "yes"},
        "grid file: 'full_eval' must be true or false, got 'yes'",
    ),
    "eval names the model": (
        {**grid({"method": "wanda"}), "eval": {"model": "x"}},
        "eval: 'model' is taken from base (the pruned model is evaluated)",
    ),
    "bad eval value": (
        {**grid({"method": "wanda"}), "eval": {"limit": 0}},
        "eval: limit must be an integer >= 1 or None for the whole split, got 0",
    ),
    "unknown base key": (
        {**grid({"method": "wanda"}), "base": {"mask_per_round": 4}},
        "base: unknown key 'mask_per_round'; known: " + ", ".join(PRUNE_KEYS),
    ),
    "model in a cell": (
        grid({"method": "wanda", "model": "other"}),
        "cells[0]: 'model' is set once, in base (every cell is compared with it)",
    ),
    "out not a path": (
        {**grid({"method": "wanda"}), "out": ["a"]},
        "grid file: 'out' must be a directory path, got ['a']",
    ),
    "recover not a flag": (
        grid({"method": "wanda", "recover": "yes"}),
        "cells[0]: 'recover' must be true or false, got 'yes'",
    ),
    "unknown recover key": (
        {**grid({"method": "wanda"}), "recover": {"steps": 3}},
        "recover: unknown key 'steps'; known: " + ", ".join(RECOVER_KEYS),
    ),
    "no cells": ({**grid(), "cells": []}, "grid file: 'cells' must be a non-empty list of cells"),
    "same run twice": (
        grid({"method": "wanda", "name": "a"}, {"method": "wanda", "name": "b"}),
        "cells 'a' and 'b' in group 'main' are the same run (sparsity 0.3, seed 0); remove one",
    ),
    "same name twice": (
        grid({"method": "wanda", "name": "a"}, {"method": "magnitude", "name": "a"}),
        "group 'main' has two different cells named 'a' at sparsity 0.3, seed 0; "
        "give them different names",
    ),
}


@pytest.mark.parametrize("data, message", BAD_GRIDS.values(), ids=BAD_GRIDS.keys())
def test_bad_grids_fail_up_front_with_one_exact_line(data, message):
    with pytest.raises(ConfigError) as caught:
        parse_grid(data)
    assert str(caught.value) == message


def test_a_grid_file_that_is_not_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("cells: [method: wanda\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"grid\.yaml is not valid YAML"):
        load_grid(path)
    with pytest.raises(ConfigError, match="cannot read grid file"):
        load_grid(tmp_path / "missing.yaml")


def test_cells_expand_merge_utility_and_default_their_labels():
    g = parse_grid(
        grid(
            {"method": "random", "sparsities": [0.2, 0.4], "seeds": [0, 1]},
            {
                "group": "ablation: weights",
                "name": "acc-only",
                "method": "bonsai",
                "sparsity": 0.4,
                "prune_fraction": 0.2,
                "utility": {"name": "comprehensive", "weights": {"acc": 100}},
            },
        )
    )
    assert [(c.label, c.prune_config.sparsity, c.prune_config.seed) for c in g.cells[:4]] == [
        ("random", 0.2, 0),
        ("random", 0.2, 1),
        ("random", 0.4, 0),
        ("random", 0.4, 1),
    ]
    ablation = g.cells[4]
    assert (ablation.group, ablation.label) == ("ablation: weights", "acc-only")
    config = ablation.prune_config
    assert config.masks_per_round == 4 and config.prune_fraction == 0.2  # base, then the cell
    assert config.utility.weights == {"acc": 100.0, "lex": 0.0, "sem": 0.0, "prob": 0.0}
    assert g.eval_config.limit == 2 and g.eval_config.model == "default"
    assert str(g.out) == "results"
    assert parse_grid(grid({"method": "bonsai"})).cells[0].label == "bonsai+perplexity"


def test_cell_keys_are_stable_readable_and_distinct():
    data = grid(
        {"method": "bonsai", "sparsities": [0.2, 0.35], "seeds": [0, 1]},
        {"method": "bonsai", "sparsity": 0.35, "utility": {"name": "comprehensive"}},
        {"group": "ablation", "name": "same as main", "method": "bonsai", "sparsity": 0.35},
    )
    g, again = parse_grid(data), parse_grid(json.loads(json.dumps(data)))
    keys = [c.key for c in g.cells]
    assert keys == [c.key for c in again.cells]
    assert re.fullmatch(r"bonsai-perplexity-s0\.35-seed1-[0-9a-f]{8}", keys[3])
    assert keys[4].startswith("bonsai-comprehensive-s0.35-seed0-")
    assert len(set(keys[:5])) == 5
    assert keys[5] == keys[2]  # the ablation's reference is the main cell: one cache entry
    assert [c.key for c in g.unique_cells()] == keys[:5]
    assert g.dense_key.startswith("dense-") and g.dense_key == again.dense_key
    other_eval = parse_grid({**data, "eval": {**EVAL, "limit": 3}})
    assert not {c.key for c in other_eval.cells} & set(keys)
    assert other_eval.dense_key != g.dense_key


def test_the_shipped_study_parses():
    g = load_grid(Path(__file__).parents[1] / "results" / "grid.yaml")
    groups = {c.group for c in g.cells}
    assert groups == {"main", "ablation: weights", "ablation: gen tokens", "ablation: prune frac"}
    main = {c.label for c in g.cells if c.group == "main"}
    assert main == {
        "random",
        "magnitude",
        "wanda",
        "finercut",
        "bonsai+perplexity",
        "bonsai+comprehensive",
    }
    assert len(g.unique_cells()) == 32


def test_the_second_study_covers_issue_20s_grid():
    """Every method at 10/20/35/50% with recovery, three seeds for the Bonsai cells at 20/35%."""
    g = load_grid(Path(__file__).parents[1] / "results" / "study.yaml")
    main = {(c.label, c.prune_config.sparsity, c.prune_config.seed, c.recover) for c in g.cells}
    for method in ("bonsai+U†", "bonsai+perplexity", "wanda", "wanda (neurons)", "magnitude"):
        for sparsity in (0.1, 0.2, 0.35, 0.5):
            assert (method, sparsity, 0, True) in main
    for method in ("bonsai+U†", "bonsai+perplexity"):
        for sparsity in (0.2, 0.35):
            assert {(method, sparsity, seed, seed == 0) for seed in (0, 1, 2)} <= main
    assert g.eval_config.limit == 300 and g.eval_config.max_new_tokens == 256
    assert g.full_eval and g.full_eval_config.limit is None  # all 1,319 for the best models
    stops = {c.label: c for c in g.cells if c.group == "ablation: early stop"}
    assert {c.prune_config.stop_agreement for c in stops.values()} == {0.0, 0.9}  # issue 18


def test_cells_cached_before_a_field_existed_keep_their_keys():
    """The study's uncompensated cells were cached before ``compensate`` existed: their keys
    (folders committed under results/study/cells/) must be what the grid computes today, or a
    new field silently re-runs hours of cached work. A new PruneConfig field needs its old
    behaviour in ``SAVED_BEFORE``."""
    root = Path(__file__).parents[1] / "results"
    g = load_grid(root / "study.yaml")
    off = [
        c
        for c in g.cells
        if c.group.startswith("ablation: compensation") and c.label == "no compensation"
    ]
    assert len(off) == 4
    for cell in off:
        assert (root / "study" / "cells" / cell.key / "cell.json").is_file(), cell.key
    on = {c.key for c in g.cells if c.group.startswith("ablation: compensation")} - {
        c.key for c in off
    }
    assert len(on) == 4 and not on & {c.key for c in off}


@pytest.mark.parametrize("name", ["grid-session.yaml", "grid-gpu.yaml"])
def test_the_other_shipped_grids_parse_with_every_main_method(name):
    g = load_grid(Path(__file__).parents[1] / "results" / name)
    main = {(c.label, c.prune_config.sparsity) for c in g.cells if c.group == "main"}
    methods = {"random", "magnitude", "wanda", "finercut", "bonsai+perplexity"}
    for sparsity in (0.2, 0.35, 0.5):
        for method in (*methods, "bonsai+comprehensive"):
            assert (method, sparsity) in main
    assert "ablation: removal counts" in {c.group for c in g.cells}


# ---- running on a tiny random Llama ------------------------------------------------------------


class Calls:
    """Wraps the steps of a cell and counts how often each runs."""

    def __init__(self, monkeypatch, tokenizer):
        self.counts = {"load": 0, "prune": 0, "evaluate": 0}
        self.tokenizer = tokenizer
        for module, name in ((rebuild, "prune"), (experiments, "evaluate")):
            monkeypatch.setattr(module, name, self._counted(name, getattr(module, name)))

    def _counted(self, name, function):
        def wrapper(*args, **kwargs):
            self.counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    def load(self, spec, *, dtype, device):
        self.counts["load"] += 1
        model = tiny_llama()
        model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        return model, self.tokenizer

    def reset(self) -> dict:
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts


TINY_GRID = {
    "eval": {**EVAL, "weights": {"acc": 50, "lex": 50, "sem": 0}},  # sem=0: MiniLM not loaded
    "base": {**BASE, "dtype": "fp32", "utility": {"max_length": 192}},
    "cells": [
        {"method": "random", "sparsities": [0.1, 0.2]},
        {"method": "bonsai", "sparsity": 0.1, "prune_fraction": 0.1, "seeds": [0, 1]},
        {"group": "ablation: units", "name": "both", "method": "random", "sparsity": 0.1},
        {
            "group": "ablation: units",
            "name": "heads only",
            "method": "random",
            "unit_kinds": "heads",
            "sparsity": 0.5,
        },
    ],
}


def test_an_unexpected_error_fails_its_cell_and_the_grid_goes_on(tmp_path, tokenizer, monkeypatch):
    """A bug in one cell (here the first evaluation after the dense one raises RuntimeError)
    is recorded with its traceback; the next cell runs, and a re-run retries the failed one."""
    path = tmp_path / "grid.yaml"
    cells = [{"method": "random", "sparsities": [0.1, 0.2]}]
    data = {**TINY_GRID, "cells": cells, "out": str(tmp_path / "out")}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    calls = Calls(monkeypatch, tokenizer)
    evaluate, seen = experiments.evaluate, []

    def broken_once(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:  # dense was the first
            raise RuntimeError("a bug")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(experiments, "evaluate", broken_once)
    first = run_experiment(path, progress=False, load=calls.load)
    assert [o.status for o in first.outcomes] == ["ran", "failed", "ran"]
    assert first.outcomes[1].error.startswith("RuntimeError: a bug (unexpected: traceback in ")
    error = json.loads(
        (tmp_path / "out" / "cells" / first.outcomes[1].key / "error.json").read_text()
    )
    assert error["error"] == "RuntimeError: a bug" and "broken_once" in "".join(error["traceback"])
    monkeypatch.setattr(experiments, "evaluate", evaluate)
    second = run_experiment(path, progress=False, load=calls.load)
    assert [o.status for o in second.outcomes] == ["cached", "ran", "cached"]


def test_a_grid_runs_caches_resumes_and_reports(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "grid.yaml"
    contrast = ["bonsai+perplexity", "random"]
    data = {**TINY_GRID, "out": str(tmp_path / "out"), "contrast": contrast}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    calls = Calls(monkeypatch, tokenizer)
    out = tmp_path / "out"

    first = run_experiment(path, progress=False, load=calls.load)
    write_report(first)
    # dense + 5 distinct runs ("both" is the main random cell); heads alone cannot reach 0.5: recorded, the grid goes on
    assert [o.status for o in first.outcomes] == ["ran", "ran", "ran", "ran", "ran", "failed"]
    assert "PruningError: target sparsity 0.5 is unreachable" in first.outcomes[-1].error
    assert calls.reset() == {"load": 6, "prune": 5, "evaluate": 5}
    report = (out / "report.md").read_text(encoding="utf-8")
    assert f"`bonsai-prune experiment {path}`" in report
    assert "| dense | – |" in report and "| **bonsai+perplexity** | mean of 2 |" in report
    assert "## Ablation: units" in report and "failed: PruningError" in report
    assert "the first 2 problems of GSM8K test" in report and "torch " in report
    # the search budget of the Bonsai cells, and what the cache spent (2 seeds x 1 round x 4)
    assert "- Search (Bonsai cells): 4 sub-models per round x 2 calibration problems" in report
    assert "removed per round, least-squares compensation before each slice" in report
    assert "; 8 sub-model evaluations in the cache." in report
    assert "Paired differences from **random** (seed 0) on the same 2 problems" in report
    assert "Against the dense model on the same 2 problems" in report
    assert "| method | strict kept (x dense) | U† kept (x dense) | Δ ref. NLL |" in report
    # one paired row (seed 0 only) of signed differences, besides the two seed rows
    assert len(re.findall(r"\| bonsai\+perplexity \| [+-]\d", report)) == 1
    # the Bonsai cells' rounds recorded validity; the report shows it, one row per seed
    assert "## Utility validity per round" in report
    assert len(re.findall(r"\| bonsai\+perplexity \| 0.1 \| [01] \| \d+% / ", report)) == 2
    assert len(re.findall(r"\| [01] of 1 \| 4 \(0 of 1\) \|", report)) == 2  # 4 scored, no stop
    # the summary first: the best main model per sparsity against dense, then the contrast at
    # 0.1 (the only sparsity both methods ran), paired on seed 0, over seeds 2 and 1
    summary = report[report.index("## Summary") : report.index("## Main results")]
    assert re.search(r"\| 0\.1 \| (random|bonsai\+perplexity) \| [\d.]+ \[", summary)
    assert re.search(r"\| 0\.2 \| random \| [\d.]+ \[", summary)
    assert "**bonsai+perplexity against random.**" in summary
    assert re.search(
        r"\| 0\.1 \| pruned \| [+-][\d.]+ \[.*\| [\d.]+ ± [\d.]+ \(2\) / [\d.]+ \(1\) \|", summary
    )
    assert "| 0.2 | pruned |" not in summary
    assert "| Δ U† over seeds |" in summary  # n/a here: random has one seed
    for name in ("accuracy", "flexible", "udagger", "perplexity", "answer_prob"):
        assert (out / f"{name}_vs_sparsity.png").stat().st_size > 1000
    assert (out / "layers_0.1.png").is_file() and (out / "layers_0.2.png").is_file()

    second = run_experiment(path, progress=False, load=calls.load)
    assert [o.status for o in second.outcomes[:5]] == ["cached"] * 5
    assert calls.reset() == {"load": 1, "prune": 1, "evaluate": 0}  # only the failed cell again

    bonsai = next(c for c in first.grid.cells if c.label == "bonsai+perplexity")
    (out / "cells" / bonsai.key / "eval" / "summary.json").unlink()
    third = run_experiment(path, progress=False, load=calls.load, only="bonsai+perplexity")
    assert calls.reset() == {"load": 0, "prune": 0, "evaluate": 1}  # pruned model reloaded
    assert [o.status for o in third.outcomes] == ["cached", "ran", "cached"]

    run_report = out / "cells" / bonsai.key / "run" / "report.json"
    run_report.write_text(json.dumps({**json.loads(run_report.read_text()), "complete": False}))
    run_experiment(path, progress=False, load=calls.load, only=bonsai.key)
    assert calls.reset() == {"load": 1, "prune": 1, "evaluate": 1}  # killed mid-prune: resumed

    (out / "report.md").unlink()
    write_report(load_grid(path))  # --report-only: from the cache alone
    assert (out / "report.md").read_text(encoding="utf-8").count("| dense |") == 4
    with pytest.raises(ConfigError, match="--only nothing matches no cell"):
        run_experiment(path, progress=False, load=calls.load, only="nothing")


def test_cached_evaluations_without_the_answer_probability_gain_it(
    tmp_path, tokenizer, monkeypatch, capsys
):
    """Evaluations cached before the answer probability was reported gain it at the next run,
    from the dense model and each cell's saved weights; a cell whose weights are gone is named;
    one its saved model does not reproduce is refused and marked, and not tried again."""
    data = {**TINY_GRID, "out": str(tmp_path / "out"),
            "cells": [{"method": "random", "sparsities": [0.1, 0.2]}]}  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    calls = Calls(monkeypatch, tokenizer)
    first = run_experiment(path, progress=False, load=calls.load)
    keys = [first.grid.dense_key, *(c.key for c in first.grid.cells)]
    evals = [tmp_path / "out" / "cells" / key / "eval" for key in keys]
    saved = [json.loads((folder / "summary.json").read_text()) for folder in evals]
    assert all(s["answer_prob"] is not None for s in saved)
    for folder, summary in zip(evals, saved, strict=True):
        (folder / "summary.json").write_text(json.dumps({**summary, "answer_prob": None}))
    shutil.rmtree(evals[2].parent / "run" / "model")  # the 0.2 cell's weights: gone
    calls.reset()
    run_experiment(path, progress=False, load=calls.load)
    assert calls.reset() == {"load": 1, "prune": 0, "evaluate": 0}  # the dense model, once
    after = [json.loads((folder / "summary.json").read_text()) for folder in evals]
    assert after[0]["answer_prob"] == pytest.approx(saved[0]["answer_prob"])
    assert after[1]["answer_prob"] == pytest.approx(saved[1]["answer_prob"])
    assert after[2]["answer_prob"] is None
    assert f"left without (weights not in the cache): {keys[2]}" in capsys.readouterr().out

    # an evaluation its saved model does not reproduce is refused once, then not retried
    lines = (evals[1] / "generations.jsonl").read_text().splitlines()
    shifted = [{**json.loads(line), "reference_nll": 9.0} for line in lines]
    (evals[1] / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shifted))
    (evals[1] / "summary.json").write_text(json.dumps({**saved[1], "answer_prob": None}))
    run_experiment(path, progress=False, load=calls.load)
    assert "REFUSED" in capsys.readouterr().out
    assert (evals[1] / experiments.REFUSED).exists()
    assert json.loads((evals[1] / "summary.json").read_text())["answer_prob"] is None
    tried = []
    monkeypatch.setattr(experiments, "add_answer_probabilities", lambda *a, **k: tried.append(a))
    run_experiment(path, progress=False, load=calls.load)
    assert tried == []


def test_a_recovered_cell_is_distilled_evaluated_cached_and_reported(
    tmp_path, tokenizer, tiny_model_dir, monkeypatch
):
    """recover: true distils the pruned cell from its parent (the grid's recover settings) into
    its own folder, evaluates it, shows it as "<label> + recovery" and is cached like a cell."""
    fast = {
        "max_tokens": 300,
        "batch_size": 2,
        "max_length": 96,
        "n_eval": 2,
        "data": "gold",
        "dtype": "fp32",
    }
    data = {
        **TINY_GRID,
        "out": str(tmp_path / "out"),
        "base": {**TINY_GRID["base"], "model": str(tiny_model_dir)},
        "recover": {**fast, "eval_every": 0, "checkpoint_every": 100},
        "cells": [{"method": "random", "sparsity": 0.2, "recover": True}],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    calls = Calls(monkeypatch, tokenizer)
    first = run_experiment(path, progress=False, load=calls.load)
    assert [o.status for o in first.outcomes] == ["ran", "ran", "ran"]
    assert first.outcomes[2].label == "random + recovery"
    cell = first.grid.cells[0]
    recovered = tmp_path / "out" / "cells" / first.outcomes[2].key
    assert recovered.parent.name == cell.key and recovered.name.startswith("recovered-")
    assert json.loads((recovered / "run" / "report.json").read_text())["complete"] is True
    assert (recovered / "eval" / "summary.json").is_file()
    assert calls.reset() == {"load": 2, "prune": 1, "evaluate": 3}
    report = write_report(first).read_text(encoding="utf-8")
    assert "| random + recovery |" in report and "flexible acc. %" in report
    assert "(pruning and recovery " in report
    assert "1 done, 0 failed, 0 not run yet; 1 of their 1 recoveries done;" in report

    second = run_experiment(path, progress=False, load=calls.load)
    assert [o.status for o in second.outcomes] == ["cached"] * 3
    assert calls.reset() == {"load": 0, "prune": 0, "evaluate": 0}

    # a fresh checkout: the cache keeps figures, not weights (.gitignore), and a recovery was
    # killed midway: the cell is pruned and evaluated again, then the recovery starts over
    shutil.rmtree(tmp_path / "out" / "cells" / cell.key / "run" / "model")
    shutil.rmtree(recovered / "eval")
    (recovered / "run" / "report.json").write_text(json.dumps({"complete": False}))
    third = run_experiment(path, progress=False, load=calls.load)
    assert [o.status for o in third.outcomes] == ["cached", "cached", "ran", "ran"]
    assert calls.reset() == {"load": 1, "prune": 1, "evaluate": 2}
    assert json.loads((recovered / "run" / "report.json").read_text())["complete"] is True


def test_full_eval_scores_dense_and_the_best_model_per_sparsity_on_more_problems(
    tmp_path, tokenizer, monkeypatch
):
    """full_eval: true evaluates the dense model and, per sparsity, the main model with the
    highest U† again on the whole split (here 3 problems, patched, to stay fast) once every
    main cell at that sparsity has finished, into
    eval-full/; the report (in the grid's `report` folder) shows them beside the dense model;
    a second run finds them cached. Evaluations made before lm-eval's rules gain them."""
    import dataclasses

    from bonsai_prune.study import grid as grid_module

    monkeypatch.setattr(
        grid_module.Grid,
        "full_eval_config",
        property(lambda g: dataclasses.replace(g.eval_config, limit=3)),
    )
    data = {
        **TINY_GRID,
        "out": str(tmp_path / "out"),
        "report": str(tmp_path / "report"),
        "full_eval": True,
        "cells": [
            {"method": "random", "sparsity": 0.2, "seeds": [0, 1]},
            {"method": "magnitude", "sparsity": 0.1},
            # the same runs under another name: the whole-split table keeps the main label
            {"group": "ablation: x", "name": "again", "method": "random", "sparsity": 0.2,
             "seeds": [0, 1]},
        ],
    }  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    calls = Calls(monkeypatch, tokenizer)
    first = run_experiment(path, progress=False, load=calls.load)
    # dense and its whole split, then each sparsity's best on the whole split as soon as every
    # main cell at that sparsity has finished (0.2 after its two seeds, before the 0.1 cell);
    # the end of the grid finds both cached
    whole = [o.label.endswith("on the whole split") for o in first.outcomes]
    assert whole == [False, True, False, False, True, False, True, True, True]
    assert [o.status for o in first.outcomes] == ["ran"] * 7 + ["cached"] * 2
    assert calls.counts["evaluate"] == 7
    cells = {c.key: c for c in first.grid.cells if c.group == "main"}
    out = tmp_path / "out" / "cells"
    full = sorted(p.parent.parent.name for p in out.glob("*/eval-full/summary.json"))
    assert len(full) == 3 and first.grid.dense_key in full
    seeds = [k for k, c in cells.items() if c.label == "random"]
    u = {k: json.loads((out / k / "eval" / "summary.json").read_text())["u_dagger"] for k in seeds}
    best = max(seeds, key=lambda k: u[k])
    assert best in full and (u[seeds[0]] == u[seeds[1]] or min(seeds, key=u.get) not in full)
    summary = json.loads((out / best / "eval-full" / "summary.json").read_text())
    assert summary["n"] == 3 and "accuracy_strict_match" in summary

    report = write_report(first)
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text(encoding="utf-8")
    assert "## The whole test split" in text and "lm-eval strict-match %" in text
    assert "| whole split: strict kept (x dense) | whole split: U† kept (x dense) |" in text
    assert len(re.findall(r"\| (dense|random|magnitude) \| [\d.]+ \| 3 \|", text)) == 3

    calls.reset()
    (out / best / "eval-full" / "summary.json").unlink()
    run_experiment(path, progress=False, load=calls.load, only="dense")
    assert calls.reset() == {"load": 0, "prune": 0, "evaluate": 1}  # no cell: the best's full

    # an evaluation cached before lm-eval's rules existed: they are added from its texts
    dense_eval = out / first.grid.dense_key / "eval"
    before = json.loads((dense_eval / "summary.json").read_text())
    stripped = {k: v for k, v in before.items() if "strict_match" not in k and "extract" not in k}
    (dense_eval / "summary.json").write_text(json.dumps(stripped))
    second = run_experiment(path, progress=False, load=calls.load)
    assert {o.status for o in second.outcomes} == {"cached"}
    assert calls.reset()["evaluate"] == 0
    after = json.loads((dense_eval / "summary.json").read_text())
    assert after["accuracy_strict_match"] == before["accuracy_strict_match"]
    assert after["accuracy_flexible_extract_ci"] == before["accuracy_flexible_extract_ci"]


def test_a_best_model_whose_weights_are_gone_is_rebuilt_checked_and_evaluated_on_the_whole_split(
    tmp_path, tokenizer, tiny_model_dir, monkeypatch, capsys
):
    """A fresh checkout keeps figures, not weights: the whole-split evaluation of a sparsity's
    best model (here a recovered cell or its prune, whichever scored higher) prunes and
    recovers it again in <cell>/rebuild/, moves the weights in only when the rebuild reproduces
    the cached reports, and checks the rows the two evaluations share. A rebuild that differs
    from what the cache recorded is refused, with the reason, and nothing is evaluated."""
    import dataclasses

    from bonsai_prune.errors import DataError
    from bonsai_prune.study import grid as grid_module
    from bonsai_prune.study.rebuild import AGREEMENT_FILE, REBUILD_DIR, restore_weights

    monkeypatch.setattr(
        grid_module.Grid,
        "full_eval_config",
        property(lambda g: dataclasses.replace(g.eval_config, limit=3)),
    )
    fast = {"max_tokens": 300, "batch_size": 2, "max_length": 96, "n_eval": 2, "data": "gold"}
    data = {
        **TINY_GRID,
        "out": str(tmp_path / "out"),
        "full_eval": True,
        "base": {**TINY_GRID["base"], "model": str(tiny_model_dir)},
        "recover": {**fast, "dtype": "fp32", "eval_every": 2, "checkpoint_every": 100},
        "cells": [{"method": "random", "sparsity": 0.2, "recover": True}],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    calls = Calls(monkeypatch, tokenizer)
    first = run_experiment(path, progress=False, load=calls.load)
    best = first.outcomes[-1].key
    assert first.outcomes[-1].label.endswith("on the whole split")
    cell = tmp_path / "out" / "cells" / first.grid.cells[0].key
    full = tmp_path / "out" / "cells" / best / "eval-full"
    expected = json.loads((full / "summary.json").read_text())
    shared = json.loads((full / AGREEMENT_FILE).read_text())
    assert shared["rows"] == 2 and shared["same_prediction"] == 2

    for run in (cell / "run", *cell.glob("recovered-*/run")):
        shutil.rmtree(run / "model")
    shutil.rmtree(full)
    second = run_experiment(path, progress=False, load=calls.load)
    ran = [o for o in second.outcomes if o.key == best and o.label.endswith("whole split")]
    assert [o.status for o in ran] == ["ran", "cached"], ran[0].error
    assert "prune rebuilt: same widths in every layer" in capsys.readouterr().out
    assert (cell / "run" / "model").is_dir() and (cell / REBUILD_DIR).is_dir()
    rebuilt = json.loads((full / "summary.json").read_text())
    assert rebuilt["u_dagger"] == pytest.approx(expected["u_dagger"], abs=1e-6)
    shared = json.loads((full / AGREEMENT_FILE).read_text())
    assert shared["rows"] == 2 and shared["same_prediction"] == 2
    assert shared["max_reference_nll_gap"] < 1e-4
    text = write_report(second).read_text(encoding="utf-8")  # each whole-split model, twice
    assert "answered them twice" in text and re.search(
        r"\| random(?: \+ recovery)? \| 2 \| 2 \|", text
    )

    # the recovery and its parent, rebuilt from the library (whichever of them was the best)
    (recovery,) = cell.glob("recovered-*")
    for folder in (cell, recovery):
        shutil.rmtree(folder / "run" / "model", ignore_errors=True)
        shutil.rmtree(folder / REBUILD_DIR, ignore_errors=True)
    key = f"{cell.name}/{recovery.name}"
    lines = list(restore_weights(second.grid, key, calls.load, progress=False))
    assert [line.split(":")[0] for line in lines] == ["prune rebuilt", "recovery rebuilt"]
    assert (recovery / "run" / "model").is_dir()
    assert (
        list(restore_weights(second.grid, key, calls.load, progress=False)) == []
    )  # nothing to do

    # caches whose reports no rebuild reproduces: refused, with the reason, nothing moved in
    report = json.loads((recovery / "run" / "report.json").read_text())
    report["best"]["kl"] *= 1.5
    (recovery / "run" / "report.json").write_text(json.dumps(report))
    shutil.rmtree(recovery / "run" / "model")
    shutil.rmtree(recovery / REBUILD_DIR)
    with pytest.raises(DataError, match="the rebuilt recovery's held-out KL is"):
        list(restore_weights(second.grid, key, calls.load, progress=False))
    assert not (recovery / "run" / "model").exists()
    report = json.loads((cell / "run" / "report.json").read_text())
    report["structure"]["layers"][0]["intermediate_size"] += 1
    (cell / "run" / "report.json").write_text(json.dumps(report))
    shutil.rmtree(cell / "run" / "model")
    shutil.rmtree(cell / REBUILD_DIR)
    shutil.rmtree(full)
    third = run_experiment(path, progress=False, load=calls.load)
    tried = [o for o in third.outcomes if o.key == best and o.label.endswith("whole split")]
    assert [o.status for o in tried] == ["failed"]  # once per run, not after every cell
    assert "the rebuilt prune kept other widths than the cached one" in tried[0].error
    assert not (full / "summary.json").exists() and not (cell / "run" / "model").exists()


def test_the_report_shows_lm_eval_agreements_stored_beside_the_cells(tmp_path):
    """An agreement written by scripts/lmeval_agreement.py into OUT/lmeval/NAME is a row of the
    report's lm-eval table, whether or not any cell has run."""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**TINY_GRID, "out": str(tmp_path / "out")}), encoding="utf-8")
    share = {"mean": 0.023, "ci": [0.011, 0.047], "n": 300}
    agreement = {
        "lm_eval_strict_match": {**share, "mean": 0.003},
        "lm_eval_flexible_extract": share,
        "bonsai_prune_strict_match": {**share, "mean": 0.007},
        "bonsai_prune_flexible_extract": {**share, "mean": 0.03},
        "same_generation": {**share, "mean": 0.9},
        "diverged_at_char": {"median": 253.0, "n": 31},
        "prompt": "chat",
        "dtype": "bf16",
    }
    folder = tmp_path / "out" / "lmeval" / "dense"
    folder.mkdir(parents=True)
    (folder / "agreement.json").write_text(json.dumps(agreement))
    report = write_report(load_grid(path)).read_text(encoding="utf-8")
    assert "## lm-evaluation-harness on the same problems and prompt" in report
    assert (
        "| dense | 300 | chat, bf16 | 0.3 [1.1, 4.7] | 2.3 [1.1, 4.7] | 0.7 / 3.0 | n/a / n/a | 90 "
        "| 253 |" in report
    )


@pytest.mark.parametrize(
    ("compensated", "text"),
    [
        ([True, True], "least-squares compensation before each slice"),
        ([False], "no compensation"),
        (
            [True, False, True],
            "least-squares compensation before each slice (not in 1 of its 3 cells)",
        ),
    ],
)
def test_the_search_line_names_cells_without_compensation(compensated, text):
    from bonsai_prune.study.report import _compensation

    assert _compensation(compensated) == text
