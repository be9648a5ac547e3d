"""Prefill, decode step, sampling, the three compiled programs and the public `generate`.

The programs (prefill of a batch of requests, insert into decode slots, decode of k steps for all slots) are
the only way tokens are generated: `generate` runs them through `pyrajax.engine.Engine` to completion over
one batch, the server runs the same engine continuously. One compiled program of each kind serves every request
of a bucket: prompts are right-padded to a length bucket, the batch to a batch bucket, and `max_new_tokens` to a
generation bucket; everything that varies inside a bucket (prompt lengths, per-sequence schedules, sampling
settings, the number of steps) is data.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

try:
    from jax.extend.random import threefry2x32_p
except ImportError:  # older layouts of jax.extend
    from jax._src.prng import threefry2x32_p

from pyrajax import cache as kvc
from pyrajax import sharding as shd
from pyrajax import validate
from pyrajax.cache import CachePlan, KVCache, LayerCache, PyramidConfig, SeqPlan
from pyrajax.config import ModelConfig
from pyrajax.model import (embed, finish_layer, forward, lm_logits, prefill_attention, prefill_attention_path, qkv,
                           queries)
from pyrajax.params import Params, check_params
from pyrajax.prompts import prepare, to_ids

# How many times each program was traced (= compiled); tests use it to prove one compilation per bucket.
TRACE_COUNTS: Counter = Counter()


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    model: ModelConfig
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] | None = None  # None = the model's EOS ids
    cache: str | PyramidConfig = "full"
    impl: str = "auto"  # kernels: "pallas", "xla" or "auto" (Pallas on GPU)
    tokenizer: Any = None  # a transformers tokenizer or a directory; None = the checkpoint's, if any
    # Decode steps per device call. None: the whole generation in one call. The host reads tokens between calls,
    # and each call cost about 7 ms at 7B batch 32 on the H200 (1 ms a step in chunks of 8): offline, nothing
    # waits for a token early. Outputs never depend on it (tests/test_engine.py).
    decode_chunk: int | None = None

    def __post_init__(self):
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model must be a ModelConfig (pyrajax.preset(name), or the config pyrajax.load "
                             f"returns), got {validate.describe(self.model)}")
        V = self.model.vocab_size
        temperature, top_k, top_p = validate.sampling(self.temperature, self.top_k, self.top_p, V)
        checked = dict(max_new_tokens=validate.integer(self.max_new_tokens, "max_new_tokens", 1),
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=validate.seed(self.seed),
                       stop_ids=validate.stop_ids(self.stop_ids, V),
                       decode_chunk=None if self.decode_chunk is None
                       else validate.integer(self.decode_chunk, "decode_chunk", 1))
        for field, value in checked.items():
            object.__setattr__(self, field, value)
        if self.impl not in validate.IMPLS:
            raise ValueError(f"impl must be 'auto', 'pallas' or 'xla', got {self.impl!r}")
        validate.tokenizer(self.tokenizer)
        if not isinstance(self.cache, (str, PyramidConfig)):
            raise ValueError(f"cache must be a preset name (e.g. 'full', 'budget-0.45') or a PyramidConfig, got "
                             f"{validate.describe(self.cache)}")
        object.__setattr__(self, "policy", self.cache if isinstance(self.cache, PyramidConfig)
                           else kvc.cache_preset(self.cache))


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]
    texts: list[str] | None
    stats: dict


# ---------------------------------------------------------------------------------------------------------
# Buckets

def bucket(n: int, minimum: int) -> int:
    """Next power of two >= n (at least `minimum`); above 1024, the next multiple of 512."""
    if n > 1024:
        return -(-n // 512) * 512
    b = minimum
    while b < n:
        b *= 2
    return b


# ---------------------------------------------------------------------------------------------------------
# Prefill

def _to_cache_layout(x: jax.Array, capacity: int, fill, axis: int = 1) -> jax.Array:
    """n slots along `axis` -> `capacity` slots: padded, or cut where the bucketed prefill slots exceed the
    capacity (valid tokens come first and never exceed it)."""
    axis = axis % x.ndim
    x = jax.lax.slice_in_dim(x, 0, min(capacity, x.shape[axis]), axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, capacity - x.shape[axis])
    return jnp.pad(x, pad, constant_values=fill)


def _window_queries(lp, x, pos, length, W: int, cfg: ModelConfig):
    """Queries of the last W valid tokens ([B, W, H, hd]) and their positions ([B, W], -1 where a sequence has
    fewer than W tokens). Recomputed from the layer input rather than sliced from the layer's q, so that q
    keeps a single consumer: the layer then compiles exactly as without pruning, and a policy that keeps
    everything reproduces the full cache bit for bit."""
    idx = length[:, None] - W + jnp.arange(W)[None, :]
    safe = jnp.maximum(idx, 0)
    win_pos = jnp.where(idx >= 0, jnp.take_along_axis(pos, safe, axis=1), -1)
    return queries(lp, jnp.take_along_axis(x, safe[:, :, None], axis=1), win_pos, cfg), win_pos


def _accumulated_scores(q, k, pos, impl: str, per_head: bool = False, chunk: int = 512, mesh=None):
    """H2O's prefill scores: each key's attention summed over every prompt query: head-averaged [B, n], or per
    KV head its group's max [B, K, n]. Queries go through the score-reduction kernel (per head: the window-rows
    kernel) in chunks, so no [B, H, n, n] is ever materialised whole."""
    total = 0.0
    if per_head:
        for i in range(0, q.shape[1], chunk):
            rows = shd.window_rows(q[:, i:i + chunk], k, pos[:, i:i + chunk], pos, impl=impl, mesh=mesh,
                                   per_head=True)
            total = total + jnp.sum(rows, axis=2)
        return total
    k_heads = k.swapaxes(1, 2)
    for i in range(0, q.shape[1], chunk):
        q_pos = pos[:, i:i + chunk]
        total = total + shd.score_reduction(q[:, i:i + chunk].swapaxes(1, 2), k_heads, q_pos, pos,
                                            (q_pos >= 0).astype(jnp.float32), impl=impl, mesh=mesh)
    return total


def _selection_scores(policy: PyramidConfig, pos, seq: SeqPlan, win_pos, win_rows, accumulated, v):
    """One importance score per token slot under the policy's prefill scorer (higher = keep): [B, n], or per
    KV head [B, K, n]."""
    if policy.scorer == "recency":
        scores = pos.astype(jnp.float32)
        if policy.per_head:  # every head alike
            scores = jnp.broadcast_to(scores[:, None], (pos.shape[0], v.shape[2], pos.shape[1]))
        return scores
    if policy.scorer == "accumulated":
        scores = accumulated
    else:
        weights = kvc.recency_weights(win_pos, seq.prompt_len - 1, seq.window, policy.recency_weight,
                                      policy.observe)
        scores = kvc.window_scores(weights, win_rows, policy.window_reduce)
    if policy.value_weighted:
        scores = scores * kvc.value_norms(v.swapaxes(1, 2), policy.per_head)
    return kvc.pool_scores(scores, policy.pool_kernel)


def _head_keep(policy: PyramidConfig, scores, pos, seq: SeqPlan, l: int):
    """Prompt tokens each KV head of layer l caches after prefill [B, K]: the layer's keep count for every head,
    or (adaptive) AdaKV's split of K times it."""
    B, K, _ = scores.shape
    if policy.adaptive:
        return kvc.adaptive_head_counts(scores, pos, seq, seq.keep[:, l], seq.enter[:, l], policy)
    return jnp.broadcast_to(seq.keep[:, l, None], (B, K))


