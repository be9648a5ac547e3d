"""Throughput of pyrajax on random weights of a preset's exact shapes (a benchmark, not a test).

    python -m bench.throughput --model llama2-7b --batch 32 --prompt 512 --new 256 --cache full paper budget-0.45

Weights are created on the device (bf16); every token is forced (no stop ids), so each run generates exactly
batch x new tokens. The first call of each policy compiles (reported as compile seconds, never inside the
timings); the next `--repeat` calls are timed and the median reported. Throughput counts generated tokens over
wall time including prefill. The roofline of a decode step reads every weight and every live KV byte once at
the device's copy bandwidth; prefill runs at its bf16 matmul rate. Both are measured when the run starts
(`bench.ceilings`, a few seconds) and recorded in the JSON: no device's numbers are assumed.

`--tp N` splits the model over N devices (`pyrajax.sharding`; the weights are created in their shards): the JSON
then records per-device bytes of weights and KV and each device's peak, and the roofline is one device's share
(its weights, its KV, its prefill FLOPs) at that device's ceilings; the all-reduces are not in it. On CPU, fake
devices: XLA_FLAGS=--xla_force_host_platform_device_count=N.

Peak memory (`peak_bytes_in_use` of device.memory_stats(); None where the backend keeps no stats, e.g. CPU)
is a process-lifetime high-water mark that cannot be reset. So when more than one (cache, impl) run is asked
for, each runs in a fresh subprocess of this script (same workload arguments, a single --cache and --impl, its
JSON to a temporary --out) and the parent, which never touches the device itself, merges their `runs` into
one JSON of the same structure; every run records the `pid` that measured it. Each subprocess creates its own
weights and compiles afresh (compile seconds stay per run, as before). A single run stays in-process.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import pyrajax
from bench import ceilings as device_ceilings
from pyrajax import sharding
from pyrajax.generate import GenerationConfig, generate
from pyrajax.params import checkpoint_bytes
from pyrajax.validate import IMPLS, cli_cache, cli_int

REPO = Path(__file__).resolve().parents[1]


def env_info() -> dict:
    # $PYRAJAX_COMMIT names the commit where the code runs from a copy without git history (the GPU machine).
    commit = os.environ.get("PYRAJAX_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip() or None
    dev = jax.devices()[0]
    return dict(device=getattr(dev, "device_kind", str(dev)), platform=dev.platform, jax=jax.__version__,
                jaxlib=jaxlib.__version__, commit=commit)


def peak_memory(device=None) -> int | None:
    stats = (device or jax.devices()[0]).memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def roofline(cfg, params_bytes: int, batch: int, prompt: int, new: int, stats: dict, ceilings: dict,
             tp: int = 1, params_bytes_per_device: int | None = None) -> dict:
    """Ideal seconds: prefill matmul FLOPs at the measured matmul rate + decode steps reading weights and the
    mean live KV (the average of the lengths after prefill and at the end, per layer) at the measured copy
    bandwidth (`ceilings`, from `bench.ceilings.measure`). With tp > 1: one device's share (its weights, its
    KV, 1/tp of the FLOPs) at one device's ceilings, all devices in parallel, communication not counted."""
    n_params = params_bytes / 2
    prefill_flops = 2 * n_params * batch * prompt / tp
    per_token = cfg.kv_bytes_per_token_layer(2)
    if tp > 1:  # one device's share of the KV: its heads
        per_token *= stats["kv_bytes_per_device"] / stats["kv_bytes"]
    params_bytes = params_bytes if params_bytes_per_device is None else params_bytes_per_device
    kv_start = sum(sum(l) for l in stats["lengths_after_prefill"]) * per_token
    kv_end = sum(sum(l) for l in stats["lengths_at_end"]) * per_token
    decode_s = (new - 1) * (params_bytes + (kv_start + kv_end) / 2) / ceilings["copy_bytes_per_second"]
    prefill_s = prefill_flops / ceilings["matmul_flops_per_second"]
    return dict(prefill_seconds=prefill_s, decode_seconds=decode_s,
                tokens_per_second=batch * new / (prefill_s + decode_s))


def run_policy(params, cfg, prompts, new: int, cache: str, impl: str, repeat: int, decode_chunk: int = 0) -> dict:
    gcfg = GenerationConfig(model=cfg, max_new_tokens=new, cache=cache, stop_ids=(), impl=impl,
                            decode_chunk=decode_chunk or None)
    t0 = time.perf_counter()
    first = generate(params, prompts, gcfg)
    first_s = time.perf_counter() - t0
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = generate(params, prompts, gcfg)
        runs.append((time.perf_counter() - t0, r))
    wall = statistics.median(w for w, _ in runs)
    r = runs[0][1]
    s = r.stats
    assert all(len(t) == new for t in r.tokens), "every token is forced"
    return dict(cache=cache, impl=impl, decode_chunk=decode_chunk or None, wall_seconds=wall,
                compile_seconds=max(first_s - wall, 0.0),
                tokens_per_second=len(prompts) * new / wall, prefill_seconds=statistics.median(
                    x.stats["prefill_seconds"] for _, x in runs),
                decode_ms_per_step=1e3 * statistics.median(x.stats["decode_seconds"] for _, x in runs) / (new - 1),
                kv_bytes=s["kv_bytes"], full_kv_bytes=s["full_kv_bytes"], kv_fraction=s["kv_fraction"],
                tp=s["tp"], kv_bytes_per_device=s["kv_bytes_per_device"],
                peak_memory_bytes_per_device=[peak_memory(d) for d in devices(params)],
                live_kv_bytes_at_end=s["live_kv_bytes"], capacity_per_layer=s["capacity_per_layer"],
                lengths_after_prefill=s["lengths_after_prefill"][0], lengths_at_end=s["lengths_at_end"][0],
                peak_memory_bytes=peak_memory(), pid=os.getpid(), first_tokens=r.tokens[0][:8], _stats=s)


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The workload every benchmark shares (the paper's Table 1 setup by default)."""
    ap.add_argument("--model", default="llama2-7b", choices=sorted(pyrajax.config.PRESETS))
    ap.add_argument("--batch", type=cli_int(1), default=32)
    ap.add_argument("--prompt", type=cli_int(1), default=512)
    ap.add_argument("--new", type=cli_int(2), default=256, help="new tokens (>= 2: decode steps are timed)")


def devices(params) -> list:
    mesh = sharding.mesh_of(params)
    return list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]


