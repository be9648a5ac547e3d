"""Which layers keep a RULER needle whole after prefill, per policy (CPU, the embedded model):
    python bench/needle_probe.py snapkv-0.45 "snapkv-0.45:max_window=64:observe=32"
# whole in a layer, + in part, . lost."""
import sys, numpy as np, jax, jax.numpy as jnp, pyrajax
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
        kept = []
        for lc in cache.layers:
            p = np.asarray(lc.pos[0]); p = set(p.reshape(-1).tolist()) if p.ndim == 1 else [set(h.tolist()) for h in p]
            kept.append(len(needle & p) / len(needle) if isinstance(p, set) else np.mean([len(needle & h) / len(needle) for h in p]))
        row.append(f"{name}: " + "".join("#" if k == 1 else ("+" if k > 0 else ".") for k in kept))
    print("\n  ".join(row), flush=True)
