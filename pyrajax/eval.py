"""Quality evaluation of the cache policies: perplexity, passkey retrieval (needle) and greedy agreement.

    pyrajax eval --policies full paper budget-0.45 --tasks ppl needle agree --max-chunks 8

* Perplexity: the text is cut into chunks of context + continuation tokens. All but the last context token are
  prefilled under the policy (pruning included); from the last context token on, tokens are teacher-forced
  through `decode_step` with the policy active (its evictions included), and only the continuation tokens are
  scored. So every scored token, the first one included, is predicted by a query that attends only to what the
  policy cached (a prefill's own last token would still see the whole prompt under policies that cut a layer's
  cache after computing it).
* Needle: a passkey sentence is hidden at a given depth of Paul Graham essays trimmed to a token length; the
  model is asked for it in its chat template and answers greedily. Correct = the digits appear in the answer.
* Agreement: how many of the first n greedy tokens equal the full cache's, and where they first diverge.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import json
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pyrajax import cache as kvc
from pyrajax.cache import PyramidConfig
from pyrajax.generate import GenerationConfig, bucket, extend, generate, get_tokenizer, prefill

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
INSTRUCTION = "There is a pass key hidden in the following text. Find it and remember it.\n\n"
QUESTION = "What is the pass key?"


def as_policy(policy: str | PyramidConfig) -> PyramidConfig:
    return policy if isinstance(policy, PyramidConfig) else kvc.cache_preset(policy)


# ---------------------------------------------------------------------------------------------------------
# Perplexity

@functools.partial(jax.jit, static_argnames=("plan", "cfg", "impl"))
def _prefill_cache(params, tokens, seq, *, plan, cfg, impl):
    return prefill(params, tokens, seq, plan, cfg, impl)[1]


def perplexity(params, cfg, token_ids, policy, context: int = 512, continuation: int = 256,
               stride: int | None = None, max_chunks: int | None = None, batch_size: int = 4,
               impl: str = "auto", progress: bool = True) -> dict:
    """Perplexity of the continuation tokens of each chunk, with the cache policy active. See the module doc."""
    policy = as_policy(policy)
    if context < 1 or continuation < 1:
        raise ValueError("context and continuation must be >= 1")
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    size = context + continuation
    starts = list(range(0, len(ids) - size + 1, stride or size))[:max_chunks]
    if not starts:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of {size}")
    chunks = np.stack([ids[s:s + size] for s in starts])
    B = min(batch_size, len(chunks))  # every batch is padded to B rows: one prefill and one decode program
    # Prefill context - 1 tokens, then force continuation + 1 (the last context token first). The full cache's
    # lengths are context + continuation either way, so budgets mean the same as for a 512 + 256 request.
    prompt, forced = context - 1, continuation + 1
    if prompt < 1:
        raise ValueError("context must be >= 2 (one prefilled token, then the last context token is forced)")
    S = bucket(prompt, 16)
    plan = kvc.make_plan(policy, S, forced, cfg.num_layers, requests=((prompt, forced),))
    seq = kvc.make_seq_plan(plan, [prompt] * B, forced)
    nlls, lengths = [], []
    for i in tqdm(range(0, len(chunks), B), desc=f"ppl {policy.name}", disable=not progress):
        batch = chunks[i:i + B]
        n = len(batch)
        batch = np.concatenate([batch, np.repeat(batch[:1], B - n, axis=0)])  # filler rows, dropped
        tokens = np.full((B, S), cfg.pad_id, np.int32)
        tokens[:, :prompt] = batch[:, :prompt]
        cache = _prefill_cache(params, tokens, seq, plan=plan, cfg=cfg, impl=impl)
        per_layer = kvc.kv_bytes(cache)  # before the cache is donated
        itemsize = cache.layers[0].k.dtype.itemsize
        _, nll, cache = extend(params, cache, batch[:, prompt:-1], plan, cfg, impl, targets=batch[:, context:])
        nlls.append(np.asarray(nll)[:n])
        lengths.append(np.stack([np.asarray(lc.length) for lc in cache.layers], axis=1)[:n])
    nll = np.concatenate(nlls).astype(np.float64)
    per_token = cfg.kv_bytes_per_token_layer(itemsize)
    full = cfg.num_layers * (S + forced) * per_token  # per sequence, same slots
    live = np.concatenate(lengths).sum(axis=1) / (cfg.num_layers * size)
    return dict(policy=policy.name, ppl=float(np.exp(nll.mean())), nll=float(nll.mean()),
                chunk_nll=nll.mean(axis=1).tolist(), chunk_starts=starts, n_chunks=len(starts),
                scored_tokens=int(nll.size), context=context, continuation=continuation,
                prompt_bucket=S, new_bucket=forced, batch=B, capacity_per_layer=list(plan.capacity),
                kv_bytes=sum(per_layer) // B, kv_bytes_per_layer=[b // B for b in per_layer],
                full_kv_bytes=full, kv_fraction=sum(per_layer) / B / full,
                live_kv_fraction=float(live.mean()))


# ---------------------------------------------------------------------------------------------------------
# Needle (passkey retrieval)

def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def _haystack(essays_dir: Path, chars: int, seed: int) -> str:
    files = sorted(Path(essays_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt essays in {essays_dir}")
    random.Random(seed).shuffle(files)
    text = ""
    while len(text) < chars:  # essays in a seeded order, repeated if the target is very long
        for f in files:
            text += re.sub(r"\s+", " ", f.read_text()).strip() + " "
    return text[:chars]


def needle_prompts(tokenizer, essays_dir=DATA / "paul-graham-essays", lengths=(1024, 2048, 4096),
                   depths=(0, .25, .5, .75, 1.0), seed: int = 0) -> list[dict]:
    """Passkey prompts of about `length` tokens (chat template included), the needle at a sentence boundary
    at `depth` of the haystack. `depth` records the depth achieved: haystack tokens before the needle /
    haystack tokens (needle excluded)."""
    rng = random.Random(seed)
    text = _haystack(essays_dir, 6 * max(lengths), seed)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in enc["offset_mapping"]]  # char offset of each token
    sentence_ends = [0] + [m.end() for m in re.finditer(r"[.!?][\"')\]]*(\s+|(?=[A-Z]))", text)]
    out = []
    for length in lengths:
        needle_len = len(tokenizer.encode(" " + NEEDLE.format(key=12345) + " ", add_special_tokens=False))
        n_hay = length - len(chat_ids(tokenizer, INSTRUCTION + "\n\n" + QUESTION)) - needle_len
        if not 0 < n_hay < len(starts):
            raise ValueError(f"length {length} leaves {n_hay} haystack tokens")
        # The haystack ends at the sentence end nearest to n_hay tokens.
        cut = min(sentence_ends[1:], key=lambda c: abs(bisect.bisect_left(starts, c) - n_hay))
        hay_tokens = bisect.bisect_left(starts, cut)
        bounds = [b for b in sentence_ends if b < cut] + [cut]
        for depth in depths:
            b = min(bounds, key=lambda c: abs(bisect.bisect_left(starts, c) - depth * hay_tokens))
            key = str(rng.randrange(10000, 100000))
            hay = " ".join(p for p in (text[:b].rstrip(), NEEDLE.format(key=key), text[b:cut].strip()) if p)
            ids = chat_ids(tokenizer, INSTRUCTION + hay + "\n\n" + QUESTION)
            out.append(dict(length=length, requested_depth=depth, passkey=key, n_tokens=len(ids),
                            depth=bisect.bisect_left(starts, b) / hay_tokens, ids=ids))
    return out


def _generate_all(params, cfg, prompts, policy, max_new_tokens, batch_size, desc, progress, **kw):
    """Greedy generation over prompts grouped by length bucket: (token lists, texts or None, stats per batch)."""
    gcfg = GenerationConfig(model=cfg, max_new_tokens=max_new_tokens, cache=as_policy(policy), **kw)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens, texts, stats = [None] * len(prompts), [None] * len(prompts), []
    for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        idx = order[i:i + batch_size]
        r = generate(params, [prompts[j] for j in idx], gcfg)
        for k, j in enumerate(idx):
            tokens[j], texts[j] = r.tokens[k], r.texts[k] if r.texts else None
        stats.append(r.stats)
    return tokens, texts, stats


def _kv_fraction(stats: list[dict]) -> float:
    return sum(s["kv_bytes"] for s in stats) / sum(s["full_kv_bytes"] for s in stats)


def needle_accuracy(params, cfg, prompts: list[dict], policy, max_new_tokens: int = 16, batch_size: int = 8,
                    progress: bool = True) -> dict:
    policy = as_policy(policy)
    _, answers, stats = _generate_all(params, cfg, [p["ids"] for p in prompts], policy, max_new_tokens,
                                      batch_size, f"needle {policy.name}", progress)
    if answers[0] is None:
        raise ValueError("needle_accuracy needs a tokenizer: load a checkpoint that has one")
    rows = [dict(length=p["length"], requested_depth=p["requested_depth"], depth=p["depth"],
                 passkey=p["passkey"], answer=a, correct=p["passkey"] in a) for p, a in zip(prompts, answers)]
    table: dict = {}
    for r in rows:
        table.setdefault(str(r["length"]), {})[str(r["requested_depth"])] = float(r["correct"])
    return dict(policy=policy.name, accuracy=float(np.mean([r["correct"] for r in rows])), table=table,
                rows=rows, kv_fraction=_kv_fraction(stats))


# ---------------------------------------------------------------------------------------------------------
# Agreement with the full cache

def compare(ref: list[int], got: list[int]) -> tuple[float, int | None]:
    """(fraction of equal tokens over the positions both have, first divergence or None). A sequence that
    ends before the other, without a mismatch first, diverges where it ends."""
    m = min(len(ref), len(got))
    same = [a == b for a, b in zip(ref[:m], got[:m])]
    first = same.index(False) if False in same else (None if len(ref) == len(got) else m)
    return (float(np.mean(same)) if m else float(len(ref) == len(got))), first


def agreement(params, cfg, prompts, policy, n: int = 64, reference: list[list[int]] | None = None,
              batch_size: int = 8, progress: bool = True) -> dict:
    """Greedy agreement of `policy` with the full cache over the first n tokens (`reference`: the full cache's
    greedy tokens for these prompts, if already known)."""
    policy = as_policy(policy)
    prompts = [list(p) for p in prompts]
    if reference is None:
        reference = _generate_all(params, cfg, prompts, "full", n, batch_size, "agree full", progress)[0]
    got, _, stats = _generate_all(params, cfg, prompts, policy, n, batch_size, f"agree {policy.name}", progress)
    per = [compare(r, g) for r, g in zip(reference, got)]
    return dict(policy=policy.name, n=n, agreement=float(np.mean([a for a, _ in per])),
                per_prompt=[a for a, _ in per], first_divergence=[d for _, d in per],
                mean_first_divergence=float(np.mean([n if d is None else d for _, d in per])),
                kv_fraction=_kv_fraction(stats))


# ---------------------------------------------------------------------------------------------------------
# Command line

def env_info() -> dict:
    import jaxlib
    import transformers
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip()
    dev = jax.devices()[0]
    return dict(device=getattr(dev, "device_kind", str(dev)), platform=dev.platform, python=platform.python_version(),
                jax=jax.__version__, jaxlib=jaxlib.__version__, transformers=transformers.__version__,
                numpy=np.__version__, commit=git("rev-parse", "HEAD") or None,
                dirty=bool(git("status", "--porcelain", "--untracked-files=no")))


def family(name: str) -> str:
    """The curve a policy belongs to: its name without the budget, e.g. "h2o-0.45" -> "h2o",
    "budget-0.3:scorer=accumulated" -> "budget:scorer=accumulated"."""
    return re.sub(r"-(\d*\.?\d+)(?=:|$)", "", name, count=1)


def plot(results: dict, path: Path) -> None:
    """Quality against KV fraction, one curve per policy family (its budgets joined), one panel per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(t, key, label) for t, key, label in (("ppl", "ppl", "perplexity (lower is better)"),
                                                    ("needle", "accuracy", "needle accuracy"),
                                                    ("agree", "agreement", "greedy agreement with full"))
              if any(t in r for r in results.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    curves: dict = {}
    for name, r in results.items():
        curves.setdefault(family(name), []).append(r)
    for ax, (task, key, label) in zip(axes[0], panels):
        for fam, rs in curves.items():
            pts = sorted((r[task]["kv_fraction"], r[task][key]) for r in rs if task in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=fam)
        ax.set_xlabel("KV cache (fraction of full)")
        ax.set_ylabel(label)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    w = max([14] + [len(n) for n in results])
    lines = [f"{'policy':>{w}} {'KV (ppl)':>9} {'ppl':>9} {'vs full':>8} {'needle':>7} {'agree':>7} {'1st div':>8}"]
    full_ppl = results.get("full", {}).get("ppl", {}).get("ppl")
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"
    for name, r in results.items():
        ppl = r.get("ppl", {})
        lines.append(f"{name:>{w}} {f(ppl.get('kv_fraction'), '.1%'):>9} {f(ppl.get('ppl'), '.3f'):>9} "
                     f"{f(ppl['ppl'] / full_ppl if ppl and full_ppl else None, '.4f'):>8} "
                     f"{f(r.get('needle', {}).get('accuracy'), '.0%'):>7} "
                     f"{f(r.get('agree', {}).get('agreement'), '.3f'):>7} "
                     f"{f(r.get('agree', {}).get('mean_first_divergence'), '.1f'):>8}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyrajax eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a converted checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--text", type=Path, default=DATA / "wikitext-2-raw" / "wiki.test.raw",
                    help="plain text for perplexity and agreement prompts (default: WikiText-2 test)")
    ap.add_argument("--essays", type=Path, default=DATA / "paul-graham-essays", help="needle haystack *.txt")
    ap.add_argument("--policies", nargs="+", default=["full", "paper", "budget-0.45"])
    ap.add_argument("--tasks", nargs="+", default=["ppl", "needle", "agree"], choices=["ppl", "needle", "agree"])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--stride", type=int, default=None, help="chunk stride (default: context + continuation)")
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8, help="sequences per compiled batch")
    ap.add_argument("--needle-lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--needle-depths", type=float, nargs="+", default=[0, .25, .5, .75, 1.0])
    ap.add_argument("--needle-new-tokens", type=int, default=16)
    ap.add_argument("--agree-n", type=int, default=64, help="greedy tokens compared with the full cache")
    ap.add_argument("--agree-prompts", type=int, default=8, help="prompts (text chunks of --context tokens)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--impl", choices=["auto", "pallas", "xla"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="JSON results (default: bench/results/eval-<model>.json); "
                                             "the plot goes beside it as .png")
    ap.add_argument("--append", action="store_true",
                    help="add to the results already in --out (same policy and task: replaced)")
    return ap


def main(argv: list[str] | None = None) -> int:
    import pyrajax
    from checkpoints_convert.embedded import default_model_dir

    args = parser().parse_args(argv)
    path = Path(args.checkpoint or default_model_dir())
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(
        args.dtype, jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    params, cfg = pyrajax.load(path, dtype=dtype)
    tok = get_tokenizer(cfg)
    if tok is None:
        print(f"pyrajax eval: error: {path} has no tokenizer", file=sys.stderr)
        return 2
    out = args.out or Path("bench/results") / f"eval-{path.name}.json"
    print(f"model: {path} ({cfg.num_layers} layers, {jnp.dtype(dtype).name}, {jax.default_backend()})")

    ids = None
    if {"ppl", "agree"} & set(args.tasks):
        ids = np.array(tok(args.text.read_text(), add_special_tokens=False)["input_ids"], np.int32)
    needles = (needle_prompts(tok, args.essays, args.needle_lengths, args.needle_depths, args.seed)
               if "needle" in args.tasks else None)
    agree_prompts = ([ids[i * args.context:(i + 1) * args.context].tolist() for i in range(args.agree_prompts)]
                     if "agree" in args.tasks else None)
    reference = (_generate_all(params, cfg, agree_prompts, "full", args.agree_n, args.batch, "agree full", True)[0]
                 if agree_prompts else None)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(checkpoint=str(path), dtype=jnp.dtype(dtype).name, env=env_info(),
                    needle_prompts=[{k: v for k, v in p.items() if k != "ids"} for p in needles or []])
    runs, results = [settings], {}
    if args.append and out.exists():  # add to an earlier run's results (a policy's task is replaced)
        old = json.loads(out.read_text())
        runs, results = old["runs"] + runs, old["results"]
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.policies:
        r = results.setdefault(name, {})
        r["config"] = dataclasses.asdict(as_policy(name))
        if "ppl" in args.tasks:
            r["ppl"] = perplexity(params, cfg, ids, name, args.context, args.continuation, args.stride,
                                  args.max_chunks, batch_size=args.batch, impl=args.impl)
        if needles:
            r["needle"] = needle_accuracy(params, cfg, needles, name, args.needle_new_tokens, args.batch)
        if agree_prompts:
            r["agree"] = agreement(params, cfg, agree_prompts, name, args.agree_n, reference, args.batch)
        # Written after every policy: a long run that stops keeps what it finished (rerun with --append).
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(model=dataclasses.asdict(cfg), runs=runs, results=results), indent=1))
        tmp.replace(out)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