def _gather_heads(idx, k, v, impl: str):
    """Each KV head's own selection idx [B, K, m] of k and v [B, n, K, hd] -> k, v [B, m, K, hd]: the
    pivotal-gather kernel over (sequence, head) rows."""
    B, n, K, hd = k.shape
    m = idx.shape[-1]
    kv = jnp.concatenate([k, v], axis=-1).swapaxes(1, 2).reshape(B * K, n, 2 * hd)
    rows = shd.gather_hidden(idx.reshape(B * K, m), kv, jnp.zeros((B * K, n), jnp.int32), impl=impl, mesh=None)
    return jnp.split(rows.reshape(B, K, m, 2 * hd).swapaxes(1, 2), 2, axis=-1)


def prefill(params: Params, tokens: jax.Array, seq: SeqPlan, plan: CachePlan, cfg: ModelConfig,
            impl: str = "auto", mesh=None):
    """Run the prompt through every layer, selecting per the plan: with `prune_hidden` the unselected tokens
    stop after the layer (PyramidInfer), otherwise every token goes on and only the layer's cache is cut.
    With `per_head`, each KV head selects its own cache from the tokens that reached the layer; the tokens
    that go deeper are chosen by the max over the heads' scores. Returns (logits of each sequence's last
    prompt token [B, V], the filled KVCache). `mesh`: the params' tensor-parallel mesh (`pyrajax.sharding`;
    None on one device)."""
    B, S = tokens.shape
    policy, W, L = plan.policy, plan.window, plan.num_layers
    per_head = policy.per_head
    if per_head and shd.tp_size(mesh) > 1:
        raise ValueError("per_head cache selection does not run tensor-parallel yet: use tp=1 or per_head=false")
    pos = jnp.where(jnp.arange(S)[None, :] < seq.prompt_len[:, None], jnp.arange(S)[None, :], -1).astype(jnp.int32)
    x = embed(params, tokens)
    # Ring slot of each window row: query position mod W, so decoding can keep overwriting the oldest row.
    ring_src = (jnp.arange(W)[None, :] - (seq.prompt_len[:, None] - W)) % W  # ring slot r <- window row
    row_pos = None
    layers = []
    attention_path = prefill_attention_path(impl, params.embed.dtype, shd.tp_size(mesh) > 1)
    for l, lp in enumerate(params.layers):
        C = plan.capacity[l]
        length = jnp.sum(pos >= 0, axis=1).astype(jnp.int32)
        prune = policy.selects_in_prefill and policy.prune_hidden and l + 1 < L  # what enters layer l + 1
        # what layer l's cache keeps of the tokens that entered it (PyramidInfer: all of them)
        trim = policy.selects_in_prefill and (not policy.prune_hidden or policy.decoupled)
        windowed = policy.keeps_rows or ((prune or trim) and policy.scorer == "window")
        win_pos = win_rows = accumulated = None
        if windowed:
            q_win, win_pos = _window_queries(lp, x, pos, length, W, cfg)
        q, k, v = qkv(lp, x, pos, cfg)
        k, v = shd.by_heads(k, 2, mesh), shd.by_heads(v, 2, mesh)  # the cache's layout (q follows the weights)
        if (policy.scorer == "accumulated" and (prune or trim)) or policy.keeps_accumulated:
            accumulated = _accumulated_scores(q, k, pos, impl, per_head, mesh=mesh)
        x = shd.replicated(finish_layer(lp, x, prefill_attention(q, k, v, pos, attention_path), cfg), mesh)
        if windowed:  # [B, W, n] (per head [B, K, W, n]), never [B, H, W, n]
            win_rows = shd.window_rows(q_win, k, win_pos, pos, impl=impl, mesh=mesh, per_head=per_head)
            if row_pos is None:
                in_window = win_pos >= (seq.prompt_len - seq.window)[:, None]
                row_pos = jnp.take_along_axis(jnp.where(in_window, win_pos, -1), ring_src, axis=1)
        if prune or trim:
            scores = _selection_scores(policy, pos, seq, win_pos, win_rows, accumulated, v)
        rows = None
        if policy.keeps_rows:  # window rows into ring order (the W axis: second to last)
            rows = jnp.take_along_axis(win_rows, ring_src[:, :, None] if not per_head else ring_src[:, None, :, None],
                                       axis=-2)
        acc = accumulated if policy.keeps_accumulated else None
        # what the cache's slots hold: the tokens that entered, per KV head the same for every head
        cache_pos = pos if not per_head else jnp.broadcast_to(pos[:, None], (B, k.shape[2], pos.shape[1]))
        if trim:  # gather the kept tokens' keys, values, positions and scores into the layer's slots
            n = pos.shape[1]
            if per_head:  # each KV head its own tokens
                keep = _head_keep(policy, scores, cache_pos, seq, l)
                idx, cache_pos = kvc.select_pivotal(scores, cache_pos, seq, keep, policy.num_sinks, min(C, n))
                k, v = _gather_heads(idx, k, v, impl)
            else:
                idx, cache_pos = kvc.select_pivotal(scores, pos, seq, seq.keep[:, l], policy.num_sinks, min(C, n))
                k, v = shd.gather_kv(idx, k, v, pos, impl=impl, mesh=mesh)
            kept = cache_pos >= 0
            if rows is not None:
                rows = jnp.where(kept[..., None, :], jnp.take_along_axis(rows, idx[..., None, :], axis=-1), 0.0)
            if acc is not None:
                acc = jnp.where(kept, jnp.take_along_axis(acc, idx, axis=-1), 0.0)
        if rows is not None:
            rows = _to_cache_layout(rows, C, 0.0, axis=-1)
        k_slots, v_slots = (_to_cache_layout(a, C, 0).swapaxes(1, 2) for a in (k, v))
        length = jnp.sum(cache_pos >= 0, axis=-1).astype(jnp.int32)
        # Adaptive head budgets: each head keeps, through generation, the room above its prefill count that
        # the layer's uniform budget leaves (one block when compressed).
        head_budget = length + (seq.budget[:, l] - seq.keep[:, l])[:, None] if policy.adaptive else None
        layers.append(LayerCache(k=k_slots, v=v_slots, pos=_to_cache_layout(cache_pos, C, -1, axis=-1),
                                 length=length, rows=rows, head_budget=head_budget,
                                 acc=None if acc is None else _to_cache_layout(acc, C, 0.0, axis=-1)))
        if prune:  # one set for every head: a token any head needs (the max over the heads' scores) goes on
            shared = jnp.max(scores, axis=1) if per_head else scores
            idx, pos = kvc.select_pivotal(shared, pos, seq, seq.enter[:, l + 1], policy.num_sinks,
                                          plan.prefill[l + 1])
            x = shd.gather_hidden(idx, x, pos, impl=impl, mesh=mesh)
    last = jnp.sum(pos >= 0, axis=1) - 1
    logits = lm_logits(params, jnp.take_along_axis(x, last[:, None, None], axis=1), cfg)[:, 0]
    cache = KVCache(layers=tuple(layers), seq=seq, next_pos=seq.prompt_len.astype(jnp.int32), row_pos=row_pos,
                    compressed_upto=seq.prompt_len.astype(jnp.int32))
    return shd.replicated(logits, mesh), shd.constrain_state(cache, mesh)


