"""Batch sweep and maximum batch per cache policy, with the HF transformers peers of the same run.

    python -m bench.sweep --model llama2-7b --prompt 512 --new 256 --cache full paper budget-0.45
        [--batches 1 8 32 64 128 256 512] [--peers eager static-compile] [--peer-batch 32] [--no-peers]

Every (policy, batch) runs `bench.throughput --repeat 1` in a fresh process (its own GPU memory, its own peak),
in increasing batch order; the first run that fails ends that policy's sweep. A failure whose stderr says
out-of-memory (RESOURCE_EXHAUSTED, "out of memory", ...) is the limit: the batch before it is the maximum.
`--bisect N` then tries up to N batches in between; pyrajax pads a batch to its batch bucket (a power of two up
to 1024), so only batches of a different bucket are tried (often none). Other failures (a budget too small
for the prompt, a timeout) are recorded with their stderr tail. The HF peers (`bench.hf_peer`, one process
each) run at `--peer-batch`. JAX may use `--mem-fraction` of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, unless
set). The JSON (env, settings, rows, per-policy maximum, peers, ratios) is rewritten after every process to
$OUT or bench/results/; `--resume FILE` starts from a previous sweep's rows and reruns only what is not ok/oom
there, and `--deadline S` starts nothing that would end after S seconds, so a sweep can span several calls.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_ENV = dict(os.environ)  # the children get the GPU; this process only needs the presets and batch buckets
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import pyrajax  # noqa: E402
from pyrajax.generate import bucket  # noqa: E402
from pyrajax.validate import IMPLS, cli_cache, cli_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemoryError|CUDA_ERROR_OUT_OF_MEMORY|"
                 r"failed to allocate|ran out of memory", re.I)
KEEP = ("tokens_per_second", "wall_seconds", "prefill_seconds", "decode_ms_per_step", "compile_seconds", "kv_bytes",
        "full_kv_bytes", "kv_fraction", "live_kv_bytes_at_end", "peak_memory_bytes", "fraction_of_roofline",
        "roofline", "capacity_per_layer", "lengths_after_prefill", "lengths_at_end", "impl", "tp",
        "kv_bytes_per_device", "peak_memory_bytes_per_device")


def child(cmd: list[str], out: Path, timeout: float, env: dict) -> dict:
    """One benchmark process: status ok / oom / error / timeout, its seconds, and the JSON it wrote."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # its own group: a timeout also ends its compile workers
    try:
        log, _ = p.communicate(timeout=timeout)
        status = "ok" if p.returncode == 0 else "oom" if OOM.search(log) else "error"
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, status = p.communicate()[0], "timeout"
    row = dict(status=status, seconds=round(time.perf_counter() - t0, 1), returncode=p.returncode)
    data = json.loads(out.read_text()) if out.exists() else None
    if data and data.get("status") in ("oom", "timeout", "skipped"):  # hf_peer says itself
        row["status"] = data["status"]
    if row["status"] != "ok" and data and data.get("error"):
        row["error"] = data["error"]
    elif row["status"] != "ok":
        hit = OOM.search(log or "")
        row["error"] = log[max(hit.start() - 200, 0):hit.end() + 300] if hit and row["status"] == "oom" \
            else (log or "")[-2500:]
    return dict(row, data=data)


def last_line(text: str | None) -> str:
    lines = [x for x in (text or "").splitlines() if x.strip()]
    return lines[-1].strip()[:200] if lines else ""


