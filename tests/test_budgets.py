"""Budgets users can set: fraction and token budgets, the floor, protected spans, chat prompts and appending to
a compressed cache (`extend`, generate's `suffixes`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pyrajax
from pyrajax import cache as kvc
from pyrajax.cache import FAMILIES, cache_preset
from pyrajax.generate import GenerationConfig, bucket, extend, generate, prefill
from pyrajax.prompts import chat_prompt
from pyrajax.tasks.chat import chat_prompts


@pytest.fixture(scope="module")
def tiny():
    cfg = pyrajax.preset("tiny")
    return pyrajax.random_params(jax.random.key(3), cfg, scale=0.25), cfg


# ---------------------------------------------------------------------------------------------------------
# Token budgets

@pytest.mark.parametrize("L", [30, 32])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_budget_capacities(family, L):
    for B in (128, 256, 512, 1024):
        policy = cache_preset(f"{family}-{B}")
        for S, T in ((512, 256), (2048, 256), (100, 64)):
            pre, cap, _, budget = kvc.layer_lengths(policy, S, T, L)
            full = S + T
            lo = kvc.smallest_cache(policy, S, kvc.protected_outside(policy, S))
            if policy.adaptive:  # every head allocated the ceiling's slots: the capacity is above the budget
                assert all(b <= c for b, c in zip(budget, cap))
                cap = list(budget)
            assert tuple(budget) == tuple(cap) and all(a >= b for a, b in zip(cap, cap[1:])), cap
            assert all(min(lo, full) <= c <= full for c in cap)
            if full <= lo:  # fits under the floor: never compressed
                assert cap == [full] * L and pre == [S] * L
                continue
            shared = cap[1:] if policy.layer0_holds_prompt else cap
            # the layers share B * L tokens (layer 0 of PyramidInfer holds the whole prompt + one block)
            if min(shared) > lo and max(shared) < full:
                assert sum(cap) <= B * L, (sum(cap), B * L)
            if policy.budget_profile == "uniform":
                assert len(set(shared)) == 1
            # a layer whose budget covers the request is not compressed there
            for p, c in zip(pre, cap):
                assert (p == S) if c >= full else (p + policy.gen_block <= c)
            plan = kvc.make_plan(policy, S, T, L)
            assert all(c <= C for c, C in zip(cap, plan.capacity)) and all(p <= P for p, P in zip(pre, plan.prefill))


def test_token_budget_window_cap_and_minimum():
    p = cache_preset("budget-128")
    assert p.window_cap == 32 and kvc.window_size(p, 4096) == 32 and p.floor_tokens == 128
    assert kvc.window_size(cache_preset("budget-0.45"), 4096) == 1 + int(0.2 * 4096)
    with pytest.raises(ValueError, match=r"use a budget >= 90"):
        cache_preset("h2o-32")
    with pytest.raises(ValueError, match="must be >= 16 when a token budget"):
        cache_preset("h2o-1")


def test_measured_fraction_exceeds_the_budget_only_for_short_requests(tiny):
    params, cfg = tiny
    short = generate(params, [list(range(3, 40))], GenerationConfig(model=cfg, max_new_tokens=20, cache="budget-0.3",
                                                                    stop_ids=()))
    assert not short.stats["compressed"] and short.stats["kv_fraction"] == 1.0
    long = generate(params, [list(range(1, 250)) * 2], GenerationConfig(model=cfg, max_new_tokens=64,
                                                                         cache="h2o-0.3", stop_ids=()))
    assert long.stats["compressed"] and long.stats["kv_fraction"] <= 0.5


# ---------------------------------------------------------------------------------------------------------
# The floor: requests that fit under it are the full cache's, token for token

def test_floor_gives_the_full_caches_answers_on_smollm2(smol):
    params, cfg = smol
    convs = chat_prompts()[:8]
    full = generate(params, convs, GenerationConfig(model=cfg, max_new_tokens=24))
    for spec in ("budget-0.45", "h2o-0.25", "snapkv-512", "streaming-128", "pyramidkv-0.6"):
        r = generate(params, convs, GenerationConfig(model=cfg, max_new_tokens=24, cache=spec))
        assert r.tokens == full.tokens, spec
        assert not r.stats["compressed"]


# ---------------------------------------------------------------------------------------------------------
# Protected spans from chat templates

def test_chat_protect_mask(smol):
    _, cfg = smol
    tok = pyrajax.get_tokenizer(cfg)
    msgs = [{"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Tell me a long story about a cat " * 20},
            {"role": "assistant", "content": "Once upon a time " * 10},
            {"role": "user", "content": "Now summarise it in one line, please, and end with the word fin."}]
    ids, mask = chat_prompt(tok, msgs, last_turn=64)
    assert ids == list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    text_of = lambda m: tok.decode([t for t, k in zip(ids, m) if k])
    kept = text_of(mask)
    assert "Answer in French." in kept and "end with the word fin." in kept and kept.endswith("assistant\n")
    assert "story about a cat" not in kept and "Once upon a time" not in kept  # earlier turns: not protected
    assert all(mask[i] for i, t in enumerate(ids) if t in tok.all_special_ids)
    # the template's default system prompt (no system message given) is protected too
    ids, mask = chat_prompt(tok, msgs[1:2], last_turn=8)
    assert "You are a helpful AI assistant" in text_of(mask) and text_of(mask).count("cat") == 1  # last 8 only


def test_bad_chat_and_protect_input(tiny, smol):
    params, cfg = tiny
    g = GenerationConfig(model=cfg, max_new_tokens=4)
    with pytest.raises(ValueError, match="no chat template"):
        generate(params, [[{"role": "user", "content": "hi"}]], g)
    with pytest.raises(ValueError, match=r"protect\[0\] must be a boolean mask of the prompt's 3 tokens"):
        generate(params, [[1, 2, 3]], g, protect=[np.ones(4, bool)])
    with pytest.raises(ValueError, match="protect has 2 entries for 1 prompts"):
        generate(params, [[1, 2, 3]], g, protect=[None, None])
    sp, sc = smol
    gs = GenerationConfig(model=sc, max_new_tokens=4)
    with pytest.raises(ValueError, match="message 0"):
        generate(sp, [[{"role": "wizard", "content": "hi"}]], gs)
    with pytest.raises(ValueError, match="must end with a user message"):
        generate(sp, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]], gs)


def test_protected_tokens_survive_generation(tiny):
    """An explicit mask over a long prompt: every protected position stays in every layer to the end."""
    params, cfg = tiny
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, 256, 299).tolist()
    mask = np.zeros(300, bool)
    mask[[5, 17, 60, 61, 62, 150, 200]] = True
    policy = cache_preset("budget-0.3:min_tokens=0,protect_tail=0")
    plan = kvc.make_plan(policy, 512, 128, cfg.num_layers, requests=((300, 120, 7),))
    seq = kvc.make_seq_plan(plan, [300], 120, [mask])
    toks = np.zeros((1, 512), np.int32)
    toks[0, :300] = prompt
    _, cache = prefill(params, toks, seq, plan, cfg, "xla")
    _, _, cache = extend(params, cache, jnp.asarray(rng.integers(3, 256, (1, 119)), jnp.int32), plan, cfg, "xla")
    for lc in cache.layers:
        held = set(np.asarray(lc.pos[0]).tolist()) - {-1}
        assert set(np.flatnonzero(mask).tolist()) <= held
    assert len(held) < 200  # the deepest layer is compressed well below the 419 tokens seen


# ---------------------------------------------------------------------------------------------------------
# Appending to a cache

def test_extend_on_the_full_cache_equals_one_prefill(tiny):
    params, cfg = tiny
    rng = np.random.default_rng(1)
    prompt, more = rng.integers(3, 256, 37).tolist(), rng.integers(3, 256, 21).tolist()
    full = kvc.PyramidConfig.full()
    plan = kvc.make_plan(full, 64, 32, cfg.num_layers)
    seq = kvc.make_seq_plan(plan, [37], 32)
    toks = np.zeros((1, 64), np.int32)
    toks[0, :37] = prompt
    _, cache = prefill(params, toks, seq, plan, cfg, "xla")
    last, nll, _ = extend(params, cache, jnp.asarray([more], jnp.int32), plan, cfg, "xla",
                          targets=jnp.asarray([more[1:] + [7]], jnp.int32))
    ref = np.asarray(pyrajax.logits(params, [prompt + more], cfg), np.float64)[0]
    np.testing.assert_allclose(np.asarray(last)[0], ref[-1], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    logp = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    want = -logp[37:-1][np.arange(20), more[1:]]
    np.testing.assert_allclose(np.asarray(nll)[0, :20], want, rtol=1e-5)


def test_suffixes_on_the_full_cache_equal_one_prompt(tiny):
    params, cfg = tiny
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 256, n).tolist() for n in (40, 75, 9)]
    suffixes = [rng.integers(3, 256, n).tolist() for n in (5, 0, 12)]
    g = GenerationConfig(model=cfg, max_new_tokens=20, stop_ids=())
    split = generate(params, prompts, g, suffixes=suffixes)
    joined = generate(params, [p + s for p, s in zip(prompts, suffixes)], g)
    assert split.tokens == joined.tokens and all(len(t) == 20 for t in split.tokens)
    gs = GenerationConfig(model=cfg, max_new_tokens=20, stop_ids=(), temperature=0.8, seed=4)
    assert generate(params, prompts, gs, suffixes=suffixes).tokens == generate(
        params, [p + s for p, s in zip(prompts, suffixes)], gs).tokens


@pytest.mark.parametrize("spec", ["budget-0.4:min_tokens=0", "h2o-96:min_tokens=0", "snapkv-0.5:min_tokens=0,protect_tail=8"])
def test_ragged_batch_invariance_with_masks_and_suffixes(tiny, spec):
    params, cfg = tiny
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 256, n).tolist() for n in (180, 61, 130)]
    masks = [rng.random(n) < 0.1 for n in (180, 61, 130)]
    masks[1] = None
    suffixes = [rng.integers(3, 256, n).tolist() for n in (7, 0, 30)]
    g = GenerationConfig(model=cfg, max_new_tokens=40, cache=spec, stop_ids=())
    batch = generate(params, prompts, g, protect=masks, suffixes=suffixes)
    assert batch.stats["compressed"]
    for i in range(3):
        alone = generate(params, [prompts[i]], g, protect=[masks[i]], suffixes=[suffixes[i]])
        assert alone.tokens[0] == batch.tokens[i]
        assert alone.stats["lengths_at_end"][0] == batch.stats["lengths_at_end"][i]