# ---------------------------------------------------------------------------------------------------------
# Decode

def _evict(cache: KVCache, plan: CachePlan, p: jax.Array, live: jax.Array) -> tuple[LayerCache, ...]:
    """Generation-phase eviction of every layer, before this step's token is appended anywhere.

    A layer's decision depends only on its own state after the previous step, so deciding every layer up
    front is the same as deciding each just before its append. Up front, one branch serves all layers: the
    candidates, scores and top-k run only on steps where some layer of some sequence triggers (one step in
    `gen_block` under the budget rule), and the GPU waits for one branch predicate per step, not one per
    layer (measured: 32 per-layer branches left the H100 idle 0.3 ms per 7B step).

    Slots that started at different steps trigger on different steps, so with many slots some slot triggers
    on almost every step, and an eviction over the whole batch on each of those steps cost more (measured: 32
    slots, CPU) than the rest of the eviction work. So in larger batches, on steps where at most
    `_eviction_group` rows trigger, only those rows run it (`_on_rows`); where more do (slots in step), the
    whole batch. A sequence's evictions are its own either way."""
    policy, seq, layers = plan.policy, cache.seq, list(cache.layers)
    todo = [l for l in range(plan.num_layers) if policy.gen_rule != "none" and plan.evict[l]]
    if not todo:
        return cache.layers
    if policy.gen_rule == "reference":  # the oldest uncut generated block has left the window: every layer
        trigger = jnp.broadcast_to((cache.compressed_upto + policy.gen_block - 1 <= p - seq.window)[:, None],
                                   (p.shape[0], len(todo)))
    else:  # "budget": the layer is at its budget (per KV head: some head is at its own)
        trigger = jnp.stack([_at_budget(layers[l], seq.budget[:, l]) for l in todo], axis=1)
    trigger = trigger & live[:, None]

    def run(cache, p, trigger):  # on any rows: the batch's, or a group of them
        seq, layers = cache.seq, cache.layers
        scorer = policy.decode_scorer
        if scorer == "window":
            weights = kvc.recency_weights(cache.row_pos, p - 1, seq.window, policy.recency_weight, policy.observe)
        out = []
        for i, l in enumerate(todo):
            lc = layers[l]
            col = lambda x: kvc.per_seq(x, lc.pos)  # noqa: E731  (per sequence, against [B, C] or [B, K, C])
            used = lc.pos >= 0
            if policy.gen_rule == "reference":
                lo = col(cache.compressed_upto)
                candidate = used & (lc.pos >= lo) & (lc.pos < lo + policy.gen_block)
            else:  # anything but sinks, the window and protected prompt tokens may go
                candidate = (used & (lc.pos >= policy.num_sinks) & (lc.pos <= col(p - seq.window))
                             & ~kvc.protected_slots(seq, lc.pos))
            scores = (kvc.window_scores(weights, lc.rows, policy.window_reduce) if scorer == "window"
                      else lc.acc if scorer == "accumulated"
                      else lc.pos.astype(jnp.float32))  # "recency": the oldest go first
            if policy.value_weighted:  # one pass over the values, on eviction steps only
                scores = scores * kvc.value_norms(lc.v, policy.per_head)
            now = trigger[:, i]
            if policy.per_head:  # each head of a triggered layer that is at its own budget (or every head)
                now = (now[:, None] & (lc.length >= _head_budgets(lc, seq.budget[:, l])) if policy.gen_rule == "budget"
                       else jnp.broadcast_to(now[:, None], lc.length.shape))
            out.append(kvc.evict(lc, scores, candidate, now, plan.evict[l]))
        return tuple(out)

    def skip(*_):
        return tuple((layers[l].pos, layers[l].length) for l in todo)

    group = _eviction_group(p.shape[0], policy.gen_block)
    if group < p.shape[0]:  # nothing, the few triggered rows alone, or (many trigger) the whole batch
        n = jnp.sum(jnp.any(trigger, axis=1))
        few = lambda cache, p, trigger: _on_rows(run, cache, todo, p, trigger, group,  # noqa: E731
                                                 keep_values=policy.value_weighted)
        evicted = jax.lax.switch((n > 0).astype(jnp.int32) + (n > group), [skip, few, run], cache, p, trigger)
    else:
        evicted = jax.lax.cond(jnp.any(trigger), run, skip, cache, p, trigger)
    for l, (pos, length) in zip(todo, evicted):
        layers[l] = layers[l].replace(pos=pos, length=length)
    return tuple(layers)


