"""Serving benchmark: the HTTP server under Poisson load, full cache against a compressed policy at the same memory.

    python -m bench serve --model llama2-7b --cache full budget-0.45 --slots 32 --rates 1 2 4 8 16
    python -m bench serve --smoke                      # CPU: a tiny random model, two rates, a few requests
    python -m bench serve --eviction-phases            # decode ms/step with aligned vs staggered slots

For each policy a server (`pyrajax serve --random MODEL`, random bf16 weights of the preset's shape) runs in its
own process, so each holds only its own memory; this process is the load generator. The first policy gets
`--slots` slots; every other policy gets as many as the same decode-state memory holds (its capacities are
smaller), unless --same-slots. Every program is compiled before timing (the server's --warmup). Then for each
rate, `--requests` requests arrive as a Poisson process (exponential gaps, seeded), prompts of random token ids
with lengths log-uniform in [--prompt-min, --prompt-max], outputs in [--new-min, --new-max] tokens (every one
generated: EOS ignored). Reported per rate: output tokens/s over the span from the first arrival to the last
token, TTFT, TPOT (after the first token), end-to-end latency (p50 / p90 / p99), mean and peak slots in use, KV
bytes allocated and mean live (polled from /metrics). JSON in bench/results/ (or $OUT) with the environment, and
a PNG of throughput and p99 TPOT against the request rate.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# The server processes

def decode_state_bytes(model: str, policy: str, max_prompt: int, max_new: int, max_protected: int,
                       itemsize: int) -> int:
    """Bytes one slot's decode state holds: K and V at every layer's capacity (`itemsize` bytes each), plus the
    window-row and accumulated-score buffers its policy keeps (f32)."""
    import pyrajax
    from pyrajax.cache import cache_preset
    from pyrajax.engine import serving_plans
    cfg = pyrajax.preset(model)
    policy = cache_preset(policy)
    plan, _ = serving_plans([policy], max_prompt, max_new, cfg.num_layers, max_protected)
    kv = sum(plan.capacity) * cfg.kv_bytes_per_token_layer(itemsize)
    rows = sum(plan.capacity) * plan.window * 4 if policy.keeps_rows else 0
    acc = sum(plan.capacity) * 4 if policy.keeps_accumulated else 0
    return kv + rows + acc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, policy: str, slots: int, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pyrajax.cli", "serve", "--random", args.model, "--cache", policy,
           "--slots", str(slots), "--max-prompt", str(args.prompt_max), "--max-new", str(args.new_max),
           "--steps", str(args.steps), "--max-waiting", str(requests_per_rate(args, slots) * 2), "--port", str(port),
           "--max-protected", str(args.max_protected), "--drain-timeout", "5", "--warmup",
           "--dtype", args.dtype, "--min-bucket", str(args.min_bucket)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was up")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not up after {timeout:.0f} s")


def metrics(url: str) -> dict[str, float]:
    import httpx
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


# ---------------------------------------------------------------------------------------------------------
# The load

async def one_request(client, url: str, prompt: list[int], new: int) -> dict:
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return dict(status=r.status_code, sent=t0)
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                k = len(json.loads(line[6:])["choices"][0].get("token_ids") or [])
                if k:
                    last = time.perf_counter()
                    first = first or last
                    n += k
    return dict(status=200, sent=t0, first=first, last=last, tokens=n, prompt=len(prompt))


async def poll(url: str, stop: asyncio.Event, samples: list) -> None:
    while not stop.is_set():
        try:
            samples.append(await asyncio.to_thread(metrics, url))
        except Exception:  # noqa: BLE001  -- a missed sample is not an error
            pass
        await asyncio.sleep(0.25)


async def load(url: str, workload: list[tuple[float, list[int], int]], timeout: float) -> tuple[list, list]:
    """Send each (arrival second, prompt, new tokens) at its time; returns per-request records and /metrics
    samples taken while the load ran."""
    import httpx
    limits = httpx.Limits(max_connections=len(workload) + 8, max_keepalive_connections=len(workload) + 8)
    samples, stop = [], asyncio.Event()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        poller = asyncio.create_task(poll(url, stop, samples))
        start = time.perf_counter()

        async def at(t, prompt, new):
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            return await one_request(client, url, prompt, new)

        records = await asyncio.gather(*(at(*w) for w in workload))
        stop.set()
        await poller
    return records, samples


def requests_per_rate(args, slots: int) -> int:
    """--requests, but at least 3 per slot: fewer leave a large server's slots idle (measured on the H200: 96
    requests kept 45 of 71 slots busy) and its saturated throughput understated."""
    return max(args.requests, 3 * slots)


def workload(args, rate: float, vocab: int, seed: int, n: int) -> list[tuple[float, list[int], int]]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    lengths = np.exp(rng.uniform(np.log(args.prompt_min), np.log(args.prompt_max), n)).astype(int)
    news = rng.integers(args.new_min, args.new_max + 1, n)
    return [(float(t), rng.integers(3, vocab, int(s)).tolist(), int(n))
            for t, s, n in zip(np.cumsum(gaps) - gaps[0], lengths, news)]


def summarize(records: list[dict], samples: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == 200 and r["first"] is not None]
    pct = lambda xs: {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)} if xs else None  # noqa: E731
    span = max(r["last"] for r in ok) - min(r["sent"] for r in ok) if ok else float("nan")
    tokens = sum(r["tokens"] for r in ok)
    col = lambda name: [s[name] for s in samples if name in s]  # noqa: E731
    running = col("pyrajax_requests_running")
    return dict(requests=len(records), ok=len(ok), refused=sum(r["status"] != 200 for r in records),
                output_tokens=tokens, seconds=span, output_tokens_per_second=tokens / span if ok else 0.0,
                ttft_s=pct([r["first"] - r["sent"] for r in ok]),
                tpot_s=pct([(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
                e2e_s=pct([r["last"] - r["sent"] for r in ok]),
                slots_in_use_mean=float(np.mean(running)) if running else None,
                slots_in_use_max=max(running) if running else None,
                kv_bytes_allocated=(col("pyrajax_kv_cache_allocated_bytes") or [None])[-1],
                kv_bytes_live_mean=float(np.mean(col("pyrajax_kv_cache_live_bytes"))) if samples else None)


def bench_policy(args, policy: str, slots: int, vocab: int, out_dir: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = out_dir / f"serve-{args.model}-{policy}.log"
    started = time.perf_counter()
    proc = start_server(args, policy, slots, port, log_path)
    try:
        wait_healthy(url, proc, args.startup_timeout)
        compile_s = time.perf_counter() - started  # the server compiles every program before it is up
        rows = []
        for i, rate in enumerate(args.rates):
            records, samples = asyncio.run(load(url, workload(args, rate, vocab, i, requests_per_rate(args, slots)),
                                                args.request_timeout))
            row = dict(rate=rate, **summarize(records, samples))
            rows.append(row)
            print(json.dumps(dict(policy=policy, slots=slots, **{k: v for k, v in row.items()})), flush=True)
        return dict(policy=policy, slots=slots, requests_per_rate=requests_per_rate(args, slots),
                    compile_seconds=compile_s, rates=rows, log=log_path.name)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def offline_generate(args, policy: str, slots: int, out_dir: Path) -> dict:
    """Offline `generate` of `slots` prompts of --prompt-max tokens and --new-max new tokens (bench.throughput,
    in a child process so that it holds the device alone)."""
    out = out_dir / f"serve-offline-{args.model}-{policy}.json"
    subprocess.run([sys.executable, "-m", "bench.throughput", "--model", args.model, "--batch", str(slots),
                    "--prompt", str(args.prompt_max), "--new", str(args.new_max), "--cache", policy,
                    "--repeat", "2", "--out", str(out)], cwd=REPO, check=True)
    row = json.loads(out.read_text())["runs"][0]
    return {k: row[k] for k in ("tokens_per_second", "prefill_seconds", "decode_ms_per_step", "kv_bytes",
                                "fraction_of_roofline")}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for run in result["runs"]:
        rates = [r["rate"] for r in run["rates"]]
        label = f"{run['policy']} ({run['slots']} slots)"
        a.plot(rates, [r["output_tokens_per_second"] for r in run["rates"]], "o-", label=label)
        b.plot(rates, [1e3 * (r["tpot_s"] or {}).get("p99", float("nan")) for r in run["rates"]], "o-", label=label)
    a.set(xlabel="request rate (1/s)", ylabel="output tokens/s", title="throughput")
    b.set(xlabel="request rate (1/s)", ylabel="ms", title="p99 time per output token")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"pyrajax serve, {result['model']}, prompts {result['workload']['prompt']}, "
                 f"outputs {result['workload']['new']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------------
# Eviction with slots at different phases

def eviction_phases(args) -> dict:
    """Decode ms/step of a budget policy with every slot started together (eviction on one step in gen_block)
    and with slots started `gen_block / slots` steps apart (some slot evicts on most steps)."""
    import jax
    import jax.numpy as jnp
    import pyrajax
    from pyrajax.engine import Request, make_engine
    from pyrajax.generate import decode_program
    cfg = pyrajax.preset(args.model)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    params = pyrajax.random_params(jax.random.key(0), cfg, dtype)
    policy = next(p for p in args.cache if p != "full")
    rng = np.random.default_rng(0)
    out = {}
    for name, gap in (("aligned", 0), ("staggered", 3)):
        eng = make_engine(params, cfg, [pyrajax.cache_preset(policy)], slots=args.slots, max_prompt=args.prompt_max,
                          max_new=args.new_max, steps=gap or args.steps, max_protected=args.max_protected)
        for _ in range(args.slots):  # a gap of 3 steps (coprime with 16) puts the slots at distinct phases
            eng.submit(eng.prepare(Request(ids=rng.integers(3, cfg.vocab_size, args.prompt_max).tolist(),
                                           max_new=args.new_max)))
            if gap:
                eng.step()
        for _ in range(3):
            eng.step()
        state, z, f = eng.state, np.zeros(args.slots, bool), np.bool_(False)
        run = lambda st: decode_program(params, st, z, f, plan=eng.plan, cfg=cfg, impl="auto", steps=32)  # noqa: E731
        state = jax.block_until_ready(run(state))[0]
        t = time.perf_counter()
        for _ in range(4):
            state, tokens, _ = run(state)
        jax.block_until_ready(tokens)
        out[name] = 1e3 * (time.perf_counter() - t) / (4 * 32)
        print(f"{policy} {name}: {out[name]:.2f} ms/step", flush=True)
    return dict(policy=policy, slots=args.slots, prompt=args.prompt_max, ms_per_step=out)


# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--cache", nargs="+", default=["full", "budget-0.45"])
    ap.add_argument("--slots", type=int, default=32, help="slots of the first policy")
    ap.add_argument("--same-slots", action="store_true", help="every policy gets --slots (not the same memory)")
    ap.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=200, help="requests per rate (at least 3 per slot)")
    ap.add_argument("--prompt-min", type=int, default=128)
    ap.add_argument("--prompt-max", type=int, default=2048)
    ap.add_argument("--new-min", type=int, default=64)
    ap.add_argument("--new-max", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per compiled call")
    ap.add_argument("--min-bucket", type=int, default=16, help="the servers' smallest prompt bucket (compile time)")
    ap.add_argument("--offline", action="store_true",
                    help="also time offline generate (bench.throughput) at each policy's slots, --prompt-max + "
                         "--new-max: the reference of the server's saturated tok/s (use fixed lengths)")
    ap.add_argument("--max-protected", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights and KV")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--request-timeout", type=float, default=1800)
    ap.add_argument("--eviction-phases", action="store_true", help="only measure aligned vs staggered eviction")
    ap.add_argument("--smoke", action="store_true", help="tiny model, small lengths, two rates (CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT or bench/results/)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.slots, args.rates, args.requests = "tiny", 4, [4.0, 16.0], 12
        args.prompt_min, args.prompt_max, args.new_min, args.new_max = 8, 96, 4, 32
        args.cache = [c if c == "full" else c + ":min_tokens=0" for c in args.cache]
        args.dtype = "float32"
    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.eviction_phases:
        from bench.throughput import env_info
        result = dict(env_info(), benchmark="serve-eviction-phases", model=args.model, **eviction_phases(args))
        out = Path(args.out) if args.out else out_dir / f"serve-eviction-phases-{args.model}.json"
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
        return 0
    import pyrajax
    vocab = pyrajax.preset(args.model).vocab_size
    itemsize = 2 if args.dtype == "bfloat16" else 4
    sizes = {p: decode_state_bytes(args.model, p, args.prompt_max, args.new_max, args.max_protected, itemsize)
             for p in args.cache}
    # This process never touches the device (XLA's GPU preallocation would take the servers' memory): the
    # environment comes from a child of its own.
    env = json.loads(subprocess.run([sys.executable, "-c", "import json; from bench.throughput import env_info; "
                                     "print(json.dumps(env_info()))"], cwd=REPO, capture_output=True, text=True,
                                    check=True).stdout.splitlines()[-1])
    first = args.cache[0]
    budget = args.slots * sizes[first]  # the decode-state memory every policy gets
    runs = []
    for policy in args.cache:
        slots = args.slots if args.same_slots or policy == first else budget // sizes[policy]
        run = dict(bench_policy(args, policy, slots, vocab, out_dir), state_bytes_per_slot=sizes[policy])
        if args.offline:
            run["offline"] = offline_generate(args, policy, slots, out_dir)
            best = max(r["output_tokens_per_second"] for r in run["rates"])
            run["saturated_over_offline"] = best / run["offline"]["tokens_per_second"]
            print(f"{policy}: server {best:.0f} tok/s, offline {run['offline']['tokens_per_second']:.0f} tok/s "
                  f"({run['saturated_over_offline']:.1%})", flush=True)
        runs.append(run)
    result = dict(env, benchmark="serve", model=args.model, smoke=args.smoke, state_bytes_budget=budget,
                  workload=dict(prompt=[args.prompt_min, args.prompt_max], new=[args.new_min, args.new_max],
                                requests_per_rate=args.requests, steps=args.steps, arrivals="poisson",
                                min_bucket=args.min_bucket), runs=runs)
    stem = f"serve-{args.model}{'-smoke' if args.smoke else ''}"
    out = Path(args.out) if args.out else out_dir / f"{stem}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"\n{'policy':>14} {'slots':>5} {'rate':>6} {'tok/s':>8} {'TTFT p50':>9} {'TPOT p99':>9} "
          f"{'e2e p99':>8} {'slots used':>10}")
    for run in runs:
        for r in run["rates"]:
            f = lambda d, k: f"{1e3 * d[k]:.0f}ms" if d else "-"  # noqa: E731
            print(f"{run['policy']:>14} {run['slots']:>5} {r['rate']:>6.1f} {r['output_tokens_per_second']:>8.1f} "
                  f"{f(r['ttft_s'], 'p50'):>9} {f(r['tpot_s'], 'p99'):>9} {f(r['e2e_s'], 'p99'):>8} "
                  f"{r['slots_in_use_mean'] or 0:>10.1f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
