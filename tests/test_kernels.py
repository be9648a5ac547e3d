"""Pallas kernels vs their jnp references, in interpret mode on CPU, plus their CUDA (Triton) lowering.

Interpret mode fills every output buffer with NaN (ints: INT_MIN) before the kernel runs, so "no NaN / no
INT_MIN in the result" checks that the Pallas path writes every element it returns.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import random_positions
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.gather import pivotal_gather, pivotal_gather_reference
from pallas_kernels.score_reduction import (score_reduction, score_reduction_reference, window_rows,
                                            window_rows_reference)

F32, BF16 = jnp.float32, jnp.bfloat16
INT_MIN = np.iinfo(np.int32).min


def assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(got).any(), "NaN in a Pallas output (an element was never written)"
    tol = 1e-5 if dtype == F32 else 2e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1e-6))


def keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


# ----------------------------------------------------------------------------- score reduction
def score_inputs(seed, B, H, K, W, n, hd, dtype):
    kq, kk, kp, kw = keys(seed, 4)
    k_pos, last = random_positions(kp, B, n)
    k_pos = k_pos.at[0].set(-1)  # a fully padded sequence: scores 0, never NaN
    q_pos = last[:, None] - jnp.arange(W)[::-1]
    # The window is shorter than W for some sequences: rows outside it have weight 0.
    win = jnp.arange(W)[None, :] >= jax.random.randint(kw, (B, 1), 0, W // 2 + 1)
    rw = jnp.where(win, jnp.linspace(1.0, 1.2, W)[None, :], 0.0)
    rw = rw / rw.sum(1, keepdims=True)
    k = jax.random.normal(kk, (B, K, n, hd), dtype)
    k = jnp.where((k_pos < 0)[:, None, :, None], jnp.nan, k)  # padding slots may hold anything: never counted
    return jax.random.normal(kq, (B, H, W, hd), dtype), k, q_pos.astype(jnp.int32), k_pos, rw


@pytest.mark.parametrize("seed,B,H,K,W,n,hd,dtype", [
    (1, 2, 4, 4, 5, 37, 16, F32),    # G = 1
    (2, 3, 6, 2, 7, 100, 32, BF16),  # G = 3
    (3, 2, 8, 2, 9, 64, 16, F32),    # G = 4
    (4, 2, 8, 1, 17, 50, 32, BF16),  # G = 8, 136 query rows: two row blocks
])
def test_score_reduction(seed, B, H, K, W, n, hd, dtype):
    args = score_inputs(seed, B, H, K, W, n, hd, dtype)
    got = score_reduction(*args, impl="pallas", interpret=True)
    want = score_reduction_reference(*args)
    assert got.shape == (B, n) and got.dtype == F32
    assert_close(got, want, dtype)
    _, _, q_pos, k_pos, rw = args
    invisible = (k_pos < 0) | (k_pos > q_pos.max(1, keepdims=True))
    assert (np.asarray(got)[np.asarray(invisible)] == 0).all()
    assert (np.asarray(got[0]) == 0).all()
    # Each row with a visible key spreads its weight over the keys: the column sums add up to it.
    has_key = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    np.testing.assert_allclose(got.sum(1), (rw * has_key.any(-1)).sum(1), rtol=1e-4, atol=1e-6)


def rows_inputs(seed, B, H, K, W, n, hd, dtype):
    """window_rows inputs in the engine's layouts: q [B, W, H, hd], k [B, n, K, hd]."""
    kq, kk, kp, kw = keys(seed, 4)
    k_pos, last = random_positions(kp, B, n)
    k_pos = k_pos.at[0].set(-1)  # a fully padded sequence: all rows 0, never NaN
    q_pos = last[:, None] - jnp.arange(W)[::-1]
    # Sequences shorter than the window: their first rows are padding (-1).
    pad = jnp.arange(W)[None, :] < jax.random.randint(kw, (B, 1), 0, W // 2 + 1)
    q_pos = jnp.where(pad | (q_pos < 0), -1, q_pos).astype(jnp.int32)
    k = jax.random.normal(kk, (B, n, K, hd), dtype)
    k = jnp.where((k_pos < 0)[:, :, None, None], jnp.nan, k)  # padding slots may hold anything: never counted
    return jax.random.normal(kq, (B, W, H, hd), dtype), k, q_pos, k_pos


@pytest.mark.parametrize("seed,B,H,K,W,n,hd,dtype", [
    (21, 2, 4, 4, 9, 37, 16, F32),      # G = 1
    (22, 3, 6, 2, 13, 100, 32, BF16),   # G = 3
    (23, 2, 8, 2, 9, 100, 24, F32),     # G = 4, head dim not a power of two
    (24, 2, 8, 1, 13, 37, 32, BF16),    # G = 8
    (25, 1, 4, 2, 130, 37, 16, F32),    # two window blocks in pass 2, three row blocks in pass 1
])
def test_window_rows(seed, B, H, K, W, n, hd, dtype):
    args = rows_inputs(seed, B, H, K, W, n, hd, dtype)
    got = window_rows(*args, impl="pallas", interpret=True)
    want = window_rows_reference(*args)
    assert got.shape == (B, W, n) and got.dtype == F32
    assert_close(got, want, dtype)
    q, k, q_pos, k_pos = args
    vis = np.asarray((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None]))
    got = np.asarray(got)
    assert (got[~vis] == 0).all() and (got[0] == 0).all()
    # Each row is a mean of softmax rows: it sums to 1 if it sees a key, else it is all zeros.
    np.testing.assert_allclose(got.sum(-1), vis.any(-1).astype(np.float32), rtol=1e-4, atol=1e-6)
    # The selection scores from the rows match score mode (its layouts: heads / kv heads before tokens).
    rw = jax.random.uniform(keys(seed, 1)[0], (B, W))
    np.testing.assert_allclose(
        np.einsum("bw,bwn->bn", np.asarray(rw), got),
        score_reduction_reference(q.swapaxes(1, 2), k.swapaxes(1, 2), q_pos, k_pos, rw),
        rtol=1e-4 if dtype == F32 else 2e-2, atol=1e-5)


