"""HF transformers peer on a preset's exact shapes, random bf16 weights (run as its own process).

    python -m bench.hf_peer --model llama2-7b --batch 32 --prompt 512 --new 256 --mode eager --out FILE.json
    python -m bench.hf_peer --model llama2-7b --mode static-compile --timeout 540 --out FILE.json
    python -m bench.hf_peer --model tiny --batch 2 --prompt 16 --new 8 --device cpu      # smoke test

`eager`: `generate` with the default dynamic cache and sdpa attention. `static-compile`: the transformers 5.x
recipe, `generate(cache_implementation="static", compile_config=CompileConfig(fullgraph=True,
mode="reduce-overhead"))`: prefill runs eager, every decode step runs the compiled, CUDA-graphed forward.
Every token is forced like pyrajax's `stop_ids=()`: no eos id (so no stopping check), min_new_tokens = new.
Warm-up calls come first (compile seconds = first call - timed median); throughput counts generated tokens over
wall time including prefill. An out-of-memory or `--timeout` ends the run with status "oom"/"timeout" in the
JSON (exit code 3), never a traceback only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # pyrajax (for the presets) imports jax: keep it off the GPU
import pyrajax  # noqa: E402
from bench.throughput import add_workload_args  # noqa: E402
from pyrajax.validate import cli_int  # noqa: E402

MODES = ("eager", "static-compile")


def hf_config(cfg, max_len: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       max_position_embeddings=max(cfg.max_positions, max_len),
                       tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_id, eos_token_id=None,
                       pad_token_id=cfg.pad_id)


def build(cfg, max_len: int, device: str):
    """Random weights created directly on `device` in bf16 (no CPU copy of the model)."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(cfg, max_len), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = cfg.pad_id
    return model


def gen_kwargs(mode: str, new: int, cpu_compile: bool = False) -> dict:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if mode == "static-compile":
        from transformers import CompileConfig
        cc = CompileConfig(fullgraph=True, mode="reduce-overhead")
        cc._compile_all_devices = cpu_compile  # transformers' own switch to compile off-GPU (for tests)
        kw.update(cache_implementation="static", compile_config=cc)
    return kw


def env(device: str) -> dict:
    import torch
    import transformers
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return dict(device=name, platform=device, torch=torch.__version__, cuda=torch.version.cuda,
                transformers=transformers.__version__, python=platform.python_version())


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def run(args, result: dict) -> None:
    """Fills `result` as it goes, so a timeout or OOM still leaves what was measured."""
    import torch
    cfg = pyrajax.preset(args.model)
    cuda = args.device.startswith("cuda")
    result["phase"] = "build"
    t0 = time.perf_counter()
    model = build(cfg, args.prompt + args.new, args.device)
    result["build_seconds"] = time.perf_counter() - t0
    result["params_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    kw = gen_kwargs(args.mode, args.new, args.cpu_compile)
    result["generate_kwargs"] = {k: (v if isinstance(v, (int, float, str, bool)) else repr(v)) for k, v in kw.items()}

    def call() -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)  # generate runs under no_grad
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        assert out.shape == (args.batch, args.prompt + args.new), f"every token is forced, got {tuple(out.shape)}"
        return wall

    result["phase"] = "warmup"
    result["warmup_seconds"] = []
    for _ in range(args.warmup):
        result["warmup_seconds"].append(call())
    result["phase"] = "timed"
    if cuda:
        result["peak_memory_bytes_with_warmup"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    result["run_seconds"] = []
    for _ in range(args.repeat):
        result["run_seconds"].append(call())
    wall = statistics.median(result["run_seconds"])
    first = result["warmup_seconds"][0] if result["warmup_seconds"] else wall
    result.update(status="ok", phase="done", wall_seconds=wall, tokens_per_second=args.batch * args.new / wall,
                  compile_seconds=max(first - wall, 0.0),
                  peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--mode", default="eager", choices=MODES)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=cli_int(0), default=None, help="untimed calls first (default: eager 1, compile 2)")
    ap.add_argument("--repeat", type=cli_int(1), default=2, help="timed calls; the median is reported")
    ap.add_argument("--timeout", type=float, default=0, help="seconds before giving up (status 'timeout'); 0: none")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT or bench/results/)")
    ap.add_argument("--cpu-compile", action="store_true", help="run static-compile off-GPU too (smoke test, slow)")
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = 2 if args.mode == "static-compile" else 1  # compile, then the CUDA-graph recording

    import torch
    result = dict(env(args.device), benchmark="hf_peer", model=args.model, mode=args.mode, batch=args.batch,
                  prompt=args.prompt, new=args.new, dtype="bfloat16", attn_implementation="sdpa",
                  kv_bytes=args.batch * (args.prompt + args.new) * pyrajax.preset(args.model).num_layers
                  * pyrajax.preset(args.model).kv_bytes_per_token_layer(2), status="error")
    if args.mode == "static-compile" and not args.device.startswith("cuda") and not args.cpu_compile:
        result.update(status="skipped", error="static-compile needs CUDA (transformers compiles only on GPU; "
                      "--cpu-compile forces it)")
        print(f"hf_peer: skipped: {result['error']}", flush=True)
    else:
        if args.timeout > 0:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(int(args.timeout))
        try:
            run(args, result)
        except Timeout:
            result.update(status="timeout", error=f"timed out after {args.timeout:.0f} s in phase {result['phase']}")
        except torch.OutOfMemoryError as e:
            result.update(status="oom", error=str(e).splitlines()[0])
        finally:
            signal.alarm(0)
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or Path(__file__).parent / "results") / \
        f"hf_peer-{args.model}-{args.mode}-b{args.batch}-{result['device'].replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    tps = result.get("tokens_per_second")
    print(f"hf_peer {args.model} {args.mode} b{args.batch} {args.prompt}+{args.new}: {result['status']}"
          + (f", {tps:.0f} tok/s, compile {result['compile_seconds']:.1f} s" if tps else f" ({result.get('error')})")
          + f" -> {out}", flush=True)
    return {"ok": 0, "skipped": 0}.get(result["status"], 3)


if __name__ == "__main__":
    sys.exit(main())