def _head_budgets(lc: LayerCache, budget: jax.Array) -> jax.Array:
    """Each KV head's generation budget [B, K]: its own (adaptive head budgets) or the layer's."""
    return lc.head_budget if lc.head_budget is not None else budget[:, None]


def _at_budget(lc: LayerCache, budget: jax.Array) -> jax.Array:
    """Whether the layer must evict before this step's append [B]: it (per KV head: some head) is at its budget."""
    if lc.length.ndim == 1:
        return lc.length >= budget
    return jnp.any(lc.length >= _head_budgets(lc, budget), axis=-1)


def _eviction_group(batch: int, block: int) -> int:
    """Rows one eviction pass takes when few rows trigger: twice the rows that trigger per step on average when
    every slot is at its own phase (each slot evicts once in `block` steps)."""
    return min(batch, 2 * -(-batch // block))


def _on_rows(run, cache: KVCache, todo: list[int], p, trigger, group: int, keep_values: bool = False):
    """`run` (the eviction of a cache's rows) on the rows that trigger, at most `group` of them: gathers what
    eviction reads of those rows (never the keys, and the values only for value-weighted scores) and scatters
    back the (pos, length) of every layer in `todo`."""
    B = p.shape[0]
    hit = jnp.any(trigger, axis=1)
    rows = jnp.argsort(~hit, stable=True)[:group]  # the triggered rows first
    rows = jnp.where(hit[rows], rows, B)  # B: no row
    safe = jnp.minimum(rows, B - 1)
    light = cache.replace(layers=tuple(lc.replace(k=None, v=lc.v if keep_values else None) for lc in cache.layers))
    got = run(jax.tree.map(lambda x: x[safe], light), p[safe], trigger[safe] & (rows < B)[:, None])
    return tuple((cache.layers[l].pos.at[rows].set(pos, mode="drop"),
                  cache.layers[l].length.at[rows].set(length, mode="drop")) for l, (pos, length) in zip(todo, got))


def decode_step(params: Params, cache: KVCache, token: jax.Array, plan: CachePlan, cfg: ModelConfig,
                impl: str = "auto", live: jax.Array | None = None, mesh=None):
    """One new token per sequence through every layer: (logits [B, V], updated cache). Rows where `live` is
    False (finished sequences) are computed but leave their cache exactly as it was. `mesh`: as `prefill`'s."""
    B = token.shape[0]
    b = jnp.arange(B)
    live = jnp.ones((B,), bool) if live is None else live
    p = cache.next_pos
    x = embed(params, token[:, None])
    evicted = _evict(cache, plan, p, live)
    ring = jnp.where(live, p % plan.window, plan.window)  # the window row this query writes (dropped if not live)
    layers = []
    for l, lp in enumerate(params.layers):
        lc = evicted[l]
        q, k, v = qkv(lp, x, p[:, None], cfg)
        k, v = shd.by_heads(k, 2, mesh), shd.by_heads(v, 2, mesh)
        # Index of each (sequence) or (sequence, KV head) row of the slot arrays: per head, each head writes
        # the new token into its own first empty slot.
        at = (b,) if lc.pos.ndim == 2 else (b[:, None], jnp.arange(lc.pos.shape[1])[None, :])
        # The first empty slot. Capacities guarantee one; were there none, the write is dropped (slot index out
        # of range) rather than landing on slot 0, a sink.
        slot = jnp.argmax(lc.pos < 0, axis=-1)
        room = (lc.pos[at + (slot,)] < 0) & kvc.per_seq(live, slot)
        slot = jnp.where(room, slot, lc.pos.shape[-1])
        new_pos = jnp.broadcast_to(kvc.per_seq(p, slot), slot.shape)
        k_at = (b, slice(None), slot) if lc.pos.ndim == 2 else at + (slot,)
        lc = lc.replace(k=lc.k.at[k_at].set(k[:, 0], mode="drop"), v=lc.v.at[k_at].set(v[:, 0], mode="drop"),
                        pos=lc.pos.at[at + (slot,)].set(new_pos, mode="drop"), length=lc.length + room)
        # Slots past the highest one in use are skipped by the attention kernel.
        in_use = jnp.max(jnp.where(lc.pos >= 0, jnp.arange(lc.pos.shape[-1]) + 1, 0))
        out, prob = shd.decode_attention(q[:, 0], lc.k, lc.v, lc.pos, p, in_use, impl=impl, mesh=mesh)  # prob: pos's shape
        if lc.rows is not None:
            # A reused slot's column still holds the evicted token's attention in older rows. It is never read:
            # the new token stays in the window (not a candidate) for W steps, by which time every ring row
            # has been rewritten by a query that saw it, and rows outside a sequence's window weigh 0.
            lc = lc.replace(rows=lc.rows.at[at + (kvc.per_seq(ring, slot),)].set(prob, mode="drop"))
        if lc.acc is not None:  # the reused slot starts from this query's attention alone
            lc = lc.replace(acc=lc.acc.at[at + (slot,)].set(0.0, mode="drop")
                            + jnp.where(kvc.per_seq(live, prob), prob, 0.0))
        x = shd.replicated(finish_layer(lp, x, out[:, None], cfg), mesh)
        layers.append(lc)
    cache = cache.replace(layers=tuple(layers), next_pos=p + live)
    if cache.row_pos is not None:
        cache = cache.replace(row_pos=cache.row_pos.at[b, ring].set(p, mode="drop"))
    if plan.policy.gen_rule == "reference":
        cut = live & (cache.compressed_upto + plan.policy.gen_block - 1 <= p - cache.seq.window)
        cache = cache.replace(compressed_upto=cache.compressed_upto + jnp.where(cut, plan.policy.gen_block, 0))
    return shd.replicated(lm_logits(params, x, cfg)[:, 0], mesh), shd.constrain_state(cache, mesh)


# ---------------------------------------------------------------------------------------------------------
# Sampling and the compiled programs

def sampling_noise(seeds: jax.Array, steps: jax.Array, vocab: int) -> jax.Array:
    """Gumbel noise [B, V] for each sequence's step: Threefry-2x32 keyed by the sequence's own seed, counting
    (token id, step). It depends on nothing else, neither the row nor the batch nor JAX's PRNG flags (such
    as `jax_threefry_partitionable`, which changes what `jax.random` draws for a given key)."""
    shape = (seeds.shape[0], vocab)
    seed = jnp.broadcast_to(seeds.astype(jnp.uint32)[:, None], shape)
    step = jnp.broadcast_to(steps.astype(jnp.uint32)[:, None], shape)
    token = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.uint32)[None, :], shape)
    bits = threefry2x32_p.bind(seed, jnp.full(shape, 0x5EED, jnp.uint32), token, step)[0]
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1), never 0 or 1
    return -jnp.log(-jnp.log(u))