def run_in_process(args) -> dict:
    """Every (cache, impl) run of `args` in this process: the result JSON (env, workload, runs)."""
    cfg = pyrajax.preset(args.model)
    mesh = pyrajax.make_mesh(tp=args.tp) if args.tp > 1 else None
    # Created array by array on the devices (in their shards): one jitted program for all weights compiles for
    # minutes, and with --tp no device ever holds the whole model.
    params = sharding.random_params(jax.random.key(0), cfg, mesh, jnp.bfloat16)
    params_bytes = checkpoint_bytes(cfg, 2)  # the model's own (KV heads copied for tensor parallelism once)
    params_bytes_per_device = sharding.bytes_per_device(params)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, args.prompt).tolist() for _ in range(args.batch)]
    ceilings = device_ceilings.measure()
    rows = []
    for cache in args.cache:
        for impl in args.impl:
            row = run_policy(params, cfg, prompts, args.new, cache, impl, args.repeat, args.decode_chunk)
            row["roofline"] = roofline(cfg, params_bytes, args.batch, args.prompt, args.new, row.pop("_stats"),
                                       ceilings, args.tp, params_bytes_per_device if args.tp > 1 else None)
            row["ceilings"] = ceilings
            row["fraction_of_roofline"] = row["tokens_per_second"] / row["roofline"]["tokens_per_second"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    env = env_info()
    env["commit"] = args.commit or env["commit"]
    return dict(env, benchmark="throughput", model=args.model, batch=args.batch, prompt=args.prompt,
                new=args.new, tp=args.tp, params_bytes=params_bytes, params_bytes_per_device=params_bytes_per_device,
                ceilings=ceilings, runs=rows)


def run_in_subprocesses(args, runs: list[tuple[str, str]]) -> dict:
    """Each (cache, impl) in its own child process, so that each peak memory is that run's alone; the
    children's JSONs merged. The parent does not initialise the device (it would hold memory the children
    need, e.g. XLA's GPU preallocation), so env and params_bytes come from the children."""
    results = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for i, (cache, impl) in enumerate(runs):
            out = Path(tmp) / f"run{i}.json"
            cmd = [sys.executable, "-m", "bench.throughput", "--model", args.model, "--batch", str(args.batch),
                   "--prompt", str(args.prompt), "--new", str(args.new), "--repeat", str(args.repeat),
                   "--cache", cache, "--impl", impl, "--tp", str(args.tp), "--decode-chunk", str(args.decode_chunk),
                   "--out", str(out)]
            if args.commit:
                cmd += ["--commit", args.commit]
            subprocess.run(cmd, check=True, cwd=REPO)
            results.append(json.loads(out.read_text()))
    merged = results[0]
    merged["runs"] = [row for res in results for row in res["runs"]]
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--cache", nargs="+", type=cli_cache, default=["full", "paper", "budget-0.45"])
    ap.add_argument("--impl", nargs="+", choices=IMPLS, default=["auto"])
    ap.add_argument("--repeat", type=cli_int(1), default=2)
    ap.add_argument("--tp", type=cli_int(1), default=1, help="tensor-parallel devices (the model split over them)")
    ap.add_argument("--decode-chunk", type=cli_int(0), default=0,
                    help="decode steps per device call (0: the whole generation in one call, generate's default)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT or bench/results/)")
    ap.add_argument("--commit", default=None, help="record this commit (where the machine has no git history)")
    args = ap.parse_args(argv)
    runs = list(itertools.product(args.cache, args.impl))
    result = run_in_process(args) if len(runs) == 1 else run_in_subprocesses(args, runs)
    tp = f"-tp{args.tp}" if args.tp > 1 else ""
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or Path(__file__).parent / "results") / \
        f"throughput-{args.model}-b{args.batch}{tp}-{result['device'].replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'cache':>12} {'impl':>6} {'tok/s':>8} {'prefill s':>9} {'ms/step':>8} {'KV GiB':>7} {'KV %':>6} "
          f"{'roofline':>8} {'compile s':>9} {'peak GiB':>8}")
    for r in result["runs"]:
        peak = r["peak_memory_bytes"] or 0
        print(f"{r['cache']:>12} {r['impl']:>6} {r['tokens_per_second']:>8.0f} {r['prefill_seconds']:>9.3f} "
              f"{r['decode_ms_per_step']:>8.2f} {r['kv_bytes'] / 2**30:>7.2f} {r['kv_fraction']:>6.1%} "
              f"{r['fraction_of_roofline']:>8.1%} {r['compile_seconds']:>9.1f} {peak / 2**30:>8.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