def summarize(rows: list[dict], peers: list[dict], policies: list[str], ref: int) -> tuple[dict, dict]:
    """Per policy: the largest batch that ran and what ended the sweep; ratios at the reference batch."""
    ok = {(r["policy"], r["batch"]): r for r in rows if r["status"] == "ok"}
    best = {}
    for p in policies:
        fits = [r for r in rows if r["policy"] == p and r["status"] == "ok"]
        top = max(fits, key=lambda r: r["batch"], default=None)
        fails = sorted((r for r in rows if r["policy"] == p and r["status"] != "ok" and
                        (top is None or r["batch"] > top["batch"])), key=lambda r: r["batch"])
        best[p] = dict(max_batch=top and top["batch"], tokens_per_second=top and top["tokens_per_second"],
                       limit=fails[0]["status"] if fails else "none", max_batch_is_lower_bound=not fails,
                       first_failing_batch=fails[0]["batch"] if fails else None)
    peer = {r["mode"]: r.get("tokens_per_second") for r in peers if r.get("batch") == ref and r["status"] == "ok"}

    def ratio(a, b):
        return a / b if a is not None and b else None

    def tps(p, b):
        return ok.get((p, b), {}).get("tokens_per_second")

    def step(p, b):
        return ok.get((p, b), {}).get("decode_ms_per_step")

    ratios = {p: dict(vs_hf_static=ratio(tps(p, ref), peer.get("static-compile")),
                      vs_hf_eager=ratio(tps(p, ref), peer.get("eager")), vs_full=ratio(tps(p, ref), tps("full", ref)),
                      max_batch_tps_vs_full=ratio(best[p]["tokens_per_second"],
                                                  best.get("full", {}).get("tokens_per_second")),
                      batch1_decode_step_vs_full=ratio(step(p, 1), step("full", 1))) for p in policies}
    return best, ratios


