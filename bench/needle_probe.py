"""Which layers keep a RULER needle whole after prefill, per policy (CPU, the embedded model):
    python bench/needle_probe.py snapkv-0.45 "snapkv-0.45:max_window=64:observe=32"
Per sample and policy one character per layer: # the needle's tokens all cached, + some, . none; with per-KV-head
caches, how many of the layer's KV heads cache the whole needle (a digit), + where none does but some hold part."""
import sys

import jax.numpy as jnp
import numpy as np

import pyrajax
from pyrajax import cache as kvc
from pyrajax.generate import prefill, get_tokenizer, bucket
from pyrajax.tasks.ruler import ruler_samples
from checkpoints_convert.embedded import default_model_dir
params, cfg = pyrajax.load(default_model_dir(), dtype=jnp.float32)
tok = get_tokenizer(cfg)
samples = ruler_samples(tok, "niah_single_1", 1000, 6, 0)
pols = sys.argv[1:]
for s in samples:
    ids = s["aware_ids"]; S = len(ids)
    ans = tok(s["answers"][0], add_special_tokens=False)["input_ids"]
    # positions of the answer's tokens inside the prompt (the needle)
    hit = [i for i in range(S - len(ans)) if ids[i:i + len(ans)] == ans]
    needle = set(range(hit[0], hit[0] + len(ans))) if hit else set()
    row = [f"S={S} needle@{hit[:2]} depth={s['depths'][0]:.2f}"]
    for name in pols:
        pol = kvc.cache_preset(name)
        plan = kvc.make_plan(pol, bucket(S, 16), 32, cfg.num_layers)
        seq = kvc.make_seq_plan(plan, [S], 32)
        _, cache = prefill(params, jnp.array([ids + [0] * (plan.prompt_bucket - S)]), seq, plan, cfg, impl="xla")
        marks = []
        for lc in cache.layers:
            rows = np.asarray(lc.pos[0]).reshape(-1, lc.pos.shape[-1])  # one row, or one per KV head
            share = [len(needle & set(r.tolist())) / len(needle) for r in rows]
            whole = sum(k == 1 for k in share)
            mark = ("#" if whole else ".") if len(rows) == 1 else (str(whole) if whole else ".")
            marks.append("+" if not whole and max(share) > 0 else mark)
        row.append(f"{name}: " + "".join(marks))
    print("\n  ".join(row), flush=True)