@pytest.mark.parametrize("seed,B,H,K,W,n,hd,dtype", [
    (31, 2, 6, 2, 9, 37, 16, F32),      # G = 3, odd lengths
    (32, 2, 8, 1, 13, 100, 24, BF16),   # G = 8, head dim not a power of two
    (33, 1, 4, 4, 130, 37, 16, F32),    # G = 1 (max = the head's own row), two window blocks
])
def test_window_rows_per_head(seed, B, H, K, W, n, hd, dtype):
    """Per-KV-head rows: the max over each kv head's query heads, every element written (NaN-filled outputs
    in interpret mode), padding keys poisoned with NaN (never read)."""
    args = rows_inputs(seed, B, H, K, W, n, hd, dtype)
    got = window_rows(*args, per_head=True, impl="pallas", interpret=True)
    want = window_rows_reference(*args, per_head=True)
    assert got.shape == (B, K, W, n) and got.dtype == F32
    assert_close(got, want, dtype)
    # Against the per-query-head probabilities written out here: the group max, and >= the head mean.
    q, k, q_pos, k_pos = args
    s = np.einsum("bwhd,bnhd->bhwn", np.asarray(q, np.float64),
                  np.repeat(np.nan_to_num(np.asarray(k, np.float64)), H // K, axis=2)) / np.sqrt(hd)
    vis = np.asarray((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None]))[:, None]
    with np.errstate(invalid="ignore"):  # rows that see no key: 0 / 0, then 0
        p = np.where(vis, np.exp(s - np.where(vis, s, -np.inf).max(-1, keepdims=True)), 0.0)
        p = np.nan_to_num(p / p.sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(got), p.reshape(B, K, H // K, W, n).max(2),
                               rtol=1e-4 if dtype == F32 else 3e-2, atol=1e-5 if dtype == F32 else 1e-2)
    mean = window_rows_reference(*args)
    assert (np.asarray(got).max(1) >= np.asarray(mean) - 1e-6).all()
    assert (np.asarray(got)[0] == 0).all()  # the fully padded sequence


def test_window_rows_dispatch():
    args = rows_inputs(26, 1, 2, 1, 3, 20, 16, F32)
    np.testing.assert_array_equal(window_rows(*args, impl="auto"), window_rows(*args, impl="xla"))
    with pytest.raises(ValueError):
        window_rows(*args, impl="triton")


# ----------------------------------------------------------------------------- gather
@pytest.mark.parametrize("seed,B,n,m,D,K,hd,dtype,with_k,with_v", [
    (5, 2, 100, 75, 96, 3, 32, BF16, True, True),    # three row blocks, odd widths
    (6, 3, 37, 20, 600, 1, 16, F32, False, False),   # hidden + pos only; two column chunks
    (7, 2, 64, 33, 64, 2, 24, F32, True, False),     # k only, head dim not a power of two
])
def test_pivotal_gather(seed, B, n, m, D, K, hd, dtype, with_k, with_v):
    ki, kh, kk, kv, kp = keys(seed, 5)
    idx = jnp.sort(jax.vmap(lambda r: jax.random.permutation(r, n)[:m])(jax.random.split(ki, B)), axis=1)
    hidden = jax.random.normal(kh, (B, n, D), dtype)
    pos = random_positions(kp, B, n)[0]
    k = jax.random.normal(kk, (B, K, n, hd), dtype) if with_k else None
    v = jax.random.normal(kv, (B, K, n, hd), dtype) if with_v else None
    got = pivotal_gather(idx.astype(jnp.int32), hidden, pos, k, v, impl="pallas", interpret=True)
    want = pivotal_gather_reference(idx, hidden, pos, k, v)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.shape == w.shape and g.dtype == w.dtype
            assert not np.isnan(np.asarray(g, np.float32)).any() and not (np.asarray(g) == INT_MIN).any()
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


# ----------------------------------------------------------------------------- decode attention
@pytest.mark.parametrize("seed,B,H,K,C,length,hd,dtype,block_c,splits", [
    (8, 2, 4, 4, 77, 60, 32, F32, 16, 2),      # G = 1, length < C
    (9, 3, 6, 2, 100, 100, 16, BF16, 32, 3),   # G = 3, full cache
    (10, 2, 8, 2, 64, 33, 16, F32, None, None),  # G = 4, default blocks
    (11, 2, 16, 2, 77, 5, 32, BF16, 16, 4),    # G = 8, a tiny length: most splits are empty
    (12, 2, 8, 8, 40, 0, 16, F32, 16, 2),      # empty cache: zeros, no NaN
])
def test_decode_attention(seed, B, H, K, C, length, hd, dtype, block_c, splits):
    kq, kk, kv, kp, kd = keys(seed, 5)
    k_pos, last = random_positions(kp, B, C)
    # Some sequences' new token precedes part of the cache (those slots must stay invisible).
    q_pos = last + jnp.where(jnp.arange(B) % 2 == 0, 1, -3)
    args = (jax.random.normal(kq, (B, H, hd), dtype), jax.random.normal(kk, (B, K, C, hd), dtype),
            jax.random.normal(kv, (B, K, C, hd), dtype), k_pos, q_pos.astype(jnp.int32), jnp.int32(length))
    want_out, want_prob = decode_attention_reference(*args)
    # Empty, invisible and beyond-length slots may hold anything (here NaN): they must never count.
    valid = (jnp.arange(C)[None] < length) & (k_pos >= 0) & (k_pos <= q_pos[:, None])
    poison = lambda x: jnp.where(valid[:, None, :, None], x, jnp.nan)
    args = (args[0], poison(args[1]), poison(args[2]), *args[3:])
    # All three paths see the poisoned cache and must agree with the clean reference.
    for out, prob in (decode_attention(*args, impl="pallas", interpret=True, block_c=block_c, num_splits=splits),
                      decode_attention(*args, impl="xla"), decode_attention_reference(*args)):
        assert out.shape == (B, H, hd) and out.dtype == dtype and prob.shape == (B, C) and prob.dtype == F32
        assert_close(out, want_out, dtype)
        assert_close(prob, want_prob, dtype)
        assert (np.asarray(prob)[~np.asarray(valid)] == 0).all()
        np.testing.assert_allclose(prob.sum(1), valid.any(1).astype(F32), rtol=1e-5)


@pytest.mark.parametrize("seed,B,H,K,C,length,hd,dtype,block_c,splits", [
    (41, 2, 6, 2, 77, 61, 16, F32, 16, 2),     # G = 3, odd capacity and length
    (42, 3, 8, 4, 100, 100, 24, BF16, 32, 3),  # G = 2, head dim not a power of two, full cache
    (43, 2, 4, 1, 45, 9, 16, F32, 16, 3),      # G = 4, K = 1, a short length: most splits empty
])
def test_decode_attention_per_head(seed, B, H, K, C, length, hd, dtype, block_c, splits):
    """Per-KV-head positions [B, K, C]: each kv head attends over its own slots (holes, padding and
    future tokens differ per head) and the probability row is the max over each head's query group."""
    kq, kk, kv, kp = keys(seed, 4)
    per_head = [random_positions(key, B, C, holes=0.3) for key in jax.random.split(kp, K)]
    k_pos = jnp.stack([p for p, _ in per_head], axis=1)  # [B, K, C]
    last = jnp.max(jnp.stack([l for _, l in per_head], axis=1), axis=1)
    q_pos = (last + jnp.where(jnp.arange(B) % 2 == 0, 1, -3)).astype(jnp.int32)
    q = jax.random.normal(kq, (B, H, hd), dtype)
    k, v = jax.random.normal(kk, (B, K, C, hd), dtype), jax.random.normal(kv, (B, K, C, hd), dtype)
    valid = (jnp.arange(C) < length) & (k_pos >= 0) & (k_pos <= q_pos[:, None, None])
    want_out, want_prob = decode_attention_reference(q, k, v, k_pos, q_pos, jnp.int32(length))
    # Each kv head's query group over that head's own slots, one head at a time with the shared-set layout.
    G = H // K
    for h in range(K):
        out_h, _ = decode_attention_reference(q[:, h * G:(h + 1) * G], k[:, h:h + 1], v[:, h:h + 1], k_pos[:, h],
                                              q_pos, jnp.int32(length))
        assert_close(want_out[:, h * G:(h + 1) * G], out_h, dtype)
    poison = lambda x: jnp.where(valid[..., None], x, jnp.nan)  # noqa: E731
    for out, prob in (decode_attention(q, poison(k), poison(v), k_pos, q_pos, jnp.int32(length), impl="pallas",
                                       interpret=True, block_c=block_c, num_splits=splits),
                      decode_attention_reference(q, poison(k), poison(v), k_pos, q_pos, jnp.int32(length))):
        assert out.shape == (B, H, hd) and prob.shape == (B, K, C) and prob.dtype == F32
        assert_close(out, want_out, dtype)
        assert_close(prob, want_prob, dtype)
        assert (np.asarray(prob)[~np.asarray(valid)] == 0).all()
        # The max over a group of G softmax rows sums to at least 1 (one row's mass) and at most G (all of it).
        total = np.asarray(prob).sum(-1)
        seen = np.asarray(valid.any(-1))
        assert (total[seen] >= 1 - 1e-5).all() and (total[seen] <= G + 1e-5).all() and (total[~seen] == 0).all()
    # One set per sequence is the per-head layout with every head holding it: the same output.
    shared = k_pos[:, 0]
    same = decode_attention_reference(q, k, v, jnp.repeat(shared[:, None], K, axis=1), q_pos, jnp.int32(length))
    np.testing.assert_array_equal(np.asarray(same[0], np.float32),
                                  np.asarray(decode_attention_reference(q, k, v, shared, q_pos,
                                                                        jnp.int32(length))[0], np.float32))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_nan_in_evicted_slot(impl):
    """NaN/Inf left in an evicted slot (pos -1) of k and v: the output equals that with zeros there (a
    regression: the XLA path used to mask only the probabilities, and 0 * NaN = NaN)."""
    B, H, K, C, hd, length = 1, 4, 2, 32, 16, 20
    kq, kk, kv = keys(15, 3)
    q, k, v = (jax.random.normal(kq, (B, H, hd)), jax.random.normal(kk, (B, K, C, hd)),
               jax.random.normal(kv, (B, K, C, hd)))
    pos = jnp.where(jnp.arange(C) < length, jnp.arange(C), -1)[None].astype(jnp.int32).at[0, 5].set(-1)
    run = lambda k, v: decode_attention(q, k, v, pos, jnp.array([length], jnp.int32), jnp.int32(length),
                                        impl=impl, interpret=True, block_c=16)
    want = run(k.at[0, :, 5].set(0.0), v.at[0, :, 5].set(0.0))
    for bad in (jnp.nan, jnp.inf):
        got = run(k.at[0, :, 5].set(bad), v.at[0, :, 5].set(bad))
        for g, w in zip(got, want):
            assert np.isfinite(np.asarray(g)).all()
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_decode_length_is_dynamic():
    """One compiled program serves every length (the cache fills during decoding)."""
    B, H, K, C, hd = 1, 4, 2, 48, 16
    kq, kk, kv = keys(13, 3)
    q, k, v = (jax.random.normal(kq, (B, H, hd)), jax.random.normal(kk, (B, K, C, hd)),
               jax.random.normal(kv, (B, K, C, hd)))
    pos, q_pos = jnp.arange(C, dtype=jnp.int32)[None], jnp.array([C], jnp.int32)
    step = jax.jit(functools.partial(decode_attention, impl="pallas", interpret=True, block_c=16))
    for length in (7, 16, 48):
        got = step(q, k, v, pos, q_pos, jnp.int32(length))
        assert_close(got[0], decode_attention_reference(q, k, v, pos, q_pos, length)[0], F32)
    assert step._cache_size() == 1


def test_dispatch():
    args = score_inputs(14, 1, 2, 1, 3, 20, 16, F32)
    np.testing.assert_array_equal(score_reduction(*args, impl="auto"), score_reduction(*args, impl="xla"))
    with pytest.raises(ValueError):
        score_reduction(*args, impl="triton")


# ----------------------------------------------------------------------------- CUDA lowering
def lower_for_cuda(fn, *specs):
    """Lower the Pallas path for CUDA on this CPU machine: the Triton custom call is generated (jax falls back to
    compute capability 9.0, i.e. an H100, when no GPU is present). Compile-time limits still need a GPU."""
    text = jax.jit(functools.partial(fn, impl="pallas", interpret=False)).trace(*specs).lower(
        lowering_platforms=("cuda",)).as_text()
    return text.count("__gpu$xla.gpu.triton")


S, I32 = jax.ShapeDtypeStruct, jnp.int32


@pytest.mark.parametrize("B,H,K,W,n,hd,dtype", [(32, 32, 32, 103, 512, 128, BF16), (2, 6, 2, 5, 37, 16, F32)])
def test_score_reduction_lowers_for_cuda(B, H, K, W, n, hd, dtype):
    specs = (S((B, H, W, hd), dtype), S((B, K, n, hd), dtype), S((B, W), I32), S((B, n), I32),
             S((B, W), F32))
    assert lower_for_cuda(score_reduction, *specs) == 2


@pytest.mark.parametrize("B,H,K,W,n,hd,dtype", [(32, 32, 32, 103, 512, 128, BF16),   # LLaMA-7B
                                                (32, 64, 8, 103, 512, 128, BF16),    # GQA, G = 8
                                                (2, 6, 2, 13, 37, 16, F32)])
def test_window_rows_lowers_for_cuda(B, H, K, W, n, hd, dtype):
    specs = (S((B, W, H, hd), dtype), S((B, n, K, hd), dtype), S((B, W), I32), S((B, n), I32))
    assert lower_for_cuda(window_rows, *specs) == 2
    assert lower_for_cuda(functools.partial(window_rows, per_head=True), *specs) == 2


@pytest.mark.parametrize("B,n,m,D,K,hd,dtype", [(32, 512, 460, 4096, 32, 128, BF16), (2, 37, 20, 600, 3, 24, F32)])
def test_gather_lowers_for_cuda(B, n, m, D, K, hd, dtype):
    specs = (S((B, m), I32), S((B, n, D), dtype), S((B, n), I32), S((B, K, n, hd), dtype), S((B, K, n, hd), dtype))
    assert lower_for_cuda(pivotal_gather, *specs) == 1
    assert lower_for_cuda(pivotal_gather, *specs[:3]) == 1


@pytest.mark.parametrize("B,H,K,C,hd,dtype", [(32, 32, 32, 4096, 128, BF16), (1, 64, 8, 1024, 128, BF16),
                                              (2, 6, 2, 77, 16, F32)])
def test_decode_lowers_for_cuda(B, H, K, C, hd, dtype):
    specs = (S((B, H, hd), dtype), S((B, K, C, hd), dtype), S((B, K, C, hd), dtype), S((B, C), I32),
             S((B,), I32), S((), I32))
    assert lower_for_cuda(decode_attention, *specs) == 1
    per_head = specs[:3] + (S((B, K, C), I32),) + specs[4:]
    assert lower_for_cuda(decode_attention, *per_head) == 1
