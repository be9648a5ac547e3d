"""Long runs stay flat: many consecutive `generate` calls in one process over several buckets and policies.

    python -m bench longrun                                   # the embedded SmolLM2-135M, 1000 calls
    python -m bench longrun --model tiny --calls 1000         # random weights of a preset

The calls cycle through every (policy, prompt length, batch size): several prompt and batch buckets, each
policy's own programs. Every call has fresh prompt ids and its own seed (sampling at temperature 0.7, top-p 0.9),
so only data changes within a combination. A first round compiles every combination; then the run measures,
at its start and end:
  * compilations: TRACE_COUNTS must not move after the first call of each combination;
  * live jax arrays: their number and bytes must be the same at the end as at the start (a leak is a failure);
  * resident memory (RSS): over the second half of the run it must grow less than --rss-slack MiB (the first
    half lets the allocator settle; a leak of K bytes a call shows as K * calls / 2).
Prints one JSON report (also written to --out); exit status 1 when any check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

import pyrajax
from bench.throughput import env_info
from pyrajax import validate
from pyrajax.generate import TRACE_COUNTS


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux), or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def live_buffers() -> tuple[int, int]:
    """(number, bytes) of the jax arrays alive now."""
    gc.collect()
    arrays = jax.live_arrays()
    return len(arrays), sum(a.nbytes for a in arrays)


def long_run(params, cfg, calls: int, policies, prompt_lens, batches, new_tokens: int = 8,
             rss_slack_mib: float = 32.0, log=None) -> dict:
    """`calls` generate calls cycling over every (policy, prompt length, batch); the report of `main`."""
    combos = list(itertools.product(policies, prompt_lens, batches))
    configs = {p: pyrajax.GenerationConfig(model=cfg, max_new_tokens=new_tokens, cache=p, temperature=0.7,
                                           top_p=0.9) for p in policies}
    rng = np.random.default_rng(0)

    def call(i: int):
        policy, length, batch = combos[i % len(combos)]
        prompts = [rng.integers(3, cfg.vocab_size, length - j % 3).tolist() for j in range(batch)]  # ragged
        return pyrajax.generate(params, prompts, dataclasses.replace(configs[policy], seed=i))

    t0 = time.perf_counter()
    compressed = dict.fromkeys(policies, False)
    for i, (policy, _, _) in enumerate(combos):  # the first call of each combination compiles
        compressed[policy] |= call(i).stats["compressed"]
    warm_s = time.perf_counter() - t0
    traces, (arrays0, bytes0), rss = dict(TRACE_COUNTS), live_buffers(), [rss_bytes()]
    t0 = time.perf_counter()
    for i in range(len(combos), len(combos) + calls):
        call(i)
        done = i - len(combos) + 1
        if done % max(1, calls // 10) == 0 or done == calls:
            gc.collect()
            rss.append(rss_bytes())
            if log:
                log(f"{done}/{calls} calls, rss {rss[-1] / 2**20 if rss[-1] else float('nan'):.1f} MiB")
    run_s = time.perf_counter() - t0
    arrays1, bytes1 = live_buffers()
    mib = [None if r is None else r / 2**20 for r in rss]
    half = mib[len(mib) // 2]
    rss_growth = None if half is None or mib[-1] is None else mib[-1] - half
    checks = dict(no_recompilation=dict(TRACE_COUNTS) == traces,
                  live_arrays_flat=(arrays0, bytes0) == (arrays1, bytes1),
                  rss_flat=rss_growth is None or rss_growth < rss_slack_mib)
    return dict(calls=calls, combinations=[list(c) for c in combos], compressed=compressed,
                new_tokens=new_tokens, warmup_seconds=warm_s, run_seconds=run_s, ms_per_call=1e3 * run_s / calls,
                traces_after_warmup=traces, traces_at_end=dict(TRACE_COUNTS),
                live_arrays=dict(start=arrays0, end=arrays1), live_array_bytes=dict(start=bytes0, end=bytes1),
                rss_mib=dict(start=mib[0], second_half_start=half, end=mib[-1], samples=mib,
                             growth_second_half=rss_growth, slack=rss_slack_mib),
                checks=checks, passed=all(checks.values()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench longrun", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a converted checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--model", choices=sorted(pyrajax.config.PRESETS),
                    help="random weights of this preset instead of a checkpoint")
    ap.add_argument("--calls", type=validate.cli_int(1), default=1000, help="calls after the warm-up round")
    ap.add_argument("--cache", nargs="+", type=validate.cli_cache,
                    default=["full", "budget-0.5:min_tokens=0", "h2o-0.5:min_tokens=0"])
    ap.add_argument("--prompt-lens", nargs="+", type=validate.cli_int(3), default=[20, 100],
                    help="longest prompt of each batch (the others 1-2 tokens shorter)")
    ap.add_argument("--batches", nargs="+", type=validate.cli_int(1), default=[1, 3])
    ap.add_argument("--new", type=validate.cli_int(1), default=8, help="new tokens per call")
    ap.add_argument("--rss-slack", type=float, default=32.0, help="MiB the second half may grow (default 32)")
    ap.add_argument("--out", type=Path, help="JSON report (default: $OUT/longrun.json or bench/results/)")
    args = ap.parse_args(argv)
    if args.model:
        cfg = pyrajax.preset(args.model)
        params, name = pyrajax.random_params(jax.random.key(0), cfg), args.model
    else:
        from checkpoints_convert.embedded import default_model_dir
        path = Path(args.checkpoint or default_model_dir())
        params, cfg = pyrajax.load(path, dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
        name = path.name
    report = long_run(params, cfg, args.calls, args.cache, args.prompt_lens, args.batches, args.new,
                      args.rss_slack, log=lambda m: print(m, file=sys.stderr, flush=True))
    report.update(env_info(), model=name)
    out = args.out or Path(os.environ.get("OUT") or "bench/results") / f"longrun-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "combinations"}))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
