"""FinerCut trial forwards: started at the candidate's layer (LayerInputs) against whole ones.

Packaged model, the study's dtype and calibration batch; 12 candidates across the layers;
prints whether each divergence is identical and the time per candidate both ways.

    python scripts/finercut_ab.py
"""

import time

import torch

from bonsai_prune import PruneConfig
from bonsai_prune.methods import finercut
from bonsai_prune.methods.base import PruneContext
from bonsai_prune.models import adapter_for, load_model

model, tok = load_model("default", dtype="auto")
print("dtype", next(model.parameters()).dtype)
adapter = adapter_for(model)
ctx = PruneContext.create(model, tok, PruneConfig(sparsity=0.2, method="finercut"), progress=False)
batch = ctx.make_batch(1)
print("batch", tuple(batch.input_ids.shape))
ref = list(finercut.log_prob_chunks(model, finercut.target_hidden(model, batch)))
layout = adapter.layout(model)
keep = torch.ones(layout.n_units, dtype=torch.bool)
t = time.perf_counter()
start = finercut.LayerInputs.record(model, adapter, batch, keep)
rec = time.perf_counter() - t
print(f"record {rec:.2f} s")
mods = [m for m in layout.modules if m.layer in (0, 6, 12, 18, 24, 29)]
tw = ts = 0.0
for m in mods:
    trial = keep.clone()
    trial[m.units] = False
    t = time.perf_counter()
    a = finercut.mean_divergence(model, adapter, batch, trial, ref)
    tw += time.perf_counter() - t
    t = time.perf_counter()
    b = finercut.mean_divergence(model, adapter, batch, trial, ref, start, m.layer)
    ts += time.perf_counter() - t
    print(m.name, a == b, f"{a:.5f}")
n = len(layout.modules)
print(
    f"whole {tw / len(mods):.2f} s/candidate, started {ts / len(mods):.2f} s/candidate (sampled layers even), ratio {tw / ts:.2f}x; per step of {n} candidates: {n * tw / len(mods):.0f} s vs {n * ts / len(mods) + rec:.0f} s incl. record"
)
