"""Window-attention score reduction (PyramidInfer prefill scoring, SPEC §1.1) without the [B, H, W, n] matrix.

scores[b, j] = sum_w row_weight[b, w] * mean_h P[b, h, w, j], P = softmax over the keys visible to query (b, w).

Two flash-style passes:
  1. grid (B, kv head, row block): stream the keys once per row block, keeping each query row's running max m
     and sum-exp l; store m and the row's coefficient c = row_weight / (H * l) (0 for a row with no visible key).
  2. grid (B, key block): for each kv head load its key block once, then for every query row of that kv group
     add c * exp(s - m) into the column sums. Only [B, K, G*W] row statistics ever reach memory.
Query rows of a kv head are its G query heads stacked: row r = g * W + w (a free reshape of [B, H, W, hd]).
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


def _row_stats_kernel(q_ref, k_ref, qpos_ref, kpos_ref, rw_ref, m_ref, c_ref, *,
                      rows, n, br, bn, hd, hdp, scale, inv_heads):
    # Refs (one batch row, one kv head): q [R, hd], k [n, hd], qpos/rw [R], kpos [n]; outputs m/c [R].
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


def _column_kernel(q_ref, k_ref, qpos_ref, kpos_ref, m_ref, c_ref, out_ref, *,
                   num_kv, rows, n, br, bn, hd, hdp, scale):
    # Refs (one batch row, all kv heads): q [K, R, hd], k [K, n, hd], qpos [R], kpos [n], m/c [K, R]; out [n].
    j0 = pl.program_id(1) * bn
    _, kmask = span(j0, bn, n)
    kpos = load(kpos_ref.at[pl.ds(j0, bn)], kmask, -1)

    def head(kv, acc):
        k = load_tile(k_ref, (kv,), j0, kpos >= 0, hdp, hd)  # once per kv head, for all its G*W query rows

        def row_block(i, acc):
            r0 = i * br
            _, rmask = span(r0, br, rows)
            q = load_tile(q_ref, (kv,), r0, rmask, hdp, hd)
            qpos = load(qpos_ref.at[pl.ds(r0, br)], rmask)
            m = load(m_ref.at[kv, pl.ds(r0, br)], rmask)
            c = load(c_ref.at[kv, pl.ds(r0, br)], rmask)  # 0 on padded rows, so they add nothing
            s = dot_nt(q, k) * scale
            p = jnp.where(visible(kpos[None, :], qpos[:, None]), jnp.exp(s - m[:, None]), 0.0)
            return acc + jnp.sum(p * c[:, None], axis=0)

        return lax.fori_loop(0, cdiv(rows, br), row_block, acc)

    acc = lax.fori_loop(0, num_kv, head, jnp.zeros((bn,), jnp.float32))
    store(out_ref.at[pl.ds(j0, bn)], acc, kmask)


def _score_reduction_pallas(q_win, k, q_pos, k_pos, row_weight, interpret):
    B, H, W, hd = q_win.shape
    _, K, n, _ = k.shape
    R = (H // K) * W
    br, bn, warps, stages = score_reduction_block_sizes(R, n, hd)
    q = q_win.reshape(B, K, R, hd)
    # Row-indexed copies of the per-window-query inputs (tiny: [B, G*W]).
    row_pos = jnp.tile(q_pos.astype(jnp.int32), (1, H // K))
    row_w = jnp.tile(row_weight.astype(jnp.float32), (1, H // K))
    k_pos = k_pos.astype(jnp.int32)
    sizes = dict(rows=R, n=n, br=br, bn=bn, hd=hd, hdp=pow2(hd), scale=1.0 / math.sqrt(hd))
    call = functools.partial(pl.pallas_call, interpret=interpret, **triton_params(warps, stages))
    per_b = lambda *blk: pl.BlockSpec((None, *blk), lambda b, *_: (b,) + (0,) * len(blk))
    per_bk = lambda *blk: pl.BlockSpec((None, None, *blk), lambda b, h, i: (b, h) + (0,) * len(blk))
    stats = jax.ShapeDtypeStruct((B, K, R), jnp.float32)
    m, c = call(functools.partial(_row_stats_kernel, inv_heads=1.0 / H, **sizes),
                grid=(B, K, cdiv(R, br)),
                in_specs=[per_bk(R, hd), per_bk(n, hd), per_b(R), per_b(n), per_b(R)],
                out_specs=[per_bk(R), per_bk(R)], out_shape=[stats, stats],
                )(q, k, row_pos, k_pos, row_w)
    return call(functools.partial(_column_kernel, num_kv=K, **sizes),
                grid=(B, cdiv(n, bn)),
                in_specs=[per_b(K, R, hd), per_b(K, n, hd), per_b(R), per_b(n), per_b(K, R), per_b(K, R)],
                out_specs=per_b(n), out_shape=jax.ShapeDtypeStruct((B, n), jnp.float32),
                )(q, k, row_pos, k_pos, m, c)


def score_reduction_reference(q_win, k, q_pos, k_pos, row_weight):
    """Plain jnp: materialises [B, H, W, n] (the XLA path)."""
    H, hd, K = q_win.shape[1], q_win.shape[-1], k.shape[1]
    s = jnp.einsum("bkgwd,bknd->bkgwn", fold_heads(q_win, K), k, precision=precision(q_win.dtype),
                   preferred_element_type=jnp.float32) / math.sqrt(hd)
    vis = visible(k_pos[:, None, None, None, :], q_pos[:, None, None, :, None])
    m = jnp.max(jnp.where(vis, s, NEG), axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    p = p * safe_inv(jnp.sum(p, axis=-1, keepdims=True))
    return jnp.einsum("bkgwn,bw->bn", p, row_weight.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) / H


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def score_reduction(q_win, k, q_pos, k_pos, row_weight, *, impl: str = "auto", interpret: bool | None = None):
    """q_win [B, H, W, hd], k [B, K, n, hd], q_pos [B, W], k_pos [B, n] (-1 = padding), row_weight [B, W]
    (normalised; 0 for rows outside a sequence's window) -> scores [B, n] float32 (invisible keys score 0)."""
    if use_pallas(impl):
        return _score_reduction_pallas(q_win, k, q_pos, k_pos, row_weight, resolve_interpret(interpret))
    return score_reduction_reference(q_win, k, q_pos, k_pos, row_weight)


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
