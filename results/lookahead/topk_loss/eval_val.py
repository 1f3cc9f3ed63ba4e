"""Per-prompt validation figures of several modules on the same prompts (the runs' validation split, share 0.2):
KL(true || predicted), top-k set loss at k=64 and count recall at 32/64/128; paired differences with 95% t-intervals."""
import json
import sys

import torch

from lookaheadkv import lookahead as la
from lookaheadkv.collect import prompt_key
from lookaheadkv.evaluation.metrics import mean_ci
from lookaheadkv.models import load_model
from lookaheadkv.prefill import prefill
from lookaheadkv.targets import open_store
from lookaheadkv.train import Batch, batch_loss, is_validation, topk_loss
from lookaheadkv.train_data import load_prompts

torch.set_num_threads(2)
mods = dict(a.split("=", 1) for a in sys.argv[2:])
ids, fams, _ = load_prompts("/tmp/tk/prompts.safetensors")
model, tok = load_model("smollm2-135m-instruct", device="cpu")
store = open_store("/tmp/tk/targets", la.model_identity(model), 96)
keys = [prompt_key(torch.as_tensor(x)) for x in ids]
val = [(k, f) for k, f in zip(keys, fams) if store.answered(k) and is_validation(k, 0.2)]
rows = {}
for name, path in mods.items():
    mod = la.load(model, la.shipped_module(model) if path == "shipped" else path)
    out = []
    for k, fam in val:
        t = store.get(k)
        b = Batch.of([t])
        with torch.no_grad():
            loss, rec = batch_loss(model, mod, b, grad=False, budgets=(32, 64, 128))
            pf = prefill(model, b.ids, b.mask)
            pred = la.lookahead_pass(model, mod, pf, grad=False).mean()
            tk = topk_loss(pred, b.truth.float(), model.config.num_key_value_heads, 64)
        out.append({"key": k, "family": fam, "kl": float(loss), "topk64": float(tk),
                    **{f"recall@{bb}": float(rec[bb][0]) for bb in (32, 64, 128)}})
    rows[name] = out
    means = {m: round(sum(r[m] for r in out) / len(out), 4) for m in out[0] if m not in ("key", "family")}
    print(name, means, flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
names = list(mods)
for a in names[1:]:
    for m in ("kl", "topk64", "recall@32", "recall@64", "recall@128"):
        d = [x[m] - y[m] for x, y in zip(rows[a], rows[names[0]])]
        mu, ci = mean_ci(d)
        print(f"{a} - {names[0]} {m}: {mu:+.4f} +- {ci:.4f} (n={len(d)}, higher on {sum(x > 0 for x in d)})")
