"""GPU confirmation that the Pallas path generates what the XLA path generates (a check, not a test: CI has no
GPU). Random weights, ragged prompts, every cache policy; prints a table and writes JSON.

    python -m bench.parity [--model tiny] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pyrajax
from bench.throughput import env_info
from pyrajax.validate import cli_cache, cli_dtype, cli_int


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=sorted(pyrajax.config.PRESETS))
    ap.add_argument("--dtype", type=cli_dtype, default="float32")
    ap.add_argument("--new", type=cli_int(1), default=48)
    ap.add_argument("--cache", nargs="+", type=cli_cache, default=["full", "paper", "budget-0.7"])
    args = ap.parse_args(argv)
    cfg = pyrajax.preset(args.model)
    params = pyrajax.random_params(jax.random.key(0), cfg, jnp.dtype(args.dtype), scale=0.25)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (300, 77, 190, 12)]
    rows = []
    for cache in args.cache:
        out = {}
        for impl in ("xla", "pallas"):
            g = pyrajax.GenerationConfig(model=cfg, max_new_tokens=args.new, cache=cache, impl=impl, stop_ids=())
            r = pyrajax.generate(params, prompts, g)
            out[impl] = r
        same = [a == b for a, b in zip(out["xla"].tokens, out["pallas"].tokens)]
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                      for a, b in zip(out["xla"].tokens, out["pallas"].tokens)]
        rows.append(dict(cache=cache, identical=same, first_divergence=first_diff,
                         lengths_equal=out["xla"].stats["lengths_at_end"] == out["pallas"].stats["lengths_at_end"]))
        print(rows[-1], flush=True)
    res = dict(env_info(), check="pallas-vs-xla generation", model=args.model, dtype=args.dtype, rows=rows)
    path = Path(os.environ.get("OUT") or "bench/results") / f"parity-{args.model}-{args.dtype}.json"
    path.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