def env_of(rows: list[dict], peers: list[dict], commit: str | None) -> dict:
    """From the children (the parent never touches the GPU): device and jax from a throughput run, torch and
    transformers from a peer."""
    e = dict(python=platform.python_version(), host=platform.node())
    for r in rows:
        if r["status"] == "ok":
            e.update({k: r["env"][k] for k in ("device", "platform", "jax", "jaxlib", "commit")})
            break
    for r in peers:
        e.update({k: r[k] for k in ("torch", "transformers", "cuda") if k in r})
        e.setdefault("device", r.get("device"))
    if commit:
        e["commit"] = commit
    return e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b", choices=sorted(pyrajax.config.PRESETS))
    ap.add_argument("--prompt", type=cli_int(1), default=512)
    ap.add_argument("--new", type=cli_int(2), default=256)
    ap.add_argument("--cache", nargs="*", type=cli_cache, default=["full", "paper", "budget-0.45"])
    ap.add_argument("--impl", choices=IMPLS, default="auto")
    ap.add_argument("--tp", type=cli_int(1), default=1, help="tensor-parallel devices of each throughput run")
    ap.add_argument("--batches", nargs="+", type=cli_int(1), default=[1, 8, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--bisect", type=cli_int(0), default=2, help="batches tried between the last fit and the first OOM")
    ap.add_argument("--repeat", type=cli_int(1), default=1, help="timed calls per throughput run")
    ap.add_argument("--peer-batch", type=cli_int(1), default=32, help="the reference batch of peers and ratios")
    ap.add_argument("--peers", nargs="*", default=["eager", "static-compile"])
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peer-device", default="cuda")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per throughput process")
    ap.add_argument("--peer-timeout", type=float, default=540, help="seconds per peer process")
    ap.add_argument("--deadline", type=float, default=0, help="start nothing that could end after this; 0: none")
    ap.add_argument("--min-left", type=float, default=60, help="with --deadline: seconds a process needs to start")
    ap.add_argument("--mem-fraction", default="0.95", help="XLA_PYTHON_CLIENT_MEM_FRACTION for the JAX runs")
    ap.add_argument("--commit", default=None, help="record this commit (where the machine has no git history)")
    ap.add_argument("--resume", default=None, help="a previous sweep JSON: keep its rows, rerun what is not ok/oom")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT or bench/results/)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    peers_wanted = [] if args.no_peers else args.peers
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or ROOT / "bench" / "results") / \
        f"sweep-{args.model}-p{args.prompt}-n{args.new}{f'-tp{args.tp}' if args.tp > 1 else ''}.json"
    env = dict(CHILD_ENV, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), CHILD_ENV.get("PYTHONPATH")])))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", args.mem_fraction)

    rows, peers, policies, calls = [], [], list(args.cache), []
    if args.resume:
        old = json.loads(Path(args.resume).read_text())
        assert (old["model"], old["prompt"], old["new"]) == (args.model, args.prompt, args.new), "resume: other run"
        rows, peers = old["rows"], old["peers"]
        policies = list(dict.fromkeys(old["settings"]["policies"] + policies))
        calls = old["settings"].get("calls", [])
    done = {(r["policy"], r["batch"]) for r in rows if r["status"] in ("ok", "oom")}
    done_peers = {(r["mode"], r["batch"]) for r in peers if r["status"] in ("ok", "oom")}
    tmp = Path(tempfile.mkdtemp(prefix="sweep-"))
    state = dict(stopped=None)

    def budget(limit: float) -> float | None:
        """Seconds the next process may take; None when the deadline leaves too little to start one."""
        if not args.deadline:
            return limit
        left = args.deadline - (time.monotonic() - start)
        if left < args.min_left:
            state["stopped"] = f"deadline: {args.deadline:.0f} s reached"
            return None
        return min(limit, left)

    def save():
        best, ratios = summarize(rows, peers, policies, args.peer_batch)
        settings = dict(vars(args), policies=policies, mem_fraction=env["XLA_PYTHON_CLIENT_MEM_FRACTION"],
                        calls=calls + [sys.argv[1:] if argv is None else argv])  # every call of a resumed sweep
        result = dict(env_of(rows, peers, args.commit), benchmark="sweep", model=args.model, prompt=args.prompt,
                      new=args.new, settings=settings, complete=state["stopped"] is None, stopped=state["stopped"],
                      rows=rows, max_batch=best, peers=peers, ratios=ratios)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        return result

    def run_batch(policy: str, batch: int) -> str | None:
        if (policy, batch) in done:
            return next(r["status"] for r in rows if (r["policy"], r["batch"]) == (policy, batch))
        limit = budget(args.timeout)
        if limit is None:
            return None
        f = tmp / f"{policy}-{batch}.json"
        cmd = [sys.executable, "-m", "bench.throughput", "--model", args.model, "--batch", str(batch), "--prompt",
               str(args.prompt), "--new", str(args.new), "--cache", policy, "--impl", args.impl, "--repeat",
               str(args.repeat), "--tp", str(args.tp), "--out", str(f)]
        r = child(cmd, f, limit, env)
        if r["status"] == "timeout" and limit < args.timeout:
            r["status"], state["stopped"] = "deadline", f"deadline: {args.deadline:.0f} s reached"
        data = r.pop("data")
        row = dict(policy=policy, batch=batch, batch_bucket=bucket(batch, 1), **r)
        if r["status"] == "ok":
            row.update({k: data["runs"][0].get(k) for k in KEEP},
                       env={k: data.get(k) for k in ("device", "platform", "jax", "jaxlib", "commit")})
        rows[:] = [x for x in rows if (x["policy"], x["batch"]) != (policy, batch)] + [row]
        tps = f"{row['tokens_per_second']:.0f} tok/s" if r["status"] == "ok" else last_line(row["error"])
        print(f"[{time.monotonic() - start:6.0f} s] {policy} b{batch}: {r['status']} ({r['seconds']} s) {tps}",
              flush=True)
        save()
        return r["status"]

    for policy in args.cache:
        last_ok = first_bad = None
        for b in sorted(args.batches):
            status = run_batch(policy, b)
            if status != "ok":
                first_bad = b if status == "oom" else None
                break
            last_ok = b
        for _ in range(args.bisect if last_ok and first_bad else 0):
            mids = sorted({bucket(b, 1) for b in range(last_ok + 1, first_bad)} - {first_bad})
            if not mids:
                break
            mid = mids[len(mids) // 2]
            status = run_batch(policy, mid)
            if status == "ok":
                last_ok = mid
            elif status == "oom":
                first_bad = mid
            else:
                break
    for mode in peers_wanted:
        if (mode, args.peer_batch) in done_peers or (limit := budget(args.peer_timeout + 60)) is None:
            continue
        f = tmp / f"peer-{mode}.json"
        cmd = [sys.executable, "-m", "bench.hf_peer", "--model", args.model, "--batch", str(args.peer_batch),
               "--prompt", str(args.prompt), "--new", str(args.new), "--mode", mode, "--device", args.peer_device,
               "--timeout", str(max(limit - 60, 30)), "--out", str(f)]
        r = child(cmd, f, limit, env)
        row = dict(r.pop("data") or {}, mode=mode, batch=args.peer_batch, **r)
        peers[:] = [x for x in peers if (x["mode"], x["batch"]) != (mode, args.peer_batch)] + [row]
        print(f"[{time.monotonic() - start:6.0f} s] HF {mode} b{args.peer_batch}: {row['status']} ({r['seconds']} s) "
              + (f"{row['tokens_per_second']:.0f} tok/s" if row["status"] == "ok" else last_line(row.get("error"))),
              flush=True)
        save()
    print_table(save(), out)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def print_table(res: dict, out: Path) -> None:
    def fmt(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    batches = sorted({r["batch"] for r in res["rows"]})
    cell = {(r["policy"], r["batch"]): (fmt(r["tokens_per_second"]) if r["status"] == "ok" else r["status"].upper())
            for r in res["rows"]}
    ref = res["settings"]["peer_batch"]
    print(f"\n{res['model']} {res['prompt']}+{res['new']} on {res.get('device')}: generated tok/s by batch -> {out}")
    print(f"{'policy':>12} " + " ".join(f"{'b' + str(b):>8}" for b in batches))
    for p in res["settings"]["policies"]:
        print(f"{p:>12} " + " ".join(f"{cell.get((p, b), ''):>8}" for b in batches))
    for r in res["peers"]:
        print(f"{'HF ' + r['mode']:>18} b{r['batch']}: " + (
            f"{r['tokens_per_second']:.0f} tok/s, compile {r['compile_seconds']:.0f} s, peak "
            f"{(r.get('peak_memory_bytes') or 0) / 2**30:.1f} GiB" if r["status"] == "ok" else
            f"{r['status']}: {last_line(r.get('error'))[:100]}"))
    print(f"\n{'policy':>12} {'max batch':>9} {'tok/s@max':>9} {'limit':>8} {'KV %':>6} {f'tok/s@{ref}':>9} "
          f"{'x full':>6} {'x HF-st':>7} {'x HF-eg':>7} {'max x full':>10} {'b1 step x full':>14}")
    for p in res["settings"]["policies"]:
        m, q = res["max_batch"][p], res["ratios"][p]
        row = next((r for r in res["rows"] if r["policy"] == p and r["batch"] == ref and r["status"] == "ok"), {})
        print(f"{p:>12} {fmt(m['max_batch'], 'd'):>9} {fmt(m['tokens_per_second']):>9} {m['limit'][:8]:>8} "
              f"{fmt(row.get('kv_fraction'), '.1%'):>6} {fmt(row.get('tokens_per_second')):>9} "
              f"{fmt(q['vs_full'], '.2f'):>6} {fmt(q['vs_hf_static'], '.2f'):>7} {fmt(q['vs_hf_eager'], '.2f'):>7} "
              f"{fmt(q['max_batch_tps_vs_full'], '.2f'):>10} {fmt(q['batch1_decode_step_vs_full'], '.3f'):>14}")
    if res["stopped"]:
        print(f"incomplete ({res['stopped']}): rerun with --resume {out}")


if __name__ == "__main__":
    sys.exit(main())
