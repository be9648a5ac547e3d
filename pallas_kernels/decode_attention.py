"""Decode attention over a per-layer cache, also yielding the head-averaged probability row (SPEC §1.2).

Flash-decoding, grid (B, kv head, split): the program of split s walks its share of the key blocks below
`length` (slots >= length are never read; the share is computed from the traced length, so the splits stay
balanced while the cache fills) with all G query heads of the kv head as rows of one [16+, hd] tile, so each
K/V block is loaded once per kv head. It writes partial (acc, max, sum) per split plus the raw f32 logits
[B, H, C]; a small XLA epilogue combines the splits and turns the logits into probabilities with the final
per-head max/sum (reading the logits, ~1/64 of the K/V bytes at hd=128 bf16, never K again).

Positions are one set per sequence (k_pos [B, C], every KV head holds the same tokens) or per KV head
(k_pos [B, K, C], per-head selection): the kernel reads one row of positions per program either way, and the
probability row it yields follows the layout: the mean over all H query heads [B, C], or per KV head the max
over its G query heads [B, K, C] (the row per-head scorers use).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (NEG, cdiv, dot_nn, dot_nt, fold_heads, load, load_tile, num_sms,
                                    online_softmax_step, pow2, precision, resolve_interpret, safe_inv, span,
                                    store, store_tile, triton_params, use_pallas, visible)


def decode_block_sizes(batch: int, num_kv: int, capacity: int, hd: int, block_c=None, num_splits=None):
    """(block_c, num_splits, num_warps, num_stages). 128-slot K/V blocks (2 x 32 KiB at hd=128 bf16); split the
    cache only when B*K programs cannot fill two waves of the SMs, keeping >= 4 blocks per split."""
    block_c = block_c or min(128 if hd <= 128 else 64, pow2(capacity))
    if num_splits is None:
        want = cdiv(2 * num_sms(), batch * num_kv)
        num_splits = max(1, min(want, capacity // (4 * block_c)))
    return block_c, num_splits, 4, 2


def _decode_kernel(len_ref, qpos_ref, q_ref, k_ref, v_ref, kpos_ref, acc_ref, m_ref, l_ref, logit_ref, *,
                   C, G, gp, hd, hdp, bc, splits, scale):
    # Refs (one sequence, one kv head): q [G, hd] (read as a >= 16-row tile), k/v [C, hd], kpos [C] (the
    # sequence's, or this kv head's own);
    # outputs (this split) acc [G, hd], m/l [G]; logits [G, C] (the blocks this split visits).
    end = jnp.minimum(len_ref[()], C)
    nblk = cdiv(end, bc)
    per = cdiv(nblk, splits)
    lo = pl.program_id(2) * per
    hi = jnp.minimum(lo + per, nblk)
    _, gmask = span(0, gp, G)
    q = load_tile(q_ref, (), 0, gmask, hdp, hd)
    qpos = qpos_ref[()]

    def body(j, carry):
        acc, m, l = carry
        c0 = j * bc
        _, smask = span(c0, bc, end)
        kpos = load(kpos_ref.at[pl.ds(c0, bc)], smask, -1)
        # Only visible rows are read: holes cost no traffic, and whatever an empty slot holds (even NaN) is
        # never multiplied into the output.
        vis = smask & visible(kpos, qpos)
        s = dot_nt(q, load_tile(k_ref, (), c0, vis, hdp, hd)) * scale
        store(logit_ref.at[pl.ds(0, gp), pl.ds(c0, bc)], s, gmask[:, None] & smask[None, :])
        m, l, p, alpha = online_softmax_step(m, l, s, vis[None, :])
        v = load_tile(v_ref, (), c0, vis, hdp, hd)
        return acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v), m, l

    init = (jnp.zeros((gp, hdp), jnp.float32), jnp.full((gp,), NEG, jnp.float32), jnp.zeros((gp,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, init)  # an empty split stores acc = 0, m = NEG, l = 0
    store_tile(acc_ref, (), 0, acc, gmask, hd)
    store(m_ref.at[pl.ds(0, gp)], m, gmask)
    store(l_ref.at[pl.ds(0, gp)], l, gmask)


def _decode_pallas(q, k, v, k_pos, q_pos, length, interpret, block_c, num_splits):
    B, H, hd = q.shape
    _, K, C, _ = k.shape
    G, gp = H // K, pow2(H // K)
    bc, S, warps, stages = decode_block_sizes(B, K, C, hd, block_c, num_splits)
    f32 = jnp.float32
    at = lambda *blk: pl.BlockSpec((None, None, *blk), lambda b, h, s: (b, h) + (0,) * len(blk))
    kpos_spec = (at(C) if k_pos.ndim == 3 else pl.BlockSpec((None, C), lambda b, h, s: (b, 0)))
    per_split = lambda *blk: pl.BlockSpec((None, None, None, *blk), lambda b, h, s: (b, h, s) + (0,) * len(blk))
    acc, m, l, logits = pl.pallas_call(
        functools.partial(_decode_kernel, C=C, G=G, gp=gp, hd=hd, hdp=pow2(hd), bc=bc, splits=S,
                          scale=1.0 / math.sqrt(hd)),
        grid=(B, K, S),
        in_specs=[pl.BlockSpec((), lambda b, h, s: ()), pl.BlockSpec((None,), lambda b, h, s: (b,)),
                  at(G, hd), at(C, hd), at(C, hd), kpos_spec],
        out_specs=[per_split(G, hd), per_split(G), per_split(G), at(G, C)],
        out_shape=[jax.ShapeDtypeStruct((B, K, S, G, hd), f32), jax.ShapeDtypeStruct((B, K, S, G), f32),
                   jax.ShapeDtypeStruct((B, K, S, G), f32), jax.ShapeDtypeStruct((B, K, G, C), f32)],
        interpret=interpret, **triton_params(warps, stages),
    )(jnp.asarray(length, jnp.int32).reshape(()), q_pos.astype(jnp.int32), fold_heads(q, K), k, v,
      k_pos.astype(jnp.int32))
    # Combine the splits (flash-decoding), then normalise the logits with the final per-head max / sum.
    m_all = jnp.max(m, axis=2)
    w = jnp.exp(m - m_all[:, :, None])  # an empty split has l = acc = 0, whatever its weight
    inv = safe_inv(jnp.sum(w * l, axis=2))
    out = jnp.sum(w[..., None] * acc, axis=2) * inv[..., None]
    valid = _heads_axis(_valid(k_pos, q_pos, length))  # logits of slots >= length were never written
    probs = jnp.where(valid, jnp.exp(logits - m_all[..., None]) * inv[..., None], 0.0)
    return out.reshape(B, H, hd).astype(q.dtype), _prob_row(probs, k_pos)


def _valid(k_pos, q_pos, length):
    """k_pos's shape ([B, C] or [B, K, C]): slot below `length` and visible to the sequence's new token."""
    q_pos = q_pos.reshape(q_pos.shape + (1,) * (k_pos.ndim - 1))
    return (jnp.arange(k_pos.shape[-1]) < length) & visible(k_pos, q_pos)


def _heads_axis(x):
    """A per-slot mask [B, C] or [B, K, C] broadcast against [B, K, G, C]."""
    return x[:, None, None, :] if x.ndim == 2 else x[:, :, None, :]


def _prob_row(p, k_pos):
    """p [B, K, G, C] -> the mean over the H query heads [B, C], or per KV head the max over its group."""
    return jnp.max(p, axis=2) if k_pos.ndim == 3 else jnp.sum(p, axis=(1, 2)) / (p.shape[1] * p.shape[2])


def decode_attention_reference(q, k, v, k_pos, q_pos, length):
    B, H, hd = q.shape
    K = k.shape[1]
    s = jnp.einsum("bkgd,bkcd->bkgc", fold_heads(q, K), k, precision=precision(q.dtype),
                   preferred_element_type=jnp.float32) / math.sqrt(hd)
    valid = _heads_axis(_valid(k_pos, q_pos, length))
    # Empty / evicted / future slots may hold anything, NaN included (0 * NaN = NaN), so mask the data, not
    # only the probabilities, as the kernel does by never loading those rows: scores by `where` (a NaN key
    # only reaches its own score), values by a `where` that XLA fuses into the einsum's operand.
    s = jnp.where(valid, s, NEG)
    v = jnp.where(valid[:, :, 0, :, None], v, jnp.zeros((), v.dtype))
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid, jnp.exp(s - m), 0.0)
    p = p * safe_inv(jnp.sum(p, axis=-1, keepdims=True))
    # p in v's dtype, as the kernel (and any flash kernel) does: bf16 x bf16 products with f32 accumulation.
    out = jnp.einsum("bkgc,bkcd->bkgd", p.astype(v.dtype), v, precision=precision(v.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(B, H, hd).astype(q.dtype), _prob_row(p, k_pos)


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "block_c", "num_splits"))
def decode_attention(q, k, v, k_pos, q_pos, length, *, impl: str = "auto", interpret: bool | None = None,
                     block_c: int | None = None, num_splits: int | None = None):
    """q [B, H, hd] (one new token per sequence), k/v [B, K, C, hd], k_pos [B, C] or per KV head [B, K, C]
    (-1 = empty), q_pos [B], length: int32 scalar, slots >= length empty for every sequence and head ->
    (out [B, H, hd] in q.dtype, prob float32: [B, C] the mean over the H heads of each slot's softmax
    probability, or [B, K, C] per KV head the max over its G query heads)."""
    # "auto" keeps XLA for tiny batches and short caches: on the H100 at batch 1 (7B shape, 4k cache) XLA's
    # fused einsum ran 80 us against the kernel's 87 us, while from B*K = 256 up the kernel is faster
    # (bench/results/kernels-*); end to end at batch 32 the kernel won on 768-slot caches (full, 512+256) and
    # lost 1% on budget-0.45's 139-528-slot caches (bench/results/throughput-llama2-7b-b32-pallas-vs-xla-*).
    if use_pallas(impl) and (impl == "pallas" or (q.shape[0] * k.shape[1] >= 128 and k.shape[2] >= 640)):
        return _decode_pallas(q, k, v, k_pos, q_pos, length, resolve_interpret(interpret), block_c, num_splits)
    return decode_attention_reference(q, k, v, k_pos, q_pos, length)


if __name__ == "__main__":
    from pallas_kernels._common import random_positions
    key = jax.random.PRNGKey(0)
    for (B, H, K, C, length, hd, dt) in [(2, 4, 4, 77, 60, 32, jnp.float32), (3, 24, 8, 100, 100, 64, jnp.bfloat16)]:
        kq, kk, kv, kp, key = jax.random.split(key, 5)
        k_pos, last = random_positions(kp, B, C)
        args = (jax.random.normal(kq, (B, H, hd), dt), jax.random.normal(kk, (B, K, C, hd), dt),
                jax.random.normal(kv, (B, K, C, hd), dt), k_pos, last + 1, jnp.int32(length))
        got = decode_attention(*args, impl="pallas", block_c=16, num_splits=2)
        want = decode_attention_reference(*args)
        err = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(got, want)]
        print(f"decode_attention B={B} H={H} K={K} C={C} length={length} {jnp.dtype(dt).name}: "
              f"max abs err out {err[0]:.2e}, prob_mean {err[1]:.2e}")
