"""Quality evaluation of the cache policies: perplexity, passkey retrieval (needle), greedy agreement, and the
quality grid (RULER in two protocols, long-context perplexity, the chat regression set) over every family and
budget.

    pyrajax eval --policies full paper budget-0.45 --tasks ppl needle agree --max-chunks 8
    pyrajax eval grid --append --deadline 540          # bench/results/quality-<model>.json + one PNG per task

* Perplexity: the text is cut into chunks of context + continuation tokens. All but the last context token are
  prefilled under the policy (pruning included); from the last context token on, tokens are teacher-forced
  through `decode_step` with the policy active (its evictions included), and only the continuation tokens are
  scored. So every scored token, the first one included, is predicted by a query that attends only to what the
  policy cached (a prefill's own last token would still see the whole prompt under policies that cut a layer's
  cache after computing it).
* Needle: a passkey sentence is hidden at a given depth of Paul Graham essays trimmed to a token length; the
  model is asked for it in its chat template and answers greedily. Correct = the digits appear in the answer.
* Agreement: how many of the first n greedy tokens equal the full cache's, and where they first diverge.

The grid (`pyrajax eval grid`, `grid_main`) runs every family of `cache.FAMILIES` at fraction and token budgets,
plus "full" and "paper", on these tasks, one JSON row per (policy, task):

* ppl-512 (WikiText-2 test, 512 + 256) and ppl-2048 / ppl-4096 (concatenated Paul Graham essays, + 256), as
  `perplexity` above.
* ruler-aware / ruler-agnostic: the RULER subset of `pyrajax.tasks.ruler` at 512-4096 tokens, greedy, scored by
  RULER's string match. Query-aware: the prompt is `aware_ids` (the question is in it when it is compressed).
  Query-agnostic: the prompt is `context_ids`, compressed without the question; `question_ids` then follow
  through decode steps with eviction active (`generate(..., suffixes=...)`). The full cache calibrates: a
  (task, length) cell counts in a policy's summary only where the full cache scores >= 80 points on it.
* chat-exact: the 36 conversations of `pyrajax.tasks.chat`; the share of greedy answers equal to the full
  cache's, and the mean first divergence. They fit under the default floor (min_tokens=256), so a policy runs
  the full cache's programs on them and matches it by design: that is the result to report.
* needle: as above.

Scores: perplexity for ppl-* (lower is better); points in [0, 100] for ruler-*, chat-exact and needle. Each row
also has the measured KV fraction (allocated K/V bytes over the full cache's at the same buckets), the measured
KV bytes per request, and the prefill FLOPs relative to the full cache's (`prefill_flops`, from the static plan).
The JSON is rewritten after every row; `--append` resumes, skipping rows already there with the same settings;
`--deadline` stops before a time slot ends; `--smoke` is a seconds-long run of the whole pipeline on CPU.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pyrajax import cache as kvc
from pyrajax import sharding
from pyrajax.cache import PyramidConfig
from pyrajax.config import ModelConfig
from pyrajax.generate import GenerationConfig, bucket, extend, generate, get_tokenizer, prefill
from pyrajax.prompts import prepare
from pyrajax.validate import cli_cache, cli_int

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
INSTRUCTION = "There is a pass key hidden in the following text. Find it and remember it.\n\n"
QUESTION = "What is the pass key?"


def as_policy(policy: str | PyramidConfig) -> PyramidConfig:
    return policy if isinstance(policy, PyramidConfig) else kvc.cache_preset(policy)


# ---------------------------------------------------------------------------------------------------------
# Perplexity

@functools.partial(jax.jit, static_argnames=("plan", "cfg", "impl", "mesh"))
def _prefill_cache(params, tokens, seq, *, plan, cfg, impl, mesh=None):
    return prefill(params, tokens, seq, plan, cfg, impl, mesh)[1]


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
        cache = _prefill_cache(params, tokens, seq, plan=plan, cfg=cfg, impl=impl, mesh=sharding.mesh_of(params))
        # before the cache is donated; KV heads copied for tensor parallelism counted once
        per_layer = [b // params.layers[0].kv_copies for b in kvc.kv_bytes(cache)]
        itemsize = cache.layers[0].k.dtype.itemsize
        _, nll, cache = extend(params, cache, batch[:, prompt:-1], plan, cfg, impl, targets=batch[:, context:])
        nlls.append(np.asarray(nll)[:n])
        lengths.append(np.stack([np.asarray(kvc.held_tokens(lc)) for lc in cache.layers], axis=1)[:n])
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
# Prefill compute

def prefill_flops(cfg: ModelConfig, policy, prompt_len: int, max_new: int = 256,
                  protected: int | None = None) -> float:
    """Approximate FLOPs of one request's prefill under `policy`, from the static plan (no run needed).

    Layer l processes n_l tokens: with hidden-state pruning (PyramidInfer, "paper", "pyramid") the tokens that
    enter it, `cache.entering_lengths`; otherwise the whole prompt (those policies only cut what each layer
    caches). Per layer: 2 * (its weight count) * n_l for the projections and the MLP, plus 4 * n_l^2 * hd * H
    for attention scores and values (the dense square the kernel computes under the causal mask). Selecting
    adds its scoring: the window scorer re-projects W queries and scores them against n_l keys; H2O's
    accumulated scores run every query against every key once more. Real tokens are counted, not padded
    slots, so the ratio to the full cache is the method's, not the buckets'. Norms, softmax, RoPE and gathers
    are left out; the last token's LM head is in. A request the policy does not compress (under its floor)
    runs the full cache's programs, as in `generate`, and counts as the full cache."""
    policy = as_policy(policy)
    L, D, H, K, hd = cfg.num_layers, cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_token = 2 * (D * (H + 2 * K) * hd + H * hd * D + 3 * D * cfg.ffn_dim)
    total = 2 * D * cfg.vocab_size
    selecting = kvc.compresses(policy, prompt_len, max_new, L, protected)
    n = kvc.entering_lengths(policy, prompt_len, max_new, L, protected) if selecting else [prompt_len] * L
    W = kvc.window_size(policy, prompt_len)
    for l, nl in enumerate(n):
        total += per_token * nl + 4 * nl * nl * hd * H
        if not selecting:
            continue
        # which scores prefill computes at layer l (mirrors generate.prefill)
        prune = policy.selects_in_prefill and policy.prune_hidden and l + 1 < L
        trim = policy.selects_in_prefill and (not policy.prune_hidden or policy.decoupled)
        if policy.keeps_rows or ((prune or trim) and policy.scorer == "window"):
            total += 2 * W * D * H * hd + 2 * W * nl * hd * H
        if (policy.scorer == "accumulated" and (prune or trim)) or policy.keeps_accumulated:
            total += 2 * nl * nl * hd * H
    return float(total)


