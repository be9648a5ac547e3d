"""Window-attention score reduction (PyramidInfer prefill scoring, SPEC §1.1) without the [B, H, W, n] matrix.

Two modes over the same probabilities P[b, h, w, j] (softmax over the keys visible to query (b, w)):
  score_reduction: scores[b, j] = sum_w row_weight[b, w] * mean_h P[b, h, w, j]        -> [B, n]
  window_rows:     rows[b, w, j] = mean_h P[b, h, w, j]  (engine layouts, seeds the rows buffer) -> [B, W, n]
     per_head:     rows[b, k, w, j] = max_g P[b, (k, g), w, j], g over kv head k's query heads    -> [B, K, W, n]

Two flash-style passes, pass 1 shared by both modes:
  1. grid (B, kv head, row block): stream the keys once per row block, keeping each query row's running max m
     and sum-exp l; store m and the row's coefficient c = row_weight / (H * l) (0 for a row with no visible key;
     row_weight = 1 in rows mode).
  2. score mode, grid (B, key block): for each kv head load its key block once, then for every query row of that
     kv group add c * exp(s - m) into the column sums.
     rows mode, grid (B, key block, window block): for each kv head load its key block once, then for each of
     its G query heads add c * exp(s - m) of the window block's rows into a [window block, key block] tile:
     the head sum, written once to rows (per head: their max, written once per kv head). Only [B, K, G*W] row
     statistics and the [B, W, n] (per head [B, K, W, n]) rows reach memory.
Query rows of a kv head are its G query heads stacked: row r = g * W + w (a free reshape of [B, H, W, hd]).
Keys are read in place in either layout: [B, K, n, hd] (score mode) or the engine's [B, n, K, hd] (rows mode,
a strided tile whose key vectors stay contiguous, so no transposed copy of K is ever made).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (NEG, cdiv, dot_nt, fold_heads, load, load_tile, online_softmax_step,
                                    pow2, resolve_interpret, safe_inv, span, store, triton_params, use_pallas,
                                    visible, precision)


def score_reduction_block_sizes(rows: int, n: int, hd: int):
    """(block_rows, block_keys, num_warps, num_stages). 128 rows covers a 103-query window of one head in one
    block, so pass 1 reads K once per kv head; 64-key blocks keep the [rows, keys] f32 tile in registers."""
    block_r = min(128, pow2(rows))
    block_n = min(64 if hd <= 128 else 32, pow2(n))
    return block_r, block_n, (8 if block_r * block_n >= 8192 else 4), 2


def window_rows_block_sizes(window: int, n: int, hd: int):
    """Pass 2 of rows mode: (block_window, block_keys, num_warps, num_stages). The [window, keys] f32
    accumulator sits next to the [window, keys] logits tile, hence the same 128 x 64 cap as pass 1."""
    return score_reduction_block_sizes(window, n, hd)


# ----------------------------------------------------------------------------- kernels
def _row_stats_kernel(q_ref, k_ref, qpos_ref, kpos_ref, rw_ref, m_ref, c_ref, *,
                      rows, n, br, bn, hd, hdp, scale, inv_heads):
    # Refs (one batch row, one kv head): q [R, hd], k [n, hd] (a strided view in rows mode), qpos/rw [R],
    # kpos [n]; outputs m/c [R].
    r0 = pl.program_id(2) * br
    _, rmask = span(r0, br, rows)
    q = load_tile(q_ref, (), r0, rmask, hdp, hd)
    qpos = load(qpos_ref.at[pl.ds(r0, br)], rmask)

    def body(j, carry):
        j0 = j * bn
        _, kmask = span(j0, bn, n)
        kpos = load(kpos_ref.at[pl.ds(j0, bn)], kmask, -1)
        k = load_tile(k_ref, (), j0, kpos >= 0, hdp, hd)  # padding slots are not read
        s = dot_nt(q, k) * scale
        m, l, _, _ = online_softmax_step(*carry, s, visible(kpos[None, :], qpos[:, None]))
        return m, l

    init = (jnp.full((br,), NEG, jnp.float32), jnp.zeros((br,), jnp.float32))
    m, l = lax.fori_loop(0, cdiv(n, bn), body, init)
    rw = load(rw_ref.at[pl.ds(r0, br)], rmask)
    store(m_ref.at[pl.ds(r0, br)], m, rmask)
    store(c_ref.at[pl.ds(r0, br)], rw * inv_heads * safe_inv(l), rmask)


def _key_block(k_ref, kpos_ref, kv, j0, *, n, bn, hd, hdp, heads_first):
    """(kpos [bn], k [bn, hdp]) of kv head `kv`, keys j0..; k_ref is [K, n, hd] or, heads_first=False, [n, K, hd].
    Padding and out-of-range slots are not read (k 0, kpos -1)."""
    _, kmask = span(j0, bn, n)
    kpos = load(kpos_ref.at[pl.ds(j0, bn)], kmask, -1)
    if heads_first:
        return kpos, load_tile(k_ref, (kv,), j0, kpos >= 0, hdp, hd)
    _, cmask = span(0, hdp, hd)
    return kpos, load(k_ref.at[pl.ds(j0, bn), kv, pl.ds(0, hdp)], (kpos >= 0)[:, None] & cmask[None, :])


def _prob_tile(q_ref, qpos_ref, m_ref, c_ref, kv, r0, rmask, k, kpos, *, hd, hdp, scale):
    """c * P for query rows r0.. (rmask) of kv group `kv` against one key block: [len(rmask), bn] float32,
    0 for invisible keys and masked rows (their c loads as 0)."""
    br = rmask.shape[0]
    q = load_tile(q_ref, (kv,), r0, rmask, hdp, hd)
    qpos = load(qpos_ref.at[pl.ds(r0, br)], rmask)
    m = load(m_ref.at[kv, pl.ds(r0, br)], rmask)
    c = load(c_ref.at[kv, pl.ds(r0, br)], rmask)
    s = dot_nt(q, k) * scale
    return jnp.where(visible(kpos[None, :], qpos[:, None]), jnp.exp(s - m[:, None]), 0.0) * c[:, None]


def _column_kernel(q_ref, k_ref, qpos_ref, kpos_ref, m_ref, c_ref, out_ref, *,
                   num_kv, rows, n, br, bn, hd, hdp, scale, heads_first):
    # Refs (one batch row, all kv heads): q [K, R, hd], k [K, n, hd], qpos [R], kpos [n], m/c [K, R]; out [n].
    j0 = pl.program_id(1) * bn
    tile = functools.partial(_prob_tile, q_ref, qpos_ref, m_ref, c_ref, hd=hd, hdp=hdp, scale=scale)

    def head(kv, acc):
        kpos, k = _key_block(k_ref, kpos_ref, kv, j0, n=n, bn=bn, hd=hd, hdp=hdp, heads_first=heads_first)

        def row_block(i, acc):  # the key block is loaded once per kv head, for all its G*W query rows
            _, rmask = span(i * br, br, rows)
            return acc + jnp.sum(tile(kv, i * br, rmask, k, kpos), axis=0)

        return lax.fori_loop(0, cdiv(rows, br), row_block, acc)

    acc = lax.fori_loop(0, num_kv, head, jnp.zeros((bn,), jnp.float32))
    store(out_ref.at[pl.ds(j0, bn)], acc, span(j0, bn, n)[1])


def _rows_kernel(q_ref, k_ref, qpos_ref, kpos_ref, m_ref, c_ref, out_ref, *,
                 num_kv, groups, window, n, bw, bn, hd, hdp, scale, heads_first, per_head):
    # Refs (one batch row, all kv heads): q [K, G*W, hd], k [n, K, hd], qpos [G*W], kpos [n], m/c [K, G*W];
    # out [W, n] (per_head: [K, W, n]). This program: window rows w0.. against keys j0.., summed over all H
    # query heads (per_head: the max over each kv head's G query heads, whose c carries no 1/H).
    j0, w0 = pl.program_id(1) * bn, pl.program_id(2) * bw
    _, wmask = span(w0, bw, window)
    tile = functools.partial(_prob_tile, q_ref, qpos_ref, m_ref, c_ref, hd=hd, hdp=hdp, scale=scale)
    out_mask = wmask[:, None] & span(j0, bn, n)[1][None, :]

    if per_head:
        def group_max(kv, carry):
            kpos, k = _key_block(k_ref, kpos_ref, kv, j0, n=n, bn=bn, hd=hd, hdp=hdp, heads_first=heads_first)
            def query_head(g, best):  # query head g of this kv group: its window rows are rows g*W + w
                return jnp.maximum(best, tile(kv, g * window + w0, wmask, k, kpos))

            best = lax.fori_loop(0, groups, query_head, jnp.zeros((bw, bn), jnp.float32))  # probabilities >= 0
            store(out_ref.at[kv, pl.ds(w0, bw), pl.ds(j0, bn)], best, out_mask)
            return carry

        lax.fori_loop(0, num_kv, group_max, 0)
        return

    def head(kv, acc):
        kpos, k = _key_block(k_ref, kpos_ref, kv, j0, n=n, bn=bn, hd=hd, hdp=hdp, heads_first=heads_first)
        # Query head g of this kv group: its window rows are rows g*W + w of the group.
        return lax.fori_loop(0, groups, lambda g, acc: acc + tile(kv, g * window + w0, wmask, k, kpos), acc)

    acc = lax.fori_loop(0, num_kv, head, jnp.zeros((bw, bn), jnp.float32))
    store(out_ref.at[pl.ds(w0, bw), pl.ds(j0, bn)], acc, out_mask)


# ----------------------------------------------------------------------------- wrappers
def _per_b(*blk):
    return pl.BlockSpec((None, *blk), lambda b, *_: (b,) + (0,) * len(blk))


def _pallas_call(interpret, warps, stages):
    return functools.partial(pl.pallas_call, interpret=interpret, **triton_params(warps, stages))


def _row_stats(q, k, row_pos, k_pos, row_w, *, num_heads, heads_first, interpret):
    """Pass 1: m, c [B, K, R] for q [B, K, R, hd] and k [B, K, n, hd] (heads_first) or [B, n, K, hd]."""
    B, K, R, hd = q.shape
    n = k.shape[2] if heads_first else k.shape[1]
    br, bn, warps, stages = score_reduction_block_sizes(R, n, hd)
    per_bk = lambda *blk: pl.BlockSpec((None, None, *blk), lambda b, h, i: (b, h) + (0,) * len(blk))
    k_spec = per_bk(n, hd) if heads_first else pl.BlockSpec((None, n, None, hd), lambda b, h, i: (b, 0, h, 0))
    stats = jax.ShapeDtypeStruct((B, K, R), jnp.float32)
    kernel = functools.partial(_row_stats_kernel, rows=R, n=n, br=br, bn=bn, hd=hd, hdp=pow2(hd),
                               scale=1.0 / math.sqrt(hd), inv_heads=1.0 / num_heads)
    return _pallas_call(interpret, warps, stages)(
        kernel, grid=(B, K, cdiv(R, br)),
        in_specs=[per_bk(R, hd), k_spec, _per_b(R), _per_b(n), _per_b(R)],
        out_specs=[per_bk(R), per_bk(R)], out_shape=[stats, stats],
    )(q, k, row_pos, k_pos, row_w)


def _rows_inputs(q_win, q_pos, num_kv, row_weight=None):
    """q [B, H, W, hd] -> (q [B, K, G*W, hd], row positions [B, G*W], row weights [B, G*W]) (row r = g*W + w)."""
    B, H, W, hd = q_win.shape
    tile = lambda x: jnp.tile(x, (1, H // num_kv))
    rw = jnp.ones((B, W), jnp.float32) if row_weight is None else row_weight.astype(jnp.float32)
    return q_win.reshape(B, num_kv, (H // num_kv) * W, hd), tile(q_pos.astype(jnp.int32)), tile(rw)


def _score_reduction_pallas(q_win, k, q_pos, k_pos, row_weight, interpret):
    B, H, W, hd = q_win.shape
    _, K, n, _ = k.shape
    q, row_pos, row_w = _rows_inputs(q_win, q_pos, K, row_weight)
    k_pos = k_pos.astype(jnp.int32)
    m, c = _row_stats(q, k, row_pos, k_pos, row_w, num_heads=H, heads_first=True, interpret=interpret)
    R = q.shape[2]
    br, bn, warps, stages = score_reduction_block_sizes(R, n, hd)
    kernel = functools.partial(_column_kernel, num_kv=K, rows=R, n=n, br=br, bn=bn, hd=hd, hdp=pow2(hd),
                               scale=1.0 / math.sqrt(hd), heads_first=True)
    return _pallas_call(interpret, warps, stages)(
        kernel, grid=(B, cdiv(n, bn)),
        in_specs=[_per_b(K, R, hd), _per_b(K, n, hd), _per_b(R), _per_b(n), _per_b(K, R), _per_b(K, R)],
        out_specs=_per_b(n), out_shape=jax.ShapeDtypeStruct((B, n), jnp.float32),
    )(q, k, row_pos, k_pos, m, c)


def _window_rows_pallas(q_win, k, q_pos, k_pos, interpret, per_head=False):
    B, W, H, hd = q_win.shape
    _, n, K, _ = k.shape
    # q is transposed to [B, H, W, hd] (the stacked-row layout of pass 1; W/n * G of K's size, and under jit the
    # transpose fuses into the RoPE that produces q). K, the big operand that both passes stream, is read in place.
    q, row_pos, row_w = _rows_inputs(q_win.swapaxes(1, 2), q_pos, K)
    k_pos = k_pos.astype(jnp.int32)
    m, c = _row_stats(q, k, row_pos, k_pos, row_w, num_heads=1 if per_head else H, heads_first=False,
                      interpret=interpret)
    R = q.shape[2]
    bw, bn, warps, stages = window_rows_block_sizes(W, n, hd)
    kernel = functools.partial(_rows_kernel, num_kv=K, groups=H // K, window=W, n=n, bw=bw, bn=bn, hd=hd,
                               hdp=pow2(hd), scale=1.0 / math.sqrt(hd), heads_first=False, per_head=per_head)
    out = (K, W, n) if per_head else (W, n)
    return _pallas_call(interpret, warps, stages)(
        kernel, grid=(B, cdiv(n, bn), cdiv(W, bw)),
        in_specs=[_per_b(K, R, hd), _per_b(n, K, hd), _per_b(R), _per_b(n), _per_b(K, R), _per_b(K, R)],
        out_specs=_per_b(*out), out_shape=jax.ShapeDtypeStruct((B, *out), jnp.float32),
    )(q, k, row_pos, k_pos, m, c)


# ----------------------------------------------------------------------------- references
def _probs_reference(q_win, k, q_pos, k_pos):
    """P [B, K, G, W, n] float32 for q_win [B, H, W, hd], k [B, K, n, hd] (materialised: the XLA path)."""
    hd, K = q_win.shape[-1], k.shape[1]
    s = jnp.einsum("bkgwd,bknd->bkgwn", fold_heads(q_win, K), k, precision=precision(q_win.dtype),
                   preferred_element_type=jnp.float32) / math.sqrt(hd)
    vis = visible(k_pos[:, None, None, None, :], q_pos[:, None, None, :, None])
    m = jnp.max(jnp.where(vis, s, NEG), axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    return p * safe_inv(jnp.sum(p, axis=-1, keepdims=True))


def score_reduction_reference(q_win, k, q_pos, k_pos, row_weight):
    """Plain jnp: materialises [B, H, W, n] (the XLA path)."""
    p = _probs_reference(q_win, k, q_pos, k_pos)
    return jnp.einsum("bkgwn,bw->bn", p, row_weight.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) / q_win.shape[1]


def window_rows_reference(q_win, k, q_pos, k_pos, per_head=False):
    """Plain jnp, engine layouts (q_win [B, W, H, hd], k [B, n, K, hd]): materialises [B, H, W, n]."""
    p = _probs_reference(q_win.swapaxes(1, 2), k.swapaxes(1, 2), q_pos, k_pos)
    return jnp.max(p, axis=2) if per_head else jnp.mean(p, axis=(1, 2))


# ----------------------------------------------------------------------------- public API
@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def score_reduction(q_win, k, q_pos, k_pos, row_weight, *, impl: str = "auto", interpret: bool | None = None):
    """q_win [B, H, W, hd], k [B, K, n, hd], q_pos [B, W], k_pos [B, n] (-1 = padding), row_weight [B, W]
    (normalised; 0 for rows outside a sequence's window) -> scores [B, n] float32 (invisible keys score 0)."""
    if use_pallas(impl):
        return _score_reduction_pallas(q_win, k, q_pos, k_pos, row_weight, resolve_interpret(interpret))
    return score_reduction_reference(q_win, k, q_pos, k_pos, row_weight)


@functools.partial(jax.jit, static_argnames=("per_head", "impl", "interpret"))
def window_rows(q_win, k, q_pos, k_pos, *, per_head: bool = False, impl: str = "auto",
                interpret: bool | None = None):
    """Head-averaged softmax rows of the window queries, in the engine's layouts:
    q_win [B, W, H, hd], k [B, n, K, hd], q_pos [B, W] (-1 = padding row), k_pos [B, n] (-1 = padding)
    -> rows [B, W, n] float32, rows[b, w, j] = mean_h P[b, h, w, j] (invisible keys 0; a row with no visible
    key is all zeros). Query head h uses kv head h // (H / K). Selection scores are then
    einsum("bw,bwn->bn", row_weight, rows). [B, H, W, n] is never written on the Pallas path.
    per_head: rows [B, K, W, n], rows[b, k, w, j] = max over kv head k's query heads of P (per-head selection)."""
    if use_pallas(impl):
        return _window_rows_pallas(q_win, k, q_pos, k_pos, resolve_interpret(interpret), per_head)
    return window_rows_reference(q_win, k, q_pos, k_pos, per_head)


if __name__ == "__main__":
    from pallas_kernels._common import random_positions
    key = jax.random.PRNGKey(0)
    for (B, H, K, W, n, hd, dt) in [(2, 4, 4, 7, 100, 32, jnp.float32), (2, 6, 2, 5, 37, 16, jnp.bfloat16)]:
        kq, kk, kp, key = jax.random.split(key, 4)
        k_pos, last = random_positions(kp, B, n)
        q_pos = last[:, None] - jnp.arange(W)[::-1]  # the window: the last W positions
        rw = jnp.linspace(1.0, 1.2, W)[None].repeat(B, 0)
        args = (jax.random.normal(kq, (B, H, W, hd), dt), jax.random.normal(kk, (B, K, n, hd), dt),
                q_pos.astype(jnp.int32), k_pos, rw / rw.sum(1, keepdims=True))
        got, want = score_reduction(*args, impl="pallas"), score_reduction_reference(*args)
        print(f"score_reduction B={B} H={H} K={K} W={W} n={n} {jnp.dtype(dt).name}: "
              f"max abs err {float(jnp.max(jnp.abs(got - want))):.2e} (max score {float(want.max()):.3f})")
