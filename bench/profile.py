"""Where a decode step's time goes, per cache policy and batch (a profile, not a test).

    python -m bench profile --model llama2-7b --runs full:1 budget-0.45:1 full:32 budget-0.45:32 [--steps 255]

Each run is `cache:batch[:impl]` (impl auto by default). Random bf16 weights are built once (array by array);
per run the prompt (512 tokens, `--prompt`) is prefilled and the same compiled decode loop as `generate`
(bucket of `--new` 256 tokens) is compiled ahead of time, run untimed once, timed untraced `--repeat` times, then
run once more under `jax.profiler.trace(..., create_perfetto_trace=True)`: only that steady-state decode call
is traced (its prefill runs before the trace starts). `--steps` decode steps run (default new - 1, the whole
benchmark loop). From perfetto_trace.json.gz (gzip + json) every GPU kernel / memcpy event is attributed to
the optimized HLO instruction it came from by its kernel name (XLA names a kernel after its fusion; the trace's
`hlo_op` names only the CUDA-graph command buffer the kernel ran in), hence to a category (matmul, decode attention, scatter/dynamic-update-slice, eviction scores + top_k,
reductions, elementwise, memcpy, other) and to the Python function that emitted it (HLO source metadata).
Per step: GPU time per category, device-busy time (union of kernel intervals) and wall time; wall - busy is
launch / host / loop-control overhead. JSON to $OUT or bench/results/profile-decode-<model>.json; a table last.
`--save-hlo` writes each run's optimized HLO beside it, and `--reanalyze JSON` redoes the attribution from those.
"""
from __future__ import annotations

import argparse
import ast
import collections
import functools
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pyrajax
from bench.throughput import add_workload_args, env_info
from pyrajax.validate import cli_int
from pyrajax import cache as kvc
from pyrajax.engine import empty_state
from pyrajax.generate import (GenerationConfig, Requests, bucket, decode_program, insert_program,
                              prefill_program)

ATTENTION = ("decode_attention.py", "_common.py")  # the kernel, its XLA epilogue / reference, their helpers
EVICTION = ("evict", "_evict", "_evict.<locals>.run", "recency_weights")  # scoring / picking evictions
# Kernels that name no HLO instruction: Pallas/Triton kernels (named after the kernel function), the kernels that
# drive a conditional inside a CUDA graph, copies.
UNMAPPED = {"attention": "decode_attention.py:_decode_kernel (Pallas)", "cond/loop control": "(lax.cond in a CUDA graph)",
            "memcpy/memset": "(memcpy)"}
CATEGORIES = ("matmul", "attention", "scatter/DUS", "evict (scores+top_k)", "reduce/argmax", "elementwise",
              "cond/loop control", "memcpy/memset", "other")


# ----------------------------------------------------------------------------- the optimized HLO
@functools.lru_cache(maxsize=None)
def _functions(path: str) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of every function in a Python file (innermost wins on lookup)."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError):
        return []
    return sorted(((n.lineno, n.end_lineno, n.name) for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), key=lambda f: f[1] - f[0])


def source_of(file: str | None, line: int | None) -> str:
    if not file:
        return "?"
    fn = next((name for lo, hi, name in _functions(file) if line and lo <= line <= hi), "?")
    return f"{Path(file).name}:{fn}"


def _frames(text: str) -> dict[int, str]:
    """The module's stack-frame table (FileNames / FunctionNames / FileLocations / StackFrames sections):
    frame id -> 'file.py:function' of the innermost (user) frame. The parent links are not used: the
    innermost frame is what the categories need."""
    sect, tables = None, collections.defaultdict(dict)
    for line in text.splitlines():
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            sect = line.strip()
            continue
        m = re.match(r"^(\d+) (.*)$", line) if sect else None
        if not m:
            sect = None if line.startswith(("%", "ENTRY", "HloModule")) else sect
            continue
        tables[sect][int(m.group(1))] = m.group(2)
    num = lambda s, k: int(re.search(rf"{k}=(\d+)", s).group(1))  # noqa: E731
    frames = {}
    for fid, s in tables["StackFrames"].items():
        loc = tables["FileLocations"].get(num(s, "file_location_id"), "")
        if not loc:
            continue
        file = tables["FileNames"].get(num(loc, "file_name_id"), '"?"').strip('"')
        func = tables["FunctionNames"].get(num(loc, "function_name_id"), '"?"').strip('"')
        frames[fid] = f"{Path(file).name}:{func}"
    return frames


