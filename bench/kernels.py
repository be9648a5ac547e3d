"""GPU check + timing of the Pallas kernels against their XLA references (a script, not a test).

    PYTHONPATH=. python bench/kernels.py [--iters 50] [--small]

For each case: the Pallas result vs the jnp reference on the GPU, the median time of the Pallas and XLA paths,
the bytes a kernel must move (and FLOPs where they matter), and the achieved bandwidth against the copy
ceiling measured at the start (`bench.ceilings`: copy bandwidth and bf16 matmul rate, both in the JSON).
Writes JSON to $OUT/kernels-<device>.json when $OUT is set, else bench/results/kernels-<device>.json, and
prints a table last. A case that fails (e.g. a Triton compile error)
is recorded with its error and the run goes on. --small runs tiny shapes (a CPU smoke test, interpret mode).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ceilings import measure as measure_ceilings  # noqa: E402
from pallas_kernels.decode_attention import (decode_attention, decode_attention_reference,  # noqa: E402
                                             decode_block_sizes)
from pallas_kernels.gather import pivotal_gather, pivotal_gather_reference  # noqa: E402
from pallas_kernels.score_reduction import (score_reduction, score_reduction_reference,  # noqa: E402
                                            window_rows, window_rows_reference)
from pyrajax.validate import cli_int  # noqa: E402

BF16 = jnp.bfloat16


def timed(fn, args, iters, reps=10):
    """Median seconds per call: `iters` samples of `reps` back-to-back calls (amortises dispatch), warm first."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def max_rel_err(got, want):
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if np.isnan(g).any():
            return float("nan")
        errs.append(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-12)))
    return max(errs)


# ----------------------------------------------------------------------------- cases
def decode_case(B, H, K, C, length, hd=128, dtype=BF16):
    kq, kk, kv, kp = jax.random.split(jax.random.PRNGKey(C + H), 4)
    # The engine's layout: every sequence's first `length` slots hold tokens 0..length-1 (all read).
    k_pos = jnp.broadcast_to(jnp.where(jnp.arange(C) < length, jnp.arange(C), -1), (B, C)).astype(jnp.int32)
    args = (jax.random.normal(kq, (B, H, hd), dtype), jax.random.normal(kk, (B, K, C, hd), dtype),
            jax.random.normal(kv, (B, K, C, hd), dtype), k_pos, jnp.full((B,), length - 1, jnp.int32),
            jnp.int32(length))
    it = jnp.dtype(dtype).itemsize
    nbytes = 2 * B * K * length * hd * it + B * length * 4 + 2 * B * H * hd * it + B * C * 4  # K/V, pos, q/out, probs
    bc, splits, _, _ = decode_block_sizes(B, K, C, hd)
    return dict(name=f"decode B={B} H={H} K={K} C={C} len={length}",
                config=dict(B=B, H=H, K=K, C=C, length=length, hd=hd, dtype=jnp.dtype(dtype).name,
                            block_c=bc, num_splits=splits),
                fn=decode_attention, ref=decode_attention_reference, args=args, bytes=nbytes,
                flops=4 * B * H * length * hd, tol=2e-2)


def score_case(B, H, K, W, n, hd=128, dtype=BF16):
    kq, kk, kp = jax.random.split(jax.random.PRNGKey(n + H), 3)
    k_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))  # a full prompt, no padding
    last = jnp.full((B,), n - 1, jnp.int32)
    rw = jnp.linspace(1.0, 1.2, W)[None].repeat(B, 0)
    args = (jax.random.normal(kq, (B, H, W, hd), dtype), jax.random.normal(kk, (B, K, n, hd), dtype),
            (last[:, None] - jnp.arange(W)[::-1]).astype(jnp.int32), k_pos, rw / rw.sum(1, keepdims=True))
    it = jnp.dtype(dtype).itemsize
    nbytes = B * H * W * hd * it + B * K * n * hd * it + B * (n + 2 * W) * 4 + B * n * 4
    return dict(name=f"score B={B} H={H} K={K} W={W} n={n}",
                config=dict(B=B, H=H, K=K, W=W, n=n, hd=hd, dtype=jnp.dtype(dtype).name),
                fn=score_reduction, ref=score_reduction_reference, args=args, bytes=nbytes,
                flops=2 * 2 * B * H * W * n * hd, tol=2e-2)  # QK^T in each of the two passes


def rows_case(B, H, K, W, n, hd=128, dtype=BF16):
    kq, kk = jax.random.split(jax.random.PRNGKey(n + H + 1), 2)
    k_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))  # a full prompt, no padding
    q_pos = jnp.broadcast_to(jnp.arange(n - W, n, dtype=jnp.int32), (B, W))  # the window: the last W positions
    args = (jax.random.normal(kq, (B, W, H, hd), dtype), jax.random.normal(kk, (B, n, K, hd), dtype), q_pos, k_pos)
    it = jnp.dtype(dtype).itemsize
    nbytes = B * W * H * hd * it + B * n * K * hd * it + B * (n + W) * 4 + B * W * n * 4  # q, k, positions, rows
    return dict(name=f"rows B={B} H={H} K={K} W={W} n={n}",
                config=dict(B=B, H=H, K=K, W=W, n=n, hd=hd, dtype=jnp.dtype(dtype).name),
                fn=window_rows, ref=window_rows_reference, args=args, bytes=nbytes,
                flops=2 * 2 * B * H * W * n * hd, tol=2e-2)  # QK^T in each of the two passes