def sample(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: jax.Array | int = 0) -> jax.Array:
    """One token per row, every setting per row ([B] or a scalar), so requests with different settings share
    one compiled program. temperature 0 is greedy (a bare argmax of the logits). Otherwise: temperature, then
    top-k (0 = off; like HF, every logit tied with the k-th largest stays), then nucleus top-p (1 = off): the
    smallest set of tokens whose probability mass reaches top_p, taken best first, ties in token-id order (so
    exactly that many tokens stay, as in HF), then a Gumbel-max draw with the row's own noise
    (`sampling_noise`). The sampling work runs only on steps where some row samples, the vocabulary sort only
    where some row filters."""
    B, V = logits.shape
    row = lambda a, dtype: jnp.broadcast_to(jnp.asarray(a, dtype), (B,))  # noqa: E731
    temperature, top_p, top_k = row(temperature, jnp.float32), row(top_p, jnp.float32), row(top_k, jnp.int32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def filtered(x):
        order = jnp.argsort(-x, axis=-1, stable=True)  # best first; ties: lower token id first
        ranked = jnp.take_along_axis(x, order, axis=-1)
        kth = jnp.take_along_axis(ranked, jnp.maximum(top_k - 1, 0)[:, None], axis=-1)
        ranked = jnp.where((top_k[:, None] > 0) & (ranked < kth), -jnp.inf, ranked)
        probs = jax.nn.softmax(ranked, axis=-1)
        # mass before < p; top_p = 1 keeps everything (a cumulative sum may round to 1 before the tail)
        keep = (top_p[:, None] >= 1) | (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None])
        keep = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], order].set(keep & (ranked > -jnp.inf))
        return jnp.where(keep, x, -jnp.inf)

    def sampled():
        x = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        x = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), filtered, lambda x: x, x)
        drawn = jnp.argmax(x + sampling_noise(seeds, steps, V), axis=-1).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