def prefill_flops_fraction(cfg: ModelConfig, policy, prompt_len: int, max_new: int = 256,
                           protected: int | None = None) -> float:
    """`prefill_flops` of the policy over the full cache's for the same request."""
    return prefill_flops(cfg, policy, prompt_len, max_new, protected) / prefill_flops(cfg, "full", prompt_len, max_new)


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


def _rows_per_batch(batch: int, batch_tokens: int | None, prompt_bucket: int) -> int:
    """Sequences per compiled batch: at most `batch` and `batch_tokens` prompt slots (what prefill attention's
    [B, H, S, S] scores grow with), rounded down to a power of two, as batch buckets are."""
    b = max(1, min(batch, batch_tokens // prompt_bucket if batch_tokens else batch))
    return 1 << (b.bit_length() - 1)


def run_requests(params, cfg: ModelConfig, policy, requests: list[dict], batch: int = 8,
                 batch_tokens: int | None = None, desc: str = "", progress: bool = True,
                 impl: str = "auto") -> list[dict]:
    """Greedy generation for requests {"prompt": ids, "suffix": ids ([] for none), "max_new": int,
    "protect": mask or None, "group": optional key}, with per-request accounting.

    Compilation, not execution, is what a grid of small-model runs spends its time on (a 30-layer program takes
    seconds to compile, a batch of it a fraction of one), so requests are batched to compile as few programs as
    possible: by (max_new, group), the group defaulting to the (prompt, suffix) bucket pair. A group whose
    requests span several buckets gets one extra row in every batch, a copy of its longest prompt and longest
    suffix, so that every batch has the group's buckets, hence one prefill and one decode program. Batches
    are topped up to one size with copies (rows never depend on their batch companions). Each request's
    accounting is at the buckets its batch ran with.

    Returns per request: tokens, text, kv_bytes and full_kv_bytes (its share of the batch's allocated K/V and
    of the full cache's at the same buckets), live_kv_fraction (K/V slots in use at the end over the full
    cache's at its own lengths), compressed, and prefill_flops / full_prefill_flops."""
    policy = as_policy(policy)
    shape = lambda r: (bucket(len(r["prompt"]), 16), bucket(len(r["suffix"]), 16) if r["suffix"] else 0)
    groups: dict = {}
    for i, r in enumerate(requests):
        groups.setdefault((r["max_new"], r.get("group", shape(r))), []).append(i)
    batches = []
    for (max_new, _), idx in groups.items():
        idx.sort(key=lambda i: len(requests[i]["prompt"]))
        mine = [requests[i] for i in idx]
        anchor = None
        if len({shape(r) for r in mine}) > 1:
            anchor = dict(prompt=max((r["prompt"] for r in mine), key=len),
                          suffix=max((r["suffix"] for r in mine), key=len), max_new=max_new)
        longest = anchor["prompt"] if anchor else mine[-1]["prompt"]
        rows = _rows_per_batch(batch, batch_tokens, bucket(len(longest), 16))
        extra = anchor is not None
        rows = max(rows, 1 + extra) if len(idx) + extra > rows else bucket(len(idx) + extra, 1)
        take = rows - extra
        batches += [(max_new, idx[k:k + take], rows, anchor) for k in range(0, len(idx), take)]
    out: list = [None] * len(requests)
    for max_new, idx, rows, anchor in tqdm(batches, desc=desc, disable=not progress):
        chosen = [requests[j] for j in idx] + [anchor or requests[idx[0]]] * (rows - len(idx))
        gcfg = GenerationConfig(model=cfg, max_new_tokens=max_new, cache=policy, impl=impl)
        r = generate(params, [q["prompt"] for q in chosen], gcfg, protect=[q.get("protect") for q in chosen],
                     suffixes=[q["suffix"] for q in chosen])
        B = r.stats["batch_bucket"]
        for k, j in enumerate(idx):
            q = requests[j]
            s, after = len(q["prompt"]), len(q["suffix"]) + max_new
            protected = kvc.protected_outside(policy, s, q.get("protect"))
            out[j] = dict(tokens=r.tokens[k], text=r.texts[k] if r.texts else None,
                          kv_bytes=r.stats["kv_bytes"] / B, full_kv_bytes=r.stats["full_kv_bytes"] / B,
                          live_kv_fraction=sum(r.stats["lengths_at_end"][k]) / (cfg.num_layers * (s + after)),
                          compressed=r.stats["compressed"],
                          prefill_flops=prefill_flops(cfg, policy, s, after, protected),
                          full_prefill_flops=prefill_flops(cfg, "full", s, after))
    return out


def _generate_all(params, cfg, prompts, policy, max_new_tokens, batch_size, desc, progress, impl="auto"):
    """Greedy generation of token-id prompts: (token lists, texts or None, per-request results)."""
    reqs = [dict(prompt=list(p), suffix=[], max_new=max_new_tokens) for p in prompts]
    outs = run_requests(params, cfg, policy, reqs, batch_size, desc=desc, progress=progress, impl=impl)
    return [o["tokens"] for o in outs], [o["text"] for o in outs], outs


def _kv_fraction(outs: list[dict]) -> float:
    return sum(o["kv_bytes"] for o in outs) / sum(o["full_kv_bytes"] for o in outs)


def _flops_fraction(outs: list[dict]) -> float:
    return sum(o["prefill_flops"] for o in outs) / sum(o["full_prefill_flops"] for o in outs)


def needle_accuracy(params, cfg, prompts: list[dict], policy, max_new_tokens: int = 16, batch_size: int = 8,
                    progress: bool = True, batch_tokens: int | None = None, impl: str = "auto") -> dict:
    policy = as_policy(policy)
    # one group: 15 prompts padded to the longest cost less than one compiled program per length
    reqs = [dict(prompt=p["ids"], suffix=[], max_new=max_new_tokens, group="needle") for p in prompts]
    outs = run_requests(params, cfg, policy, reqs, batch_size, batch_tokens, f"needle {policy.name}", progress, impl)
    answers = [o["text"] for o in outs]
    if answers[0] is None:
        raise ValueError("needle_accuracy needs a tokenizer: load a checkpoint that has one")
    rows = [dict(length=p["length"], requested_depth=p["requested_depth"], depth=p["depth"],
                 passkey=p["passkey"], answer=a, correct=p["passkey"] in a) for p, a in zip(prompts, answers)]
    table: dict = {}
    for r in rows:
        table.setdefault(str(r["length"]), {})[str(r["requested_depth"])] = float(r["correct"])
    return dict(policy=policy.name, accuracy=float(np.mean([r["correct"] for r in rows])), table=table,
                rows=rows, kv_fraction=_kv_fraction(outs), kv_bytes=float(np.mean([o["kv_bytes"] for o in outs])),
                prefill_flops_fraction=_flops_fraction(outs))


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
    got, _, outs = _generate_all(params, cfg, prompts, policy, n, batch_size, f"agree {policy.name}", progress)
    per = [compare(r, g) for r, g in zip(reference, got)]
    return dict(policy=policy.name, n=n, agreement=float(np.mean([a for a, _ in per])),
                per_prompt=[a for a, _ in per], first_divergence=[d for _, d in per],
                mean_first_divergence=float(np.mean([n if d is None else d for _, d in per])),
                kv_fraction=_kv_fraction(outs))


# ---------------------------------------------------------------------------------------------------------
# RULER (query-aware and query-agnostic) and the chat regression set

RULER_PROTOCOLS = ("aware", "agnostic")


def ruler_requests(samples: list[dict], protocol: str, new_tokens: int | None = None,
                   one_bucket: bool = False) -> list[dict]:
    """Requests of `run_requests` for RULER samples. "aware": the prompt is `aware_ids` (question before and
    after the haystack); "agnostic": the prompt is `context_ids`, compressed before the question, which
    follows as the suffix (`question_ids`, forced through decode steps with eviction active). `new_tokens`:
    every request's generation budget (None: RULER's, 128 niah and 30 vt; the answers are shorter). One
    budget for all tasks and one group per prompt length keep the compiled programs few; `one_bucket`: one
    group for every length, so every batch pads to the longest prompt and one prefill and one decode program
    serve them all (where compiling costs more than the padded compute: a GPU; the scores are the same, as a
    sequence's output does not depend on its padding)."""
    if protocol not in RULER_PROTOCOLS:
        raise ValueError(f"unknown RULER protocol {protocol!r}; use one of {RULER_PROTOCOLS}")
    aware = protocol == "aware"
    return [dict(prompt=s["aware_ids"] if aware else s["context_ids"], suffix=[] if aware else s["question_ids"],
                 max_new=new_tokens or s["max_new_tokens"], group="all" if one_bucket else s["length"])
            for s in samples]


def ruler_eval(params, cfg, samples: list[dict], policy, protocol: str, new_tokens: int | None = None,
               batch: int = 8, batch_tokens: int | None = None, progress: bool = True, impl: str = "auto",
               one_bucket: bool = False) -> dict:
    """Greedy answers to RULER samples under `policy`, scored by RULER's string match, in points (0-100).
    Returns per (task, length) cell its score and the sums its summary needs (KV bytes, prefill FLOPs), plus
    every answer (texts) and per-sample score."""
    from pyrajax.tasks.ruler import score
    policy = as_policy(policy)
    requests = ruler_requests(samples, protocol, new_tokens, one_bucket)
    outs = run_requests(params, cfg, policy, requests, batch, batch_tokens, f"ruler-{protocol} {policy.name}",
                        progress, impl)
    points = [100.0 * score(s, o["text"]) for s, o in zip(samples, outs)]
    cells: dict = {}
    for s, o, pt in zip(samples, outs, points):
        c = cells.setdefault(s["task"], {}).setdefault(str(s["length"]), dict(
            scores=[], kv_bytes=0.0, full_kv_bytes=0.0, prefill_flops=0.0, full_prefill_flops=0.0,
            live_kv_fraction=0.0))
        c["scores"].append(pt)
        for k in ("kv_bytes", "full_kv_bytes", "prefill_flops", "full_prefill_flops", "live_kv_fraction"):
            c[k] += o[k]
    for by_length in cells.values():
        for c in by_length.values():
            c.update(n=len(c["scores"]), score=float(np.mean(c["scores"])),
                     kv_fraction=c["kv_bytes"] / c["full_kv_bytes"],
                     prefill_flops_fraction=c["prefill_flops"] / c["full_prefill_flops"],
                     live_kv_fraction=c["live_kv_fraction"] / len(c["scores"]))
    return dict(policy=policy.name, protocol=protocol, cells=cells, scores=points,
                texts=[o["text"] for o in outs], tokens=[o["tokens"] for o in outs])


def ruler_summary(cells: dict, calibration: dict, threshold: float = 80.0) -> dict:
    """A policy's RULER summary: the mean of its cell scores over the cells where the full cache
    (`calibration`: the full cache's cells) scores >= `threshold` points, and the KV and prefill-FLOPs
    fractions over the same requests. Where no cell passes, every cell counts (calibrated: [])."""
    keep = [(t, n) for t, by in cells.items() for n in by
            if calibration.get(t, {}).get(n, {}).get("score", -1.0) >= threshold]
    used = keep or [(t, n) for t, by in cells.items() for n in by]
    cs = [cells[t][n] for t, n in used]
    total = lambda k: sum(c[k] for c in cs)
    by_length = {}
    for t, n in used:
        by_length.setdefault(n, []).append(cells[t][n]["score"])
    return dict(score=float(np.mean([c["score"] for c in cs])), n=sum(c["n"] for c in cs),
                kv_fraction=total("kv_bytes") / total("full_kv_bytes"), kv_bytes=total("kv_bytes") / total("n"),
                prefill_flops_fraction=total("prefill_flops") / total("full_prefill_flops"),
                live_kv_fraction=sum(c["live_kv_fraction"] * c["n"] for c in cs) / total("n"),
                calibrated=[f"{t}@{n}" for t, n in keep], cells_used=len(used),
                score_by_length={n: float(np.mean(v)) for n, v in sorted(by_length.items(), key=lambda x: int(x[0]))})


def chat_exact(params, cfg, conversations: list, policy, max_new_tokens: int = 48,
               reference: list[list[int]] | None = None, batch: int = 8, progress: bool = True,
               impl: str = "auto") -> dict:
    """The chat regression set: greedy answers under `policy` against the full cache's (`reference`, else
    generated): the share that match exactly, and where each first diverges (None: identical; an identical
    answer counts as max_new_tokens in the mean). Conversations keep their protect masks (`pyrajax.prompts`)."""
    policy = as_policy(policy)
    tok = get_tokenizer(cfg)
    reqs = [dict(prompt=ids, suffix=[], max_new=max_new_tokens, protect=mask, group="chat")
            for ids, mask in prepare(conversations, tok, cfg.vocab_size, policy.protect_last_turn)]
    outs = run_requests(params, cfg, policy, reqs, batch, desc=f"chat {policy.name}", progress=progress, impl=impl)
    if reference is None:
        reference = ([o["tokens"] for o in outs] if policy == PyramidConfig.full() else
                     chat_exact(params, cfg, conversations, "full", max_new_tokens, None, batch, progress,
                                impl)["tokens"])
    same = [o["tokens"] == ref for o, ref in zip(outs, reference)]
    first = [compare(ref, o["tokens"])[1] for o, ref in zip(outs, reference)]
    return dict(policy=policy.name, exact=float(np.mean(same)), per_prompt=same, first_divergence=first,
                mean_first_divergence=float(np.mean([max_new_tokens if d is None else d for d in first])),
                compressed=sum(o["compressed"] for o in outs), prompt_tokens=[len(r["prompt"]) for r in reqs],
                tokens=[o["tokens"] for o in outs], texts=[o["text"] for o in outs],
                kv_fraction=_kv_fraction(outs), kv_bytes=float(np.mean([o["kv_bytes"] for o in outs])),
                live_kv_fraction=float(np.mean([o["live_kv_fraction"] for o in outs])),
                prefill_flops_fraction=_flops_fraction(outs))


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
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="the quality grid: pyrajax eval grid -h")
    ap.add_argument("--checkpoint", help="a converted checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--text", type=Path, default=DATA / "wikitext-2-raw" / "wiki.test.raw",
                    help="plain text for perplexity and agreement prompts (default: WikiText-2 test)")
    ap.add_argument("--essays", type=Path, default=DATA / "paul-graham-essays", help="needle haystack *.txt")
    ap.add_argument("--policies", nargs="+", type=cli_cache, default=["full", "paper", "budget-0.45"])
    ap.add_argument("--tasks", nargs="+", default=["ppl", "needle", "agree"], choices=["ppl", "needle", "agree"])
    ap.add_argument("--context", type=cli_int(2), default=512)
    ap.add_argument("--continuation", type=cli_int(1), default=256)
    ap.add_argument("--stride", type=cli_int(1), default=None, help="chunk stride (default: context + continuation)")
    ap.add_argument("--max-chunks", type=cli_int(1), default=None)
    ap.add_argument("--batch", type=cli_int(1), default=8, help="sequences per compiled batch")
    ap.add_argument("--needle-lengths", type=cli_int(16), nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--needle-depths", type=float, nargs="+", default=[0, .25, .5, .75, 1.0])
    ap.add_argument("--needle-new-tokens", type=cli_int(1), default=16)
    ap.add_argument("--agree-n", type=cli_int(1), default=64, help="greedy tokens compared with the full cache")
    ap.add_argument("--agree-prompts", type=cli_int(1), default=8, help="prompts (text chunks of --context tokens)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--impl", choices=["auto", "pallas", "xla"], default="auto")
    ap.add_argument("--tp", type=cli_int(1), default=1, help="tensor-parallel devices (the weights split over them)")
    ap.add_argument("--seed", type=cli_int(0), default=0)
    ap.add_argument("--out", type=Path, help="JSON results (default: bench/results/eval-<model>.json); "
                                             "the plot goes beside it as .png")
    ap.add_argument("--append", action="store_true",
                    help="add to the results already in --out (same policy and task: replaced)")
    return ap


def main(argv: list[str] | None = None) -> int:
    import pyrajax
    from checkpoints_convert.embedded import default_model_dir

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["grid"]:
        return grid_main(argv[1:])
    args = parser().parse_args(argv)
    path = Path(args.checkpoint or default_model_dir())
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(
        args.dtype, jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    params, cfg = pyrajax.load(path, dtype=dtype, mesh=pyrajax.make_mesh(tp=args.tp) if args.tp > 1 else None)
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


# ---------------------------------------------------------------------------------------------------------
# The quality grid: every family at every budget, on every task

GRID_FRACTIONS = (0.25, 0.45, 0.6)
GRID_TOKENS = (128, 256, 512, 1024)
GRID_TASKS = ("ppl", "ppl-long", "ruler", "chat", "needle")
# What a grid task writes: one row per entry (ppl tasks: one per length, "ppl-<context>").
HIGHER_IS_BETTER = {"ruler-aware": True, "ruler-agnostic": True, "chat-exact": True, "needle": True}

# Settings the grid fills in when the command line leaves them out: the full grid, or --smoke (the whole
# pipeline on the first 2 layers of the model, in seconds on a CPU).
GRID_DEFAULTS = dict(policies=None, layers=None, families=list(kvc.FAMILIES), fractions=list(GRID_FRACTIONS),
                     token_budgets=list(GRID_TOKENS), ppl_lengths=[512], ppl_long_lengths=[2048, 4096],
                     ppl_continuation=256, ppl_chunks=64, ruler_lengths=[512, 1024, 2048, 4096], ruler_tasks=None,
                     ruler_n=50, ruler_new_tokens=64, chat_n=None, chat_new_tokens=48,
                     needle_lengths=[1024, 2048, 4096], needle_depths=[0, .25, .5, .75, 1.0], needle_new_tokens=16)
SMOKE = dict(GRID_DEFAULTS, policies=["budget-0.45"], layers=2,
             ppl_lengths=[128], ppl_long_lengths=[256], ppl_continuation=32, ppl_chunks=2, ruler_lengths=[512],
             ruler_tasks=["niah_single_1", "vt"], ruler_n=2, ruler_new_tokens=8, chat_n=2, chat_new_tokens=8,
             needle_lengths=[512], needle_depths=[0.5], needle_new_tokens=8)


def grid_policies(families, fractions, token_budgets) -> list[str]:
    """full, paper, then budget by budget (fractions first) every family: a grid stopped early has all the
    families at the budgets it reached."""
    budgets = [str(float(f)) for f in fractions] + [str(int(t)) for t in token_budgets]
    return ["full", "paper"] + [f"{fam}-{b}" for b in budgets for fam in families]


def _row_tasks(args) -> list[str]:
    names = []
    for task in args.tasks:
        if task == "ppl":
            names += [f"ppl-{n}" for n in args.ppl_lengths]
        elif task == "ppl-long":
            names += [f"ppl-{n}" for n in args.ppl_long_lengths]
        elif task == "ruler":
            names += [f"ruler-{p}" for p in args.ruler_protocols]
        else:
            names.append({"chat": "chat-exact"}.get(task, task))
    if len(set(names)) != len(names):
        raise ValueError(f"two grid tasks would write the same rows ({names}); give --ppl-lengths and "
                         "--ppl-long-lengths different lengths")
    return names


def _task_settings(task: str, args, data: dict) -> dict:
    """What a row's result depends on besides the policy: a row is reused on --append only when they match."""
    common = dict(model=data["model"], layers=data["layers"], dtype=data["dtype"])
    if task.startswith("ppl-"):
        src = data["ppl_source"][task]
        return dict(common, text=src["name"], text_tokens=src["tokens"], context=int(task[4:]),
                    continuation=args.ppl_continuation, chunks=args.ppl_chunks)
    if task.startswith("ruler-"):
        return dict(common, lengths=args.ruler_lengths, tasks=data["ruler_tasks"], n=args.ruler_n, seed=args.seed,
                    new_tokens=args.ruler_new_tokens)
    if task == "chat-exact":
        return dict(common, n=len(data["chat"]), new_tokens=args.chat_new_tokens)
    return dict(common, lengths=args.needle_lengths, depths=args.needle_depths, new_tokens=args.needle_new_tokens,
                seed=args.seed)


def _grid_data(task: str, args, data: dict, tok) -> None:
    """Builds, once, the inputs `task` needs (RULER prompts take ~25 s for the full grid: only when needed)."""
    if task.startswith("ruler-") and "ruler" not in data:
        from pyrajax.tasks.ruler import ruler_samples
        data["ruler"] = [s for n in args.ruler_lengths for t in data["ruler_tasks"]
                         for s in ruler_samples(tok, t, n, args.ruler_n, args.seed, essays_dir=args.essays)]
    if task == "needle" and "needle" not in data:
        data["needle"] = needle_prompts(tok, args.essays, args.needle_lengths, args.needle_depths, args.seed)


def _grid_row(task: str, name: str, params, cfg, args, data: dict, rows: dict) -> dict:
    """One (policy, task) result as a row (score, kv_fraction and the FLOPs fraction of ruler rows are
    filled in by `_refresh`, from the full cache's calibration)."""
    policy = as_policy(name)
    kw = dict(progress=not args.quiet, impl=args.impl)
    row = dict(policy=name, family=family(name), budget=policy.budget, task=task,
               higher_is_better=HIGHER_IS_BETTER.get(task, False))
    if task.startswith("ppl-"):
        context = int(task[4:])
        ids = data["ppl_ids"][data["ppl_source"][task]["name"]]
        size = context + args.ppl_continuation
        chunks = min(args.ppl_chunks or len(ids), (len(ids) - size) // size + 1)
        # as few batches as the batch limits allow, evenly filled (perplexity pads every batch to one size)
        most = _rows_per_batch(args.batch, args.batch_tokens, bucket(context, 16))
        b = -(-chunks // -(-chunks // most))
        r = perplexity(params, cfg, ids, policy, context, args.ppl_continuation, max_chunks=chunks,
                       batch_size=b, **kw)
        row.update(length=context, score=r["ppl"], kv_fraction=r["kv_fraction"], kv_bytes=r["kv_bytes"],
                   full_kv_bytes=r["full_kv_bytes"], live_kv_fraction=r["live_kv_fraction"], n=r["n_chunks"],
                   prefill_flops_fraction=prefill_flops_fraction(cfg, policy, context - 1, args.ppl_continuation + 1),
                   nll=r["nll"], scored_tokens=r["scored_tokens"], text=data["ppl_source"][task]["name"],
                   capacity_per_layer=r["capacity_per_layer"])
    elif task.startswith("ruler-"):
        r = ruler_eval(params, cfg, data["ruler"], policy, task[6:], args.ruler_new_tokens, args.batch,
                       args.batch_tokens, one_bucket=args.ruler_one_bucket, **kw)
        row.update(length=max(args.ruler_lengths), cells=r["cells"])
        if name == "full":  # the calibration's answers, to read what the model says
            row["texts"] = r["texts"]
    elif task == "chat-exact":
        ref = rows.get(("full", task), {}).get("tokens")
        r = chat_exact(params, cfg, data["chat"], policy, args.chat_new_tokens, ref, args.batch, **kw)
        row.update(length=max(r["prompt_tokens"]), score=100 * r["exact"], n=len(data["chat"]),
                   kv_fraction=r["kv_fraction"], kv_bytes=r["kv_bytes"], live_kv_fraction=r["live_kv_fraction"],
                   prefill_flops_fraction=r["prefill_flops_fraction"], compressed_requests=r["compressed"],
                   mean_first_divergence=r["mean_first_divergence"], first_divergence=r["first_divergence"],
                   texts=r["texts"])
        if name == "full":
            row["tokens"] = r["tokens"]
    else:
        r = needle_accuracy(params, cfg, data["needle"], policy, args.needle_new_tokens, args.batch,
                            batch_tokens=args.batch_tokens, **kw)
        row.update(length=max(args.needle_lengths), score=100 * r["accuracy"], n=len(r["rows"]),
                   kv_fraction=r["kv_fraction"], kv_bytes=r["kv_bytes"],
                   prefill_flops_fraction=r["prefill_flops_fraction"], table=r["table"],
                   answers=[x["answer"] for x in r["rows"]])
    return row


def _refresh(rows: dict, threshold: float) -> None:
    """Fields that depend on other rows: RULER summaries (calibrated by the full cache's cells), scores
    relative to the full cache's, and the budget of a policy that has none (full: 1.0, paper: its measured KV
    fraction, so that every row's budget is a number)."""
    for (name, task), row in rows.items():
        if task.startswith("ruler-") and ("full", task) in rows:
            row.update(ruler_summary(row["cells"], rows[("full", task)]["cells"], threshold),
                       calibration_threshold=threshold)
        full = rows.get(("full", task))
        if full and "score" in full and "score" in row and full["score"]:
            row["vs_full"] = row["score"] / full["score"]
        if row["budget"] is None and "kv_fraction" in row:
            row["budget"] = 1.0 if name == "full" else round(row["kv_fraction"], 4)


def plot_grid(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per task beside `out`: score against measured KV fraction, one colour per family (fraction
    budgets solid, token budgets dashed), ablations as grey points, full and paper as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for task in dict.fromkeys(r["task"] for r in rows if "score" in r):
        rs = [r for r in rows if r["task"] == task and "score" in r]
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        # Curves for the named families; ablations (a family with field overrides) as grey points, unlabelled
        ablations = [r for r in rs if ":" in r["family"]]
        if ablations:
            ax.scatter([r["kv_fraction"] for r in ablations], [r["score"] for r in ablations], s=12, color="0.6",
                       zorder=1, label="ablations (overrides)")
        fams = list(dict.fromkeys(r["family"] for r in rs if r["family"] not in ("full", "paper")
                                  and ":" not in r["family"]))
        for i, fam in enumerate(fams):
            for tokens, style, marker in ((False, "-", "o"), (True, "--", "s")):
                pts = sorted((r["kv_fraction"], r["score"]) for r in rs
                             if r["family"] == fam and isinstance(r["budget"], int) == tokens)
                if pts:
                    # C7 is the ablations' grey; pyrajax's own family in black
                    color = "k" if fam == "pyramid" else f"C{(0, 1, 2, 3, 4, 5, 6, 8, 9)[i % 9]}"
                    ax.plot(*zip(*pts), style, marker=marker, color=color, ms=4,
                            label=f"{fam} ({'tokens' if tokens else 'fractions'})")
        for name, marker, color in (("full", "*", "k"), ("paper", "X", "0.4")):
            for r in rs:
                if r["policy"] == name:
                    ax.scatter([r["kv_fraction"]], [r["score"]], marker=marker, s=90, color=color, zorder=5,
                               label=name)
                    if name == "full":
                        ax.axhline(r["score"], color="k", lw=0.7, ls=":")
        scores = [r["score"] for r in rs]
        if task.startswith("ppl-") and min(scores) > 0 and max(scores) / min(scores) > 3:
            ax.set_yscale("log")
        unit = "perplexity (lower is better)" if task.startswith("ppl-") else "score, points (higher is better)"
        ax.set(xlabel="measured KV cache (fraction of full)", ylabel=unit,
               title=f"{task} (n = {rs[0].get('n')} per policy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best", ncol=2)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}-{task}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def grid_table(rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["policy"], r["task"]): r for r in rows}
    w = max([8] + [len(n) for n in names])
    lines = [f"{'policy':>{w}} " + " ".join(f"{t:>15}" for t in tasks) + "   (score @ KV fraction)"]
    for n in names:
        cells = [by.get((n, t)) for t in tasks]
        lines.append(f"{n:>{w}} " + " ".join(f"{c['score']:>8.2f} @{c['kv_fraction']:>5.2f}" if c and "score" in c
                                             else f"{'-':>15}" for c in cells))
    return "\n".join(lines)


def grid_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyrajax eval grid", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The quality grid: every policy family at fraction and token budgets, plus full and paper, on "
                    "perplexity (512 WikiText-2; 2048 and 4096 essays), RULER (query-aware and query-agnostic), the "
                    "chat regression set and the needle. JSON rows (written after each) and one PNG per task.",
        epilog="Unset options take the full grid's defaults, or with --smoke a seconds-long CPU run:\n  " +
               "\n  ".join(f"{k}: {GRID_DEFAULTS[k]} (smoke: {SMOKE[k]})" for k in GRID_DEFAULTS))
    ap.add_argument("--checkpoint", help="a converted checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--text", type=Path, default=DATA / "wikitext-2-raw" / "wiki.test.raw", help="ppl text")
    ap.add_argument("--essays", type=Path, default=DATA / "paul-graham-essays",
                    help="Paul Graham essays *.txt: long-context perplexity, RULER haystacks, needle")
    ap.add_argument("--tasks", nargs="+", default=list(GRID_TASKS), choices=GRID_TASKS)
    ap.add_argument("--policies", nargs="+", type=cli_cache,
                    help="explicit policies instead of the grid (full is always added)")
    ap.add_argument("--families", nargs="+", choices=list(kvc.FAMILIES))
    ap.add_argument("--fractions", nargs="*", type=float, help="fraction budgets")
    ap.add_argument("--token-budgets", nargs="*", type=cli_int(16), help="token budgets")
    ap.add_argument("--ppl-lengths", nargs="+", type=cli_int(2), help="contexts of the WikiText-2 perplexity (ppl)")
    ap.add_argument("--ppl-long-lengths", nargs="+", type=cli_int(2),
                    help="contexts of the essays' perplexity (ppl-long)")
    ap.add_argument("--ppl-continuation", type=cli_int(1), help="scored continuation tokens per chunk")
    ap.add_argument("--ppl-chunks", type=cli_int(0), help="chunks per ppl row (0: every chunk of the text)")
    ap.add_argument("--ruler-lengths", nargs="+", type=cli_int(64))
    ap.add_argument("--ruler-tasks", nargs="+", help="RULER tasks (default: all of pyrajax.tasks.ruler.RULER_TASKS)")
    ap.add_argument("--ruler-n", type=cli_int(1), help="samples per (task, length)")
    ap.add_argument("--ruler-protocols", nargs="+", choices=RULER_PROTOCOLS, default=list(RULER_PROTOCOLS),
                    help="query-aware (question in the prompt) and/or query-agnostic (asked after compression)")
    ap.add_argument("--ruler-new-tokens", type=cli_int(1),
                    help="generation budget of every RULER request (0: RULER's own, 128 niah and 30 vt)")
    ap.add_argument("--ruler-one-bucket", action="store_true",
                    help="pad every RULER prompt to the longest length's bucket: one prefill and one decode program "
                         "per policy instead of one per length (same scores; for a GPU, where compiling dominates)")
    ap.add_argument("--ruler-calibration", type=float, default=80.0,
                    help="points the full cache must score on a (task, length) cell for it to count")
    ap.add_argument("--chat-n", type=cli_int(1), help="conversations of the chat set (default: all 36)")
    ap.add_argument("--chat-new-tokens", type=cli_int(1))
    ap.add_argument("--needle-lengths", nargs="+", type=cli_int(16))
    ap.add_argument("--needle-depths", nargs="+", type=float)
    ap.add_argument("--needle-new-tokens", type=cli_int(1))
    ap.add_argument("--layers", type=cli_int(1), help="keep only the model's first N layers (smoke runs)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (see below) for a CPU check of the pipeline")
    ap.add_argument("--batch", type=cli_int(1), default=64, help="most sequences per compiled batch")
    ap.add_argument("--batch-tokens", type=cli_int(1), default=131072, help="most prompt slots per batch (memory)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--impl", choices=["auto", "pallas", "xla"], default="auto")
    ap.add_argument("--tp", type=cli_int(1), default=1, help="tensor-parallel devices (the weights split over them)")
    ap.add_argument("--seed", type=cli_int(0), default=0, help="RULER and needle prompts")
    ap.add_argument("--out", type=Path, help="JSON (default: bench/results/quality-<model>[-smoke].json); the PNGs "
                                             "go beside it as <stem>-<task>.png")
    ap.add_argument("--append", action="store_true",
                    help="resume: keep the rows already in --out, skip those whose settings match")
    ap.add_argument("--deadline", type=float,
                    help="seconds from start: no (policy, task) starts that its task's last measured time says "
                         "would end past it (15 s kept for writing); the run then stops cleanly")
    ap.add_argument("--no-plots", action="store_true", help="JSON only (plot later with --plot-only)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNGs of --out and print its table")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="merge the rows of these grid JSONs into --out (later files win), recompute the RULER "
                         "calibration and the ratios to the full cache, and stop")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (one line per row still)")
    ap.add_argument("--commit", help="the commit to record where the machine's git history is missing or stale")
    ap.add_argument("--workers", type=cli_int(1), default=1,
                    help="policies evaluated at once, each in its own process (compiling dominates a small "
                         "model's grid, and compiles run in parallel). For many-core CPU hosts: on one GPU without "
                         "MPS the processes time-slice the device (measured on the H200, 11 workers: 100-330 s per "
                         "row, where one process alone compiled a policy's programs in 45-74 s; 12 workers ran "
                         "out of device memory while autotuning, 8 fit)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a --workers child: its policies only
    return ap


# Options a worker process gets from the parent itself, not from the parent's command line.
_PARENT_ONLY = {"--workers": 1, "--policies": None, "--families": None, "--fractions": None,
                "--token-budgets": None, "--out": 1, "--deadline": 1, "--append": 0, "--no-plots": 0, "--quiet": 0}


def _worker_argv(argv: list[str]) -> list[str]:
    """The parent's options minus those in `_PARENT_ONLY` (None: every value up to the next option)."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag not in _PARENT_ONLY:
            out.append(argv[i])
            i += 1
            continue
        take = _PARENT_ONLY[flag]
        i += 1
        if "=" in argv[i - 1]:
            continue
        if take is None:
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
        else:
            i += take
    return out


def _run_workers(argv: list[str], names: list[str], rows: dict, out: Path, started: float, deadline: float | None,
                 workers: int, write) -> list[str]:
    """Evaluate the policies of `names` in `workers` processes at once (`pyrajax eval grid --policies <share>
    --append`), process j taking names[j::workers]: a process pays its start (imports, model load, task data,
    the full cache's chat programs; a third or more of what one policy costs) once for its share, and a run
    stopped by the deadline has finished the first policies of `names` (the most wanted) first. Each starts
    from a copy of `out` (the full cache's chat answers are reused where they are already there; else a worker
    generates them with the same full-cache programs its floored chat requests compile anyway) and its rows
    are merged back as it ends; calibration by the full cache's RULER cells happens at the merge. Each process
    gets the deadline and starts no row that would end past it. Returns the policies not started: all of them
    when less than 30 s of the deadline is left."""
    left = None if deadline is None else deadline - (time.monotonic() - started)
    if left is not None and left < 30:
        print(f"deadline: {len(names)} policies not started: {' '.join(names)}", flush=True)
        return list(names)
    tmp = out.parent / f".{out.stem}-workers"
    tmp.mkdir(exist_ok=True)
    write()  # the rows so far, for the workers to start from
    base = [sys.executable, "-m", "pyrajax.eval", "grid", *_worker_argv(argv), "--append", "--no-plots", "--quiet",
            "--worker"] + ([] if left is None else ["--deadline", str(left)])
    env = dict(os.environ)  # holds grid_main's XLA_PYTHON_CLIENT_MEM_FRACTION: each process's share of the device
    running = {}
    for j in range(min(workers, len(names))):
        mine = tuple(names[j::workers])
        path = tmp / f"{j}-{abs(hash(mine))}.json"
        path.write_text(out.read_text())
        log = open(path.with_suffix(".log"), "w")
        running[mine] = (subprocess.Popen(base + ["--policies", *mine, "--out", str(path)], stdout=log,
                                          stderr=subprocess.STDOUT, env=env), path, log, time.monotonic())
    while running:
        time.sleep(2.0)
        for mine, (proc, path, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[mine]
            got = [r for r in json.loads(path.read_text())["rows"] if r["policy"] in mine] if path.exists() else []
            for r in got:
                rows.pop((r["policy"], r["task"]), None)
                rows[(r["policy"], r["task"])] = r
            print(f"[worker {' '.join(mine)}] exit {proc.returncode}, {len(got)} rows, {time.monotonic() - t0:.0f} s"
                  + ("" if proc.returncode == 0 else f": see {path.with_suffix('.log')}"), flush=True)
            write()
    return []


def _too_late(rows: dict, task: str, started: float, deadline: float | None, margin: float = 15.0) -> bool:
    """Whether a `task` row started now would end past `deadline` seconds after `started`, judged by the last
    measured row of that task (any policy: each compiles its own programs, so times are alike; none yet: 0 s),
    plus a margin for writing the results."""
    past = [r["seconds"] for r in rows.values() if r["task"] == task and "seconds" in r]
    return bool(deadline and time.monotonic() - started + 1.1 * (past[-1] if past else 0.0) + margin > deadline)


def _write(out: Path, env: dict, rows: dict, threshold: float) -> None:
    _refresh(rows, threshold)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(env=env, rows=list(rows.values())), indent=1))
    tmp.replace(out)  # atomic: a run killed mid-write keeps the previous file


def grid_main(argv: list[str] | None = None) -> int:
    import pyrajax
    from checkpoints_convert.embedded import default_model_dir
    from pyrajax.tasks.chat import chat_prompts
    from pyrajax.tasks.ruler import RULER_TASKS

    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = grid_parser().parse_args(argv)
    for k, v in (SMOKE if args.smoke else GRID_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    path = Path(args.checkpoint or default_model_dir())
    out = args.out or Path("bench/results") / f"quality-{path.name}{'-smoke' if args.smoke else ''}.json"
    if args.merge:  # rows of other grid JSONs (e.g. an interrupted run's worker files), the later file winning
        old = json.loads(out.read_text()) if out.exists() else dict(env={}, rows=[])
        rows = {(r["policy"], r["task"]): r for r in old["rows"]}
        for f in args.merge:
            rows.update({(r["policy"], r["task"]): r for r in json.loads(Path(f).read_text())["rows"]})
        _write(out, old["env"], rows, args.ruler_calibration)
        print(grid_table(list(rows.values())))
        print(f"wrote {out}")
        return 0
    if args.plot_only:
        rows = json.loads(out.read_text())["rows"]
        print("wrote", *map(str, plot_grid(rows, out)))
        print(grid_table(rows))
        return 0
    if args.workers > 1:  # this process holds the device too: leave room for the workers (read at backend start)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / (args.workers + 1):.3f}")
        # Allocated as needed, up to that share: 4 and 13 processes each preallocating their share at once
        # ran out of device memory loading the weights (H200, fa8e293).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(
        args.dtype, jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    params, cfg = pyrajax.load(path, dtype=dtype, mesh=pyrajax.make_mesh(tp=args.tp) if args.tp > 1 else None)
    if args.layers:  # the first layers alone: a small model with the real embeddings and tokenizer
        params = dataclasses.replace(params, layers=params.layers[:args.layers])
        cfg = dataclasses.replace(cfg, num_layers=len(params.layers))
    tok = get_tokenizer(cfg)
    if tok is None:
        print(f"pyrajax eval grid: error: {path} has no tokenizer", file=sys.stderr)
        return 2
    chosen = args.policies or grid_policies(args.families, args.fractions, args.token_budgets)
    names = list(dict.fromkeys(([] if args.worker else ["full"]) + chosen))
    try:
        tasks = _row_tasks(args)
        for name in names:
            as_policy(name)
    except ValueError as e:
        print(f"pyrajax eval grid: error: {e}", file=sys.stderr)
        return 2
    data: dict = dict(model=path.name, layers=cfg.num_layers, dtype=jnp.dtype(dtype).name,
                      ruler_tasks=args.ruler_tasks or list(RULER_TASKS), chat=chat_prompts()[:args.chat_n],
                      ppl_source={}, ppl_ids={})
    for task in args.tasks:  # token ids of the perplexity texts, tokenized once
        if task in ("ppl", "ppl-long"):
            src = args.text if task == "ppl" else args.essays
            text = (src.read_text() if task == "ppl" else
                    "\n\n".join(f.read_text().strip() for f in sorted(Path(src).glob("*.txt"))))
            if not text:
                raise FileNotFoundError(f"no text for {task} in {src}")
            data["ppl_ids"][src.name] = np.array(tok(text, add_special_tokens=False)["input_ids"], np.int32)
            for n in (args.ppl_lengths if task == "ppl" else args.ppl_long_lengths):
                data["ppl_source"][f"ppl-{n}"] = dict(name=src.name, tokens=len(data["ppl_ids"][src.name]))

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    run = dict(env_info(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), settings=settings, checkpoint=str(path))
    if args.commit:
        run.update(commit=args.commit, dirty=None)
    rows: dict = {}
    env = dict(run, model=dataclasses.asdict(cfg), runs=[])
    if args.append and out.exists():
        old = json.loads(out.read_text())
        env["runs"] = old["env"].get("runs", [])
        rows = {(r["policy"], r["task"]): r for r in old["rows"]}
    env["runs"].append({k: run[k] for k in ("started", "device", "commit", "dirty", "settings")})
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"model: {path} ({cfg.num_layers} layers, {data['dtype']}, {jax.default_backend()}); "
          f"{len(names)} policies x {len(tasks)} tasks -> {out}")

    left, stopped = 0, False
    if args.workers > 1:  # every policy with a row to (re)do in a worker process, full first among them
        todo = lambda n: any(rows.get((n, t), {}).get("settings") != _task_settings(t, args, data) for t in tasks)
        rest, names = [n for n in names if todo(n)], []
    for name in names:
        for task in tasks:
            settings = _task_settings(task, args, data)
            old = rows.get((name, task))
            if old is not None and old.get("settings") == settings:
                continue
            if stopped:
                left += 1
                continue
            _grid_data(task, args, data, tok)
            if _too_late(rows, task, started, args.deadline):
                stopped, left = True, left + 1
                continue
            t0 = time.monotonic()
            row = _grid_row(task, name, params, cfg, args, data, rows)
            row.update(settings=settings, seconds=time.monotonic() - t0)
            rows.pop((name, task), None)  # a replaced row moves to the end: the latest estimate for its task
            rows[(name, task)] = row
            env["complete"] = False
            _write(out, env, rows, args.ruler_calibration)
            print(f"[{name} {task}] {row.get('score', float('nan')):.3f} at KV {row.get('kv_fraction', 1):.3f}, "
                  f"{row['seconds']:.1f} s", flush=True)
    if args.workers > 1 and not stopped:
        not_started = _run_workers(argv, rest, rows, out, started, args.deadline, args.workers,
                                   lambda: _write(out, env, rows, args.ruler_calibration))
        stopped, left = bool(not_started), len(not_started) * len(tasks)
    env["complete"] = not stopped
    _write(out, env, rows, args.ruler_calibration)
    pngs = [] if args.no_plots else plot_grid(list(rows.values()), out)
    print(grid_table(list(rows.values())))
    print(f"wrote {out}" + "".join(f", {p.name}" for p in pngs))
    if stopped:
        print(f"stopped at the deadline with {left} (policy, task) rows left: rerun with --append to go on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