def gather_case(B, n, m, D, K=0, hd=128, dtype=BF16):
    ki, kh, kk, kv = jax.random.split(jax.random.PRNGKey(m + K), 4)
    idx = jnp.sort(jax.vmap(lambda r: jax.random.permutation(r, n)[:m])(jax.random.split(ki, B)), axis=1)
    kvs = [jax.random.normal(x, (B, K, n, hd), dtype) for x in (kk, kv)] if K else [None, None]
    args = (idx.astype(jnp.int32), jax.random.normal(kh, (B, n, D), dtype),
            jnp.arange(n, dtype=jnp.int32)[None].repeat(B, 0), *kvs)
    it = jnp.dtype(dtype).itemsize
    nbytes = B * m * 4 + 2 * B * m * (D * it + 4 + 2 * K * hd * it)  # idx, then read + write each kept row
    return dict(name=f"gather B={B} n={n} m={m} D={D}" + (f" +kv K={K}" if K else ""),
                config=dict(B=B, n=n, m=m, D=D, K=K, hd=hd, dtype=jnp.dtype(dtype).name),
                fn=pivotal_gather, ref=pivotal_gather_reference, args=args, bytes=nbytes, flops=0, tol=0.0)


def cases(small: bool):
    if small:  # CPU smoke test of the script itself
        return [decode_case(2, 4, 2, 64, 40, hd=32), score_case(2, 4, 2, 9, 40, hd=32),
                rows_case(2, 4, 2, 9, 40, hd=32),
                gather_case(2, 40, 30, 64, K=2, hd=32)]
    return ([decode_case(32, 32, 32, C, C) for C in (1024, 2048, 4096)]
            + [decode_case(32, 32, 32, 4096, 2048),  # half-filled cache: the kernel skips slots >= length
               decode_case(32, 64, 8, 4096, 4096),   # GQA
               decode_case(1, 32, 32, 4096, 4096),   # batch 1: split along the cache
               score_case(32, 32, 32, 103, 512), score_case(32, 64, 8, 103, 512),
               rows_case(32, 32, 32, 103, 512), rows_case(32, 64, 8, 103, 512),
               gather_case(32, 512, 460, 4096), gather_case(32, 512, 460, 4096, K=32)])


def run_case(case, iters, ceilings):
    row = dict(name=case["name"], config=case["config"], bytes=case["bytes"], flops=case["flops"])
    try:
        pallas = jax.jit(functools.partial(case["fn"], impl="pallas"))
        xla = jax.jit(functools.partial(case["fn"], impl="xla"))
        err = max_rel_err(pallas(*case["args"]), jax.jit(case["ref"])(*case["args"]))
        row.update(max_rel_err=err, ok=bool(err <= case["tol"]))
        for impl, fn in (("pallas", pallas), ("xla", xla)):
            t = timed(fn, case["args"], iters)
            row[f"{impl}_us"] = t * 1e6
            row[f"{impl}_TBps"] = case["bytes"] / t / 1e12
            row[f"{impl}_frac_peak_bw"] = case["bytes"] / t / ceilings["copy_bytes_per_second"]
            if case["flops"]:
                row[f"{impl}_TFLOPs"] = case["flops"] / t / 1e12
        row["speedup_vs_xla"] = row["xla_us"] / row["pallas_us"]
        # Lower bound from the two ceilings: the kernel can't beat max(bytes / BW, flops / peak).
        row["roofline_us"] = max(case["bytes"] / ceilings["copy_bytes_per_second"],
                                 case["flops"] / ceilings["matmul_flops_per_second"]) * 1e6
    except Exception as e:  # keep going: the lead wants every figure a run can give
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:4000], traceback=traceback.format_exc()[-4000:])
    return row


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=cli_int(1), default=50)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--decode-capacities", type=int, nargs="+",
                    help="only decode attention, 7B shape at batch 32, full caches of these slot counts")
    opts = ap.parse_args()
    dev = jax.devices()[0]
    ceilings = measure_ceilings()
    rows = []
    todo = ([decode_case(32, 32, 32, C, C) for C in opts.decode_capacities] if opts.decode_capacities
            else cases(opts.small))
    for case in todo:
        rows.append(run_case(case, opts.iters, ceilings))
        print(f"done: {case['name']}", file=sys.stderr, flush=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", dev.device_kind).strip("-")
    report = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, jaxlib=jaxlib.__version__,
                  python=platform.python_version(), git_commit=git_commit(), ceilings=ceilings,
                  iters=opts.iters, results=rows)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernels-{'decode-capacity-' if opts.decode_capacities else ''}{device}.json"
    path.write_text(json.dumps(report, indent=1))

    print(f"\n{dev.device_kind}  jax {jax.__version__}  -> {path}")
    print(f"{'case':44s} {'ok':>3s} {'err':>8s} {'pallas us':>10s} {'xla us':>10s} {'x xla':>6s} "
          f"{'TB/s':>6s} {'%BW':>5s} {'roof us':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:44s} ERROR {r['error'].splitlines()[0][:80]}")
            continue
        print(f"{r['name']:44s} {'y' if r['ok'] else 'N':>3s} {r['max_rel_err']:8.1e} {r['pallas_us']:10.1f} "
              f"{r['xla_us']:10.1f} {r['speedup_vs_xla']:6.2f} {r['pallas_TBps']:6.2f} "
              f"{100 * r['pallas_frac_peak_bw']:5.1f} {r['roofline_us']:8.1f}")


if __name__ == "__main__":
    main()