# ---------------------------------------------------------------------------------------------------------
# The three compiled programs: prefill of admitted requests, insert into slots, decode of k steps for all slots

@struct.dataclass
class Requests:
    """Per-request settings as data ([N] rows: the requests of a prefill batch, or every slot's)."""
    seed: jax.Array  # uint32
    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1 = off
    max_new: jax.Array  # int32: tokens to generate at most
    stop: jax.Array  # [N, n_stop] int32 stop ids, -1 = unused
    forced: jax.Array  # [N, F] int32: tokens fed after the prompt, before generating (a suffix)
    n_forced: jax.Array  # int32


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries for B slots: one donated pytree. A slot whose `done` is set (finished,
    cancelled or never filled) still runs through the batch but leaves its cache untouched."""
    cache: KVCache
    req: Requests
    token: jax.Array  # [B] the next input token
    count: jax.Array  # [B] tokens generated so far
    fed: jax.Array  # [B] index in `forced` of the token being fed
    done: jax.Array  # [B] bool


def _widen_ring(cache: KVCache, window: int) -> KVCache:
    """Re-index the window-row ring from the prefill bucket's W_b rows to `window` >= W_b rows: ring row r holds
    the query at position p = r (mod rows); the last W_b prompt positions stay, each in its new row."""
    if cache.row_pos is None or cache.row_pos.shape[1] == window:
        return cache
    W_b = cache.row_pos.shape[1]
    start = (cache.seq.prompt_len - W_b)[:, None]
    p = start + jnp.mod(jnp.arange(window)[None, :] - start, window)  # the position row r may hold
    valid = (p >= 0) & (p < cache.seq.prompt_len[:, None])
    src = jnp.mod(p, W_b)
    row_pos = jnp.where(valid, jnp.take_along_axis(cache.row_pos, src, axis=1), -1)
    def widen(rows):  # [B, W_b, C] or per KV head [B, K, W_b, C]: the ring axis is second to last
        lead = (slice(None),) + (None,) * (rows.ndim - 3)
        return jnp.where(valid[lead + (slice(None), None)],
                         jnp.take_along_axis(rows, src[lead + (slice(None), None)], axis=-2), 0.0)

    layers = tuple(lc if lc.rows is None else lc.replace(rows=widen(lc.rows)) for lc in cache.layers)
    return cache.replace(layers=layers, row_pos=row_pos)


def _is_stop(token: jax.Array, stop: jax.Array) -> jax.Array:
    return jnp.any(token[:, None] == stop, axis=1)


@functools.partial(jax.jit, static_argnames=("plan", "cfg", "impl", "window", "mesh"))
def prefill_program(params, tokens, seq, req, *, plan, cfg, impl, window, mesh=None):
    """Prefill a batch of admitted requests under their bucket's plan and sample each one's first token.
    Returns (first tokens [N], the cache in the engine's layout (its `window` ring rows), the per-layer cache
    lengths [N, L])."""
    TRACE_COUNTS["prefill"] += 1
    logits, cache = prefill(params, tokens, seq, plan, cfg, impl, mesh)
    first = sample(logits, req.seed, jnp.zeros_like(req.seed), req.temperature, req.top_p, req.top_k)
    return (first, shd.constrain_state(_widen_ring(cache, window), mesh),
            jnp.stack([kvc.held_tokens(lc) for lc in cache.layers], axis=1))


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("state",))
def insert_program(state: DecodeState, cache: KVCache, req: Requests, first, slot, mesh=None) -> DecodeState:
    """Write prefilled requests into slots `slot` [N] (data: one program serves every slot; an index past the
    last slot drops its row, as for a prefill batch's filler rows). A request with forced tokens feeds them
    first; one without starts from its sampled first token, already counted."""
    TRACE_COUNTS["insert"] += 1
    put = lambda whole, rows: whole.at[slot].set(rows, mode="drop")  # noqa: E731
    from_prefill = req.n_forced == 0
    count = from_prefill.astype(jnp.int32)
    done = from_prefill & (_is_stop(first, req.stop) | (count >= req.max_new))
    token = jnp.where(from_prefill, first, req.forced[:, 0])
    return shd.constrain_state(DecodeState(
        cache=jax.tree.map(put, state.cache, cache), req=jax.tree.map(put, state.req, req),
        token=put(state.token, token), count=put(state.count, count), fed=put(state.fed, jnp.zeros_like(count)),
        done=put(state.done, done)), mesh)


@functools.partial(jax.jit, static_argnames=("plan", "cfg", "impl", "steps", "mesh"), donate_argnames=("state",))
def decode_program(params, state: DecodeState, cancel, exit_on_finish, *, plan, cfg, impl, steps, mesh=None):
    """Up to `steps` decode steps for every slot: a slot first feeds its forced tokens (appended to its
    compressed cache with eviction active, as `extend`), then samples up to `max_new` tokens with its own seed
    and its own count of generated tokens, so its output depends on nothing else in the batch, nor on `steps`.
    `cancel` [B] ends slots first. The loop ends after `steps` steps, when every slot is done, or (when
    `exit_on_finish`, i.e. requests wait for a slot) as soon as one slot finishes.
    Returns (state, tokens [B, steps]: each slot's generated tokens in order, -1 after, per-layer lengths [B, L])."""
    TRACE_COUNTS["decode"] += 1
    B, F = state.req.forced.shape
    rows = jnp.arange(B)
    start = state.done | cancel

    def cond(carry):
        i, st, _ = carry
        finished = jnp.any(st.done & ~start)
        return (i < steps) & ~jnp.all(st.done) & ~(exit_on_finish & finished)

    def body(carry):
        i, st, out = carry
        r = st.req
        logits, cache = decode_step(params, st.cache, st.token, plan, cfg, impl, live=~st.done, mesh=mesh)
        sampled = sample(logits, r.seed, st.count, r.temperature, r.top_p, r.top_k)
        feeding = st.fed + 1 < r.n_forced  # the next input is still a forced token
        emit = ~feeding & ~st.done
        out = out.at[:, i].set(jnp.where(emit, sampled, -1))
        count = st.count + emit
        done = st.done | (emit & (_is_stop(sampled, r.stop) | (count >= r.max_new)))
        token = jnp.where(feeding, r.forced[rows, jnp.minimum(st.fed + 1, F - 1)], sampled)
        return i + 1, st.replace(cache=cache, token=token, count=count, fed=st.fed + 1, done=done), out

    carry = (jnp.int32(0), state.replace(done=start), jnp.full((B, steps), -1, jnp.int32))
    _, state, out = jax.lax.while_loop(cond, body, carry)
    return state, out, jnp.stack([kvc.held_tokens(lc) for lc in state.cache.layers], axis=1)


def extend(params: Params, cache: KVCache, tokens: jax.Array, plan: CachePlan, cfg: ModelConfig,
           impl: str = "auto", targets: jax.Array | None = None):
    """Append `tokens` [B, n] to an existing (possibly compressed) cache, one decode step per token with the
    policy's eviction active. Returns (logits after the last token [B, V], the NLL of `targets` [B, n] under
    each step's logits or None, the cache, which is donated). The plan must have room: n counts as new tokens."""
    return _extend(params, cache, tokens, plan, cfg, impl, targets, mesh=shd.mesh_of(params))


@functools.partial(jax.jit, static_argnames=("plan", "cfg", "impl", "mesh"), donate_argnames=("cache",))
def _extend(params, cache, tokens, plan, cfg, impl, targets, *, mesh):
    validate.token_array(tokens, "tokens", cache.next_pos.shape[0])
    if targets is not None:
        validate.token_array(targets, "targets", cache.next_pos.shape[0], tokens.shape[1])
    B = tokens.shape[0]

    def step(carry, xs):
        cache, _ = carry
        token, target = xs
        logits, cache = decode_step(params, cache, token, plan, cfg, impl, mesh=mesh)
        return (cache, logits.astype(jnp.float32)), None if target is None else _nll(logits, target)

    xs = (tokens.T, None if targets is None else targets.T)
    (cache, last), nll = jax.lax.scan(step, (cache, jnp.zeros((B, cfg.vocab_size), jnp.float32)), xs)
    return last, None if nll is None else nll.T, cache


def _nll(logits, target):
    """Negative log-likelihood of each row's target token, in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------------------------------
# Public API

@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def get_tokenizer(cfg: GenerationConfig | ModelConfig):
    """The tokenizer that `generate` uses for `cfg` (its own, else the checkpoint's), or None."""
    if isinstance(cfg, ModelConfig):
        cfg = GenerationConfig(model=cfg)
    tok = cfg.tokenizer if cfg.tokenizer is not None else cfg.model.tokenizer_dir
    return _load_tokenizer(str(tok)) if isinstance(tok, (str, bytes)) or hasattr(tok, "__fspath__") else tok


def generate(params: Params, prompts, cfg: GenerationConfig, *, protect=None, suffixes=None) -> GenerationResult:
    """Generate for a ragged batch of prompts: token-id lists, strings or chat conversations (lists of
    {"role", "content"} messages, rendered with the tokenizer's chat template and protected as
    `pyrajax.prompts` says). See GenerationConfig for the settings.

    protect: optional, per prompt a boolean mask over its tokens (or None): tokens a budget policy never
        evicts (added to a conversation's own mask); without one, the policy protects the last
        `protect_tail` prompt tokens.
    suffixes: optional, per prompt a list of token ids appended *after* the prompt has been prefilled and
        compressed (one decode step each, eviction active), before generating: the query-agnostic protocol
        (a question asked about an already compressed context) and the next turn of a conversation."""
    mc = cfg.model
    check_params(params, mc)
    tokenizer = get_tokenizer(cfg)
    prepared = prepare(prompts, tokenizer, mc.vocab_size, cfg.policy.protect_last_turn, protect)
    prompts = [ids for ids, _ in prepared]
    masks = [mask for _, mask in prepared]
    n = len(prompts)
    if suffixes is None:
        suffixes = [[] for _ in range(n)]
    elif isinstance(suffixes, str) or not isinstance(suffixes, Sequence) or len(suffixes) != n:
        raise ValueError(f"suffixes must be a list with one entry per prompt ({n}; [] for none), got "
                         f"{validate.describe(suffixes)}")
    suffixes = [to_ids(x, tokenizer, mc.vocab_size, i, name="suffix", allow_empty=True) for i, x in enumerate(suffixes)]
    lens = [len(p) for p in prompts]
    after = [len(x) + cfg.max_new_tokens for x in suffixes]  # tokens each cache takes after its prompt
    for i, (s, a) in enumerate(zip(lens, after)):
        if s + a > mc.max_positions:
            raise ValueError(f"prompt {i} has {s} tokens (+ {a - cfg.max_new_tokens} suffix tokens); with "
                             f"max_new_tokens={cfg.max_new_tokens} that exceeds the model's {mc.max_positions} "
                             "positions; shorten the prompt or generate fewer tokens")
    S, T, B = bucket(max(lens), 16), bucket(max(after), 16), bucket(n, 1)
    F = bucket(max(len(x) for x in suffixes), 16) if any(suffixes) else 1
    policy = cfg.policy
    protected = [kvc.protected_outside(policy, s, m) for s, m in zip(lens, masks)]
    if not any(kvc.compresses(policy, s, a, mc.num_layers, c) for s, a, c in zip(lens, after, protected)):
        # Every request fits under the policy's floor: run the full cache's programs, which keep the same
        # tokens, so the output is the full cache's bit for bit (and no selection work is done).
        policy = PyramidConfig.full()
    plan = kvc.make_plan(policy, S, T, mc.num_layers, requests=tuple(zip(lens, after, protected)))
    stop = tuple(cfg.stop_ids if cfg.stop_ids is not None else mc.eos_ids)
    from pyrajax.engine import Engine, Request  # the engine drives these programs: imported late, not circular
    engine = Engine(params, mc, plan, {S: plan}, slots=B, steps=cfg.decode_chunk or F + T, forced=F,
                    stop_width=bucket(max(len(stop), 1), 1), impl=cfg.impl)
    streams = [engine.submit(engine.prepare(Request(
        ids=p, max_new=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        seed=cfg.seed, stop_ids=stop, protect=m, suffix=x))) for p, m, x in zip(prompts, masks, suffixes)]
    t0 = time.perf_counter()
    engine.run()  # every request is admitted at once (one prefill batch, as one batch bucket), then decoded
    t2 = time.perf_counter()
    t1 = max((s.first_token_at for s in streams if s.first_token_at is not None), default=t0)  # prefill's end

    tokens_out = [[t for t in s.tokens if t not in stop] for s in streams]
    after_prefill = np.array([s.lengths_after_prefill for s in streams])
    at_end = np.array([s.lengths_at_end for s in streams])
    per_layer = engine.kv_bytes_per_layer
    per_token = engine.kv_bytes_per_token
    full = B * mc.num_layers * (S + T) * per_token
    # What the full cache would hold for these requests (their own lengths, no buckets): the measured fraction.
    requested = sum((s + a) for s, a in zip(lens, after)) * mc.num_layers * per_token
    stats = dict(
        policy=cfg.policy.name, compressed=policy is cfg.policy, prompt_bucket=S, new_bucket=T, batch_bucket=B,
        kv_bytes=int(sum(per_layer)), kv_bytes_per_layer=[int(b) for b in per_layer], full_kv_bytes=int(full),
        kv_bytes_per_device=int(engine.kv_bytes_per_device), tp=shd.tp_size(engine.mesh),
        kv_fraction=sum(per_layer) / full, capacity_per_layer=list(plan.capacity),
        lengths_after_prefill=after_prefill.tolist(), lengths_at_end=at_end.tolist(),
        live_kv_bytes=int(at_end.sum() * per_token), live_kv_fraction=float(at_end.sum() * per_token / requested),
        prompt_tokens=lens, suffix_tokens=[len(x) for x in suffixes],
        prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
        generated_tokens=sum(len(t) for t in tokens_out),
    )
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens_out] if tokenizer is not None else None
    return GenerationResult(tokens=tokens_out, texts=texts, stats=stats)


def logits(params: Params, tokens, config: ModelConfig) -> jax.Array:
    """Full-sequence logits [B, T, V] (float32) for a batch of equal-length token lists."""
    check_params(params, config)
    toks = validate.token_batch(tokens, "tokens", config.vocab_size)
    if toks.shape[1] > config.max_positions:
        raise ValueError(f"tokens has {toks.shape[1]} tokens per row, more than the model's {config.max_positions} "
                         "positions; pass shorter rows")
    pos = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
    return _forward_jit(params, jnp.asarray(toks, jnp.int32), jnp.asarray(pos), config, mesh=shd.mesh_of(params))


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _forward_jit(params, tokens, pos, config, mesh):
    return forward(params, tokens, pos, config, between_layers=lambda x: shd.replicated(x, mesh))
