"""Regression tests for the defects reproduced at commit 72a6497 (the correctness issue; scripts in
../shared/repros). Each test names its item; each failed on that commit. Items 4 (atomic checkpoint
overwrite), 5 (per-policy peak memory) and 9 (NaN in empty slots) are in test_checkpoint_io.py,
test_bench.py and test_kernels.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pyrajax
from pyrajax import cache as kvc
from pyrajax.cache import FAMILIES, PyramidConfig, cache_preset
from pyrajax.eval import perplexity
from pyrajax.generate import GenerationConfig, bucket, decode_step, generate, prefill, sample


@pytest.fixture(scope="module")
def tiny():
    cfg = pyrajax.preset("tiny")
    return pyrajax.random_params(jax.random.key(0), cfg), cfg


def run_decode(params, cfg, prompt, new, policy):
    """Prefill one prompt, then decode `new - 1` steps of a fixed token, yielding the cache after each step."""
    S, T = bucket(len(prompt), 16), bucket(new, 16)
    plan = kvc.make_plan(policy, S, T, cfg.num_layers)
    seq = kvc.make_seq_plan(plan, [len(prompt)], new)
    toks = np.zeros((1, S), np.int32)
    toks[0, :len(prompt)] = prompt
    _, cache = jax.jit(prefill, static_argnames=("plan", "cfg", "impl"))(params, toks, seq, plan=plan, cfg=cfg,
                                                                         impl="xla")
    step = jax.jit(decode_step, static_argnames=("plan", "cfg", "impl"))
    for _ in range(new - 1):
        _, cache = step(params, cache, jnp.array([9], jnp.int32), plan=plan, cfg=cfg, impl="xla")
        yield cache


# ---------------------------------------------------------------------------------------------------------
# 1. A bucket's plan covers every prompt length of the bucket ("paper" raised AssertionError on 121 tokens)

@pytest.mark.parametrize("L", [30, 32, 40])
def test_item1_every_prompt_length_fits_its_bucket_plan(L):
    policy = cache_preset("paper")
    for new in (16, 64, 256):
        for s in range(1, 300):
            plan = kvc.make_plan(policy, bucket(s, 16), bucket(new, 16), L)
            kvc.make_seq_plan(plan, [s], new)  # raised for s in 115, 120-122, 125-127 (L=30), 125, 245 (L=32)


def test_item1_paper_121_token_prompt_on_smollm2(smol):
    params, cfg = smol
    tok = pyrajax.get_tokenizer(cfg)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 20)[:121]
    r = generate(params, [ids], GenerationConfig(model=cfg, max_new_tokens=16, cache="paper", stop_ids=()))
    assert len(r.tokens[0]) == 16


# ---------------------------------------------------------------------------------------------------------
# 2. Eviction never frees a non-candidate (sinks, window), and length counts what was really freed

def test_item2_evict_with_fewer_candidates_than_the_block():
    pos = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7]], jnp.int32)
    lc = kvc.LayerCache(k=jnp.zeros((1, 1, 8, 2)), v=jnp.zeros((1, 1, 8, 2)), pos=pos, length=jnp.array([8]),
                        rows=None)
    candidate = (pos >= 4) & (pos <= 5)  # two candidates, a block of four
    new_pos, length = kvc.evict(lc, pos.astype(jnp.float32), candidate, jnp.array([True]), 4)
    assert np.asarray(new_pos).tolist() == [[0, 1, 2, 3, -1, -1, 6, 7]] and int(length[0]) == 6
    new_pos, length = kvc.evict(lc, pos.astype(jnp.float32), candidate, jnp.array([False]), 4)
    assert np.asarray(new_pos).tolist() == pos.tolist() and int(length[0]) == 8


@pytest.mark.parametrize("spec,prompt_len,new", [("budget-0.8:min_tokens=0", 3, 40),
                                                 ("budget-0.45:num_sinks=32,min_tokens=0", 20, 200)])
def test_item2_sinks_survive_generation(tiny, spec, prompt_len, new):
    params, cfg = tiny
    policy = cache_preset(spec)
    prompt = list(range(3, 3 + prompt_len))
    evicted = False
    for t, cache in enumerate(run_decode(params, cfg, prompt, new, policy)):
        p = prompt_len + t  # the position just written
        for lc in cache.layers:
            held = np.asarray(lc.pos[0])
            held = set(held[held >= 0].tolist())
            assert int(lc.length[0]) == len(held), "length must count the valid slots"
            assert set(range(min(policy.num_sinks, p + 1))) <= held, f"a sink was evicted at position {p}"
            evicted |= len(held) < p + 1
    assert evicted, "nothing was evicted: the test would be vacuous"


# ---------------------------------------------------------------------------------------------------------
# 3. A policy whose prefill can cache more than its budget is refused; no preset drops prompt tokens

@pytest.mark.parametrize("kw", [dict(prefill_schedule="none", gen_rule="budget", budget=0.5, prune_hidden=False),
                                dict(prefill_schedule="cosine", gen_rule="budget", budget=0.3)])
def test_item3_prefill_that_overflows_the_budget_is_refused(kw):
    with pytest.raises(ValueError, match="needs prefill_schedule='budget'"):
        PyramidConfig(**kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_item3_prefill_keep_fits_every_layer(family):
    for budget in ("0.3", "0.45", "0.9", "128", "512"):
        policy = cache_preset(f"{family}-{budget}:min_tokens=0")
        for s in (1, 5, 37, 100, 511, 1000):
            for t in (1, 16, 256):
                pre, cap, _, budget_l = kvc.layer_lengths(policy, s, t, 30)
                assert all(p <= c for p, c in zip(pre, cap)), (policy.name, s, t)
                # a layer either holds the whole request or has a block of room before its first eviction
                assert all(c >= s + t or p + policy.gen_block <= c for p, c in zip(pre, cap)), (policy.name, s, t)


# ---------------------------------------------------------------------------------------------------------
# 6. Perplexity: the first scored token is predicted from the policy's cache too

def test_item6_first_scored_token_uses_the_policys_cache(tiny):
    params, cfg = tiny
    ids = np.random.default_rng(0).integers(3, 256, 2 * 65).astype(np.int32)
    # One scored token per chunk: on 72a6497 its loss equalled the full cache's for every trimming family.
    full = perplexity(params, cfg, ids, "full", 64, 1, progress=False)
    for spec in ("streaming-0.3", "snapkv-0.3", "h2o-0.3"):
        spec += ":min_tokens=0,gen_block=4,recent_ratio=0.1,protect_tail=0"
        r = perplexity(params, cfg, ids, spec, 64, 1, progress=False)
        assert r["kv_fraction"] < 0.5
        assert not np.allclose(r["chunk_nll"], full["chunk_nll"], rtol=1e-6, atol=0), spec


# ---------------------------------------------------------------------------------------------------------
# 7. Short requests run (uncompressed where they fit); one short request does not fail its batch

@pytest.mark.parametrize("spec", ["budget-0.45", "snapkv-0.45", "budget-0.9", "budget-0.45:min_tokens=0",
                                  "h2o-0.9:min_tokens=0"])
def test_item7_short_requests_run(tiny, spec):
    params, cfg = tiny
    for prompt_len, new in [(5, 8), (20, 16), (60, 4)]:
        prompt = list(range(3, 3 + prompt_len))
        g = GenerationConfig(model=cfg, max_new_tokens=new, cache=spec, stop_ids=())
        got = generate(params, [prompt], g)
        assert len(got.tokens[0]) == new
        if "min_tokens" not in spec:  # under the default floor: exactly the full cache
            full = generate(params, [prompt], GenerationConfig(model=cfg, max_new_tokens=new, stop_ids=()))
            assert got.tokens == full.tokens and not got.stats["compressed"]


def test_item7_mixed_batch_equals_each_alone(tiny):
    params, cfg = tiny
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 256, n - 1).tolist() for n in (90, 25)]
    for spec in ("budget-0.6:min_tokens=0", "paper", "h2o-0.7:num_sinks=0,min_tokens=0"):
        g = GenerationConfig(model=cfg, max_new_tokens=50, cache=spec, stop_ids=())
        both = generate(params, prompts, g)
        for p, toks, lengths in zip(prompts, both.tokens, both.stats["lengths_at_end"]):
            alone = generate(params, [p], g)
            assert alone.tokens[0] == toks and alone.stats["lengths_at_end"][0] == lengths


def test_item7_errors_name_the_request():
    plan = kvc.make_plan(cache_preset("budget-0.45"), 64, 16, 4)
    with pytest.raises(ValueError, match=r"request 1 \(100-token prompt"):
        kvc.make_seq_plan(plan, [10, 100], 16)


# ---------------------------------------------------------------------------------------------------------
# 8. Top-p keeps the smallest set whose mass reaches top_p, ties included (top-k keeps ties, as HF)

def support(logits, top_p, top_k=0, n=3000):
    """Empirical distribution of n draws: n rows of the same logits and seed, one step each."""
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    draw = jax.jit(sample)(rows, jnp.full((n,), 3, jnp.uint32), jnp.arange(n), jnp.float32(1.0),
                           jnp.float32(top_p), top_k)
    return np.bincount(np.asarray(draw), minlength=len(logits)) / n


def test_item8_top_p_ties():
    s = support([0., 0., 0., 0.], 0.5)
    assert (s > 0).sum() == 2 and abs(s[0] - 0.5) < 0.05  # two tokens reach 0.5: lowest ids first
    s = support([2., 1., 1., 1., 1., 0.], 0.6)  # masses .384, .141 x4, .052: three tokens reach 0.6
    assert (s > 0).tolist() == [True, True, True, False, False, False]
    s = support([3., 3., 1., 0.], 1.0, top_k=1)  # top-k keeps every logit tied with the k-th
    assert (s > 0).tolist() == [True, True, False, False]


# ---------------------------------------------------------------------------------------------------------
# 10. A sampled sequence depends on its seed only: not its row, its companions, or JAX's PRNG flags

def test_item10_sampling_is_per_sequence(tiny):
    params, cfg = tiny
    p, q, r = [1, 10, 20, 30], [1, 40, 50], [1, 60, 70, 80, 90]
    g = GenerationConfig(model=cfg, max_new_tokens=12, temperature=1.0, seed=5, stop_ids=())
    alone = generate(params, [p], g).tokens[0]
    assert generate(params, [p, q], g).tokens[0] == alone
    assert generate(params, [q, r, p], g).tokens[2] == alone
    assert generate(params, [p, p], g).tokens == [alone, alone]
    old = jax.config.jax_threefry_partitionable
    try:
        jax.config.update("jax_threefry_partitionable", not old)
        assert generate(params, [q, p], g).tokens[1] == alone
    finally:
        jax.config.update("jax_threefry_partitionable", old)
    other = generate(params, [p], GenerationConfig(model=cfg, max_new_tokens=12, temperature=1.0, seed=6,
                                                    stop_ids=())).tokens[0]
    assert other != alone


# ---------------------------------------------------------------------------------------------------------
# 11. Filler rows do not prolong decoding; top_k larger than the vocabulary is refused up front

def test_item11_filler_rows_do_not_prolong_decoding(tiny):
    params, cfg = tiny
    stop = tuple(range(0, 256, 10))
    prompts = [[1, 10, 20], [1, 30, 40], [1, 50, 60]]  # batch bucket 4: row 3 is filler
    for seed in range(3):
        r = generate(params, prompts, GenerationConfig(model=cfg, max_new_tokens=64, temperature=1.0, seed=seed,
                                                       stop_ids=stop))
        steps = r.stats["lengths_at_end"][0][0] - len(prompts[0])  # full cache: one slot per decode step
        assert steps == min(max(len(t) for t in r.tokens), 63)


def test_item11_top_k_above_vocab_is_refused(tiny):
    _, cfg = tiny
    with pytest.raises(ValueError, match="top_k=1000 exceeds the vocabulary"):
        GenerationConfig(model=cfg, max_new_tokens=4, temperature=1.0, top_k=1000)