def hlo_index(text: str) -> dict[str, dict]:
    """Kernel-style name (dots and dashes -> '_') -> {op, ops (opcodes, called computations included),
    target (custom-call), src (the Python file:function that emitted it)} for every instruction of the
    optimized module (a fusion carries its root's source)."""
    frames = _frames(text)

    comps, instrs, cur = {}, {}, None
    for line in text.splitlines():
        s = line.strip()
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{$", s)
        if head and " = " not in s.split("{")[0]:
            cur = comps.setdefault(head.group(1), [])
            continue
        m = re.match(r"^(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", s)
        if not m or cur is None:
            continue
        name, rest = m.groups()
        op = re.search(r"(?:^|\s)([a-z][a-z0-9\-]*)\(", rest)
        called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
        called += [c for grp in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", rest)
                   for c in re.findall(r"%?([\w.\-]+)", grp)]
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        file, lineno = re.search(r'source_file="([^"]+)"', rest), re.search(r"source_line=(\d+)", rest)
        src = frames.get(int(frame.group(1)), "?") if frame else \
            source_of(file.group(1), int(lineno.group(1))) if file and lineno else "(no source metadata)"
        info = dict(op=op.group(1) if op else "?", called=called, target=target.group(1) if target else "",
                    src=src)
        cur.append(info)
        instrs[name] = info

    def opcodes(info, seen):
        out = {info["op"]} | ({"topk"} if "topk" in info["target"].lower() else set())
        for c in info["called"]:
            if c not in seen:
                seen.add(c)
                for sub in comps.get(c, []):
                    out |= opcodes(sub, seen)
        return out

    return {re.sub(r"[.\-]", "_", name): dict(info, ops=opcodes(info, set())) for name, info in instrs.items()}


def categorize(kernel: str, info: dict | None) -> str:
    """The category of one kernel: from its HLO instruction when it maps to one, else from its name (XLA
    names a kernel after its fusion kind and root op: loop_add_fusion, input_scatter_fusion, gemm_fusion_dot)."""
    k = kernel.lower()
    if re.search(r"set_case_condition|set_while_condition|memcpy32_post", k):
        return "cond/loop control"
    if "memcpy" in k or "memset" in k:
        return "memcpy/memset"
    src, ops, target = (info["src"], info["ops"], info["target"].lower()) if info else ("?", set(), "")
    if src.split(":")[0] in ATTENTION or "decode_kernel" in k:
        return "attention"
    if src.split(":")[-1] in EVICTION or re.search(r"topk|sort", k) or ops & {"sort", "topk"}:
        return "evict (scores+top_k)"
    if "dot" in ops or "gemm" in target or "cublas" in target or \
            re.search(r"gemm|gemv|nvjet|xmma|cutlass|sm90_|sm80_|_dot", k):
        return "matmul"
    kind = re.match(r"(loop|input)_(\w+?)_fusion", k)  # XLA's fusion names: kind and root op
    if kind:
        root = kind.group(2)
        return "scatter/DUS" if re.search(r"scatter|dynamic_update_slice", root) else \
            "reduce/argmax" if kind.group(1) == "input" and "reduce" in root else "elementwise"
    if ops & {"scatter", "dynamic-update-slice"} or re.search(r"scatter|dynamic_update_slice", k):
        return "scatter/DUS"
    if "reduce" in ops or "reduce" in k:
        return "reduce/argmax"
    return "elementwise" if info or re.search(r"fusion|^wrapped_|^copy|^convert", k) else "other"


# ----------------------------------------------------------------------------- the trace
def gpu_events(trace_dir: str) -> tuple[list[dict], dict]:
    """'X' events on GPU streams (kernels, memcpys) of the newest perfetto_trace.json.gz under trace_dir."""
    files = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz")) or \
        sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {p for p, n in procs.items() if "gpu" in n.lower() and "host" not in n.lower()}
    # Derived timelines (XLA Ops / Modules, Steps, name scopes) repeat the kernels: keep the stream lines.
    streams = {k for k, n in threads.items() if k[0] in gpu and "stream" in n.lower()}
    keep = (lambda e: (e["pid"], e.get("tid")) in streams) if streams else (lambda e: e["pid"] in gpu)
    if not gpu:  # a CPU run (smoke test): XLA thunks carry hlo_op
        keep = lambda e: "hlo_op" in (e.get("args") or {})  # noqa: E731
    out = [e for e in events if e.get("ph") == "X" and "dur" in e and keep(e)]
    return out, dict(file=os.path.basename(files[-1]), bytes=os.path.getsize(files[-1]),
                     processes=sorted(set(procs.values())),
                     gpu_threads=sorted({n for k, n in threads.items() if k[0] in gpu}))


def busy_us(events: list[dict]) -> float:
    """Length of the union of the events' intervals (streams may overlap)."""
    total, end = 0.0, -1e30
    for s, d in sorted((e["ts"], e["dur"]) for e in events):
        if s + d > end:
            total += s + d - max(s, end)
            end = s + d
    return total


def lookup(index: dict, kernel: str) -> dict | None:
    """The HLO instruction a kernel came from: its name with '.'/'-' as '_', less a '__N' uniquifier suffix."""
    key = re.sub(r"[.\-]", "_", kernel)
    return index.get(key) or index.get(re.sub(r"__\d+$", "", key))


def kernel_totals(events: list[dict]) -> dict[str, list]:
    """Kernel name -> [total microseconds, count, the trace's hlo_op] (inside a command buffer hlo_op names only
    the buffer, so the kernel name is the key)."""
    out = collections.defaultdict(lambda: [0.0, 0, ""])
    for e in events:
        t = out[e["name"]]
        t[0] += e["dur"]
        t[1] += 1
        t[2] = t[2] or (e.get("args") or {}).get("hlo_op", "")
    return {k: [round(us, 3), n, op] for k, (us, n, op) in out.items()}


def attribute(kernels: dict[str, list], index: dict, steps: int) -> dict:
    """Per step: GPU ms by category and by emitting Python function, and the top kernels."""
    cat, count, src = collections.Counter(), collections.Counter(), collections.Counter()
    mapped, rows = 0, []
    for name, (us, n, *op) in kernels.items():
        info = lookup(index, name) or (lookup(index, op[0]) if op and op[0] else None)
        c = categorize(name, info)
        mapped += n if info else 0
        cat[c] += us
        count[c] += n
        label = info["src"] if info else UNMAPPED.get(c, f"(no HLO instruction: {c})")
        src[label] += us
        rows.append(dict(name=name[:90], category=c, src=label, ms_per_step=us / 1e3 / steps, per_step=n / steps))
    ms = lambda us: us / 1e3 / steps  # noqa: E731
    return dict(events_mapped_to_hlo=mapped,
                category_ms_per_step={c: ms(cat[c]) for c in CATEGORIES if cat[c]},
                category_events_per_step={c: count[c] / steps for c in CATEGORIES if count[c]},
                source_ms_per_step={k: ms(v) for k, v in src.most_common()},
                top_kernels=sorted(rows, key=lambda r: -r["ms_per_step"])[:40])


def timeline(events: list[dict], steps: int) -> dict:
    ms = lambda us: us / 1e3 / steps  # noqa: E731
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) if events else 0.0
    return dict(events=len(events), kernels_per_step=len(events) / steps,
                gpu_sum_ms_per_step=ms(sum(e["dur"] for e in events)), busy_ms_per_step=ms(busy_us(events)),
                gpu_span_ms_per_step=ms(span))


