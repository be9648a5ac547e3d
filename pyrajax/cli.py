"""`pyrajax` command line: the demo on the embedded model, the pyramid plot, and (forwarded) eval and bench."""
from __future__ import annotations

import argparse
import sys

from pyrajax.validate import cli_cache, cli_int

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Explain in two sentences why the sky is blue.",
]
DEMO_SYSTEM = "You are a helpful assistant. Answer briefly."
# The long case: a question about an essay of about 2k tokens, where compression saves memory.
ESSAY, ESSAY_CHARS = "paul-graham-essays/avg.txt", 9000
ESSAY_QUESTION = "\n\nIn one sentence: what is the essay above about?"


def chat_tokens(tokenizer, text: str) -> list[int]:
    """The model's chat template around one user message, ready for the assistant's answer."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _essay(data_dir) -> str | None:
    from pathlib import Path
    path = Path(data_dir) / ESSAY
    return path.read_text()[:ESSAY_CHARS] if path.is_file() else None


def demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import pyrajax
    from checkpoints_convert.embedded import default_model_dir
    from pyrajax.eval import DATA

    path = args.checkpoint or default_model_dir()
    on_gpu = jax.default_backend() == "gpu"
    params, cfg = pyrajax.load(path, dtype=jnp.bfloat16 if on_gpu else jnp.float32)
    chats = [[{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": p}]
             for p in (args.prompt or DEMO_PROMPTS)]
    cases = [("short chat", chats, args.max_new_tokens)]
    essay = _essay(DATA)
    if essay is not None and not args.prompt:
        cases.append(("essay question", [[{"role": "user", "content": essay + ESSAY_QUESTION}]], 48))
    print(f"model: {path} ({cfg.num_layers} layers, {jax.default_backend()})")
    results = {}
    for policy in args.cache:
        for name, prompts, new in cases:
            gcfg = pyrajax.GenerationConfig(model=cfg, max_new_tokens=new, cache=policy)
            try:
                results[policy, name] = pyrajax.generate(params, prompts, gcfg)
            except ValueError as e:  # e.g. a policy refused for these lengths: show the others anyway
                print(f"[{policy}] {name} skipped: {e}")
    for name, prompts, _ in cases:
        for i, conv in enumerate(prompts):
            text = conv[-1]["content"]
            print(f"\n### {name}: {text if len(text) < 200 else text[:80] + ' ... ' + text[-60:]!r}")
            full = results.get(("full", name))
            for policy in args.cache:
                r = results.get((policy, name))
                if r is not None:
                    same = " (= full)" if full is not None and policy != "full" and r.tokens[i] == full.tokens[i] else ""
                    print(f"[{policy}]{same} {r.texts[i].strip()}")
    print(f"\n{'policy':>12} {'case':>15} {'prompt tok':>10} {'KV allocated':>14} {'of full':>8} "
          f"{'KV saved':>12} {'compressed':>10} {'prefill s':>10} {'decode s':>9}")
    for (policy, name), r in results.items():
        s = r.stats
        print(f"{policy:>12} {name:>15} {max(s['prompt_tokens']):>10} {_mib(s['kv_bytes']):>14} "
              f"{s['kv_fraction']:>8.1%} {_mib(s['full_kv_bytes'] - s['kv_bytes']):>12} "
              f"{str(s['compressed']):>10} {s['prefill_seconds']:>10.2f} {s['decode_seconds']:>9.2f}")
    print("(times include compilation on a first run; short requests fit under the floor of 256 tokens, so "
          "compressed policies run them uncompressed and answer exactly as the full cache)")
    return 0


def plot_pyramid(args) -> int:
    """Per-layer cache lengths (prefill and capacity) of each policy, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pyrajax.cache import cache_preset, make_plan

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in args.cache:
        plan = make_plan(cache_preset(name), args.prompt_len, args.new_tokens, args.layers)
        full = args.layers * (args.prompt_len + args.new_tokens)
        line, = ax.plot(plan.capacity, label=f"{name}: capacity ({sum(plan.capacity) / full:.1%} of full)")
        ax.plot(plan.prefill, "--", color=line.get_color(), label=f"{name}: after prefill")
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens cached")
    ax.set_title(f"KV length per layer, prompt {args.prompt_len} + {args.new_tokens} new, {args.layers} layers")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


FORWARDED = {"serve": "an OpenAI-compatible HTTP server with continuous batching: see `pyrajax serve -h`",
             "eval": "quality evaluation (perplexity, needle retrieval, agreement): see `pyrajax eval -h`",
             "bench": "GPU benchmarks (throughput, sweep, peer, plots, kernels, parity): see `pyrajax bench -h`"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        from pyrajax.eval import main as eval_main
        return eval_main(argv[1:]) or 0
    if argv[:1] == ["serve"]:
        from pyrajax.server import main as serve_main
        return serve_main(argv[1:])
    if argv[:1] == ["bench"]:
        from bench.__main__ import main as bench_main
        return bench_main(argv[1:])
    ap = argparse.ArgumentParser(prog="pyrajax", description=__doc__,
                                 epilog="also: " + "; ".join(f"`pyrajax {k}`: {v}" for k, v in FORWARDED.items()))
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="chat answers from the embedded SmolLM2-135M-Instruct, full vs pyramid cache")
    d.add_argument("--checkpoint", help="a converted checkpoint (default: the embedded model, fetched once)")
    d.add_argument("--cache", nargs="+", type=cli_cache, default=["full", "pyramid-256", "budget-256"],
                   help="cache policies")
    d.add_argument("--max-new-tokens", type=cli_int(1), default=64)
    d.add_argument("--prompt", action="append", help="a user message (repeatable); default: three examples")
    d.set_defaults(run=demo)
    p = sub.add_parser("plot-pyramid", help="PNG of the per-layer KV lengths of cache policies")
    p.add_argument("--cache", nargs="+", type=cli_cache, default=["full", "paper", "budget-0.45"])
    p.add_argument("--prompt-len", type=cli_int(1), default=512)
    p.add_argument("--new-tokens", type=cli_int(1), default=256)
    p.add_argument("--layers", type=cli_int(1), default=32)
    p.add_argument("--out", default="pyramid.png")
    p.set_defaults(run=plot_pyramid)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # a bad argument (argparse printed why) or --help: the status, not an exit
        return e.code
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"pyrajax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