# ----------------------------------------------------------------------------- one run
def profile_run(params, cfg, spec: str, args, out_dir: Path) -> dict:
    cache_name, batch, impl = (spec.split(":") + [""])[:3]
    batch, impl = int(batch), impl or "auto"
    gcfg = GenerationConfig(model=cfg, max_new_tokens=args.new, cache=cache_name, stop_ids=(), impl=impl)
    rng = np.random.default_rng(0)
    S, T, B = bucket(args.prompt, 16), bucket(args.new, 16), bucket(batch, 1)
    plan = kvc.make_plan(gcfg.policy, S, T, cfg.num_layers, requests=((args.prompt, args.new),))
    seq = kvc.make_seq_plan(plan, [args.prompt] * B, args.new)
    tokens = np.asarray(rng.integers(3, cfg.vocab_size, (B, S)), np.int32)
    steps = min(args.steps or args.new - 1, args.new - 1)
    # every slot runs `steps` decode steps: max_new counts the token sampled after prefill too
    req = Requests(seed=np.zeros((B,), np.uint32), temperature=np.zeros((B,), np.float32),
                   top_k=np.zeros((B,), np.int32), top_p=np.ones((B,), np.float32),
                   max_new=np.full((B,), steps + 1, np.int32), stop=np.full((B, 1), -1, np.int32),
                   forced=np.zeros((B, 1), np.int32), n_forced=np.zeros((B,), np.int32))
    cancel, exit_on_finish = np.zeros((B,), bool), np.bool_(False)

    def prefill():  # a fresh decode state with every slot prefilled (the decode program donates it)
        first, cache, _ = prefill_program(params, tokens, seq, req, plan=plan, cfg=cfg, impl=impl,
                                          window=plan.window)
        state = empty_state(params, cfg, plan, plan, S, B, 1, 1, impl)
        return jax.block_until_ready(insert_program(state, cache, req, first, np.arange(B, dtype=np.int32)))

    t0 = time.perf_counter()
    state = prefill()
    compiled = decode_program.lower(params, state, cancel, exit_on_finish, plan=plan, cfg=cfg, impl=impl,
                                    steps=steps).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    index = hlo_index(hlo)
    hlo_file = out_dir / f"hlo-{re.sub(r'[^A-Za-z0-9._-]', '_', spec)}.txt.gz"
    if args.save_hlo:
        with gzip.open(hlo_file, "wt") as f:
            f.write(hlo)

    def decode():
        state = prefill()
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, state, cancel, exit_on_finish))
        return time.perf_counter() - t

    decode()  # warm-up
    walls = [decode() for _ in range(args.repeat)]
    trace_dir = tempfile.mkdtemp(prefix="pyrajax-profile-")
    state = prefill()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t = time.perf_counter()
        _, out, _ = jax.block_until_ready(compiled(params, state, cancel, exit_on_finish))
        traced_wall = time.perf_counter() - t
    first_tokens = np.asarray(out)[0, :16].tolist()
    row = dict(run=spec, cache=cache_name, batch=batch, impl=impl, steps=steps, compile_seconds=compile_s,
               wall_ms_per_step=1e3 * statistics.median(walls) / steps, wall_ms_per_step_runs=[
                   1e3 * w / steps for w in walls], traced_wall_ms_per_step=1e3 * traced_wall / steps,
               first_tokens=first_tokens, hlo_instructions=len(index), hlo_file=hlo_file.name if args.save_hlo else None,
               capacity_per_layer=list(plan.capacity))
    try:
        events, meta = gpu_events(trace_dir)
        shutil.rmtree(trace_dir, ignore_errors=True)
        row.update(timeline(events, steps), trace=meta, kernels=kernel_totals(events))
        row.update(attribute(row["kernels"], index, steps))
        row["gap_ms_per_step"] = row["wall_ms_per_step"] - row["busy_ms_per_step"]
    except Exception as e:  # noqa: BLE001  -- keep the timings; the report says the trace failed
        row["trace_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))}), flush=True)
    return row


def print_table(rows: list[dict], title: str, n_sources: int = 14) -> None:
    ok = [r for r in rows if "category_ms_per_step" in r]
    for r in rows:
        if "trace_error" in r:
            print(f"{r['run']}: trace not usable ({r['trace_error']}); wall {r['wall_ms_per_step']:.3f} ms/step")
    print(f"\n{title}")
    w, L = max([16] + [len(r["run"]) + 2 for r in ok]), 42
    print(f"{'':>{L}}" + "".join(f"{r['run']:>{w}}" for r in ok))
    for c in CATEGORIES:
        if any(c in r["category_ms_per_step"] for r in ok):
            print(f"{c:>{L}}" + "".join(f"{r['category_ms_per_step'].get(c, 0):>{w}.3f}" for r in ok))
    sources = collections.Counter()
    for r in ok:
        sources.update(r["source_ms_per_step"])
    print(f"{'by Python function':>{L}}")
    for src, _ in sources.most_common(n_sources):
        print(f"{src[-L:]:>{L}}" + "".join(f"{r['source_ms_per_step'].get(src, 0):>{w}.3f}" for r in ok))
    for label, k in (("GPU sum", "gpu_sum_ms_per_step"), ("device busy", "busy_ms_per_step"),
                     ("wall (untraced)", "wall_ms_per_step"), ("wall - busy", "gap_ms_per_step"),
                     ("wall (traced)", "traced_wall_ms_per_step"), ("kernels / step", "kernels_per_step")):
        print(f"{label:>{L}}" + "".join(f"{r[k]:>{w}.3f}" for r in ok))


def reanalyze(path: Path) -> dict:
    """Recompute the attribution of a profile JSON from its kernel totals and the saved HLO files beside it."""
    result = json.loads(path.read_text())
    for r in result["runs"]:
        if r.get("kernels") and r.get("hlo_file") and (path.parent / r["hlo_file"]).exists():
            with gzip.open(path.parent / r["hlo_file"], "rt") as f:
                r.update(attribute(r["kernels"], hlo_index(f.read()), r["steps"]))
                r["attribution"] = "recomputed offline (--reanalyze) from the run's kernel totals and saved HLO"
    path.write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--runs", nargs="+", default=["full:1", "budget-0.45:1", "full:32", "budget-0.45:32"],
                    help="cache:batch[:impl]")
    ap.add_argument("--steps", type=cli_int(0), default=0, help="decode steps per run (default: new - 1)")
    ap.add_argument("--repeat", type=cli_int(1), default=3, help="untraced timed runs (median)")
    ap.add_argument("--save-hlo", action="store_true", help="write each run's optimized HLO (gzip) beside the JSON")
    ap.add_argument("--reanalyze", metavar="JSON", help="only recompute the attribution of a saved profile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.reanalyze:
        result = reanalyze(Path(args.reanalyze))
        print_table(result["runs"], f"ms per decode step ({result['model']}; GPU time by category)")
        return 0

    cfg = pyrajax.preset(args.model)
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    params = pyrajax.random_params(jax.random.key(0), cfg, dtype)  # array by array (one jit compiles for minutes)
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or Path(__file__).parent / "results") / \
        f"profile-decode-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.runs:  # the JSON is rewritten after every run
        rows.append(profile_run(params, cfg, spec, args, out.parent))
        out.write_text(json.dumps(dict(env_info(), benchmark="profile-decode", model=args.model, prompt=args.prompt,
                                       new=args.new, runs=rows), indent=1))
    print_table(rows, f"ms per decode step ({args.model}, prompt {args.prompt}, {args.new} new; GPU time by category)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
