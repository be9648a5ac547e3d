"""Helpers shared by the Pallas kernels: backend choice, Triton parameters, masked tiles, softmax steps.

Everything inside a kernel must lower through Triton, whose tensors have power-of-two shapes. So the kernels
always load power-of-two tiles and mask the tail against the true extent (`span`), instead of padding the big
arrays (K/V caches, hidden states) in the wrapper, which would cost a full copy.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Finite "minus infinity" for masked logits: exp(NEG - NEG) = 1 stays finite, so a row with no visible key
# never produces NaN; the visibility mask (not the value) decides what counts.
NEG = -1e30

H100_SMS = 132


# ----------------------------------------------------------------------------- dispatch
def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def use_pallas(impl: str) -> bool:
    if impl not in ("auto", "pallas", "xla"):
        raise ValueError(f"impl must be 'auto', 'pallas' or 'xla', got {impl!r}")
    return on_gpu() if impl == "auto" else impl == "pallas"


def resolve_interpret(interpret: bool | None) -> bool:
    return (not on_gpu()) if interpret is None else bool(interpret)


def num_sms() -> int:
    """Streaming multiprocessors of the current GPU (H100 count when unknown or on CPU)."""
    if on_gpu():
        return int(getattr(jax.devices()[0], "core_count", 0) or H100_SMS)
    return H100_SMS


def triton_params(num_warps: int, num_stages: int) -> dict:
    """`pallas_call` kwargs for Triton; the class was `TritonCompilerParams` in older jax, a dict before that."""
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if cls is None:
        return {"compiler_params": {"triton": {"num_warps": num_warps, "num_stages": num_stages}}}
    return {"compiler_params": cls(num_warps=num_warps, num_stages=num_stages)}


# ----------------------------------------------------------------------------- sizes
def pow2(x: int, lo: int = 16) -> int:
    """Smallest power of two >= max(x, lo) (Triton dot operands need >= 16 in each dim)."""
    return 1 << max(math.ceil(math.log2(max(x, 1))), int(math.log2(lo)))


def cdiv(a, b):
    return (a + b - 1) // b


# ----------------------------------------------------------------------------- in-kernel tiles
def span(start, size: int, limit):
    """Indices start..start+size-1 and the mask of those < limit (the tail of a non-power-of-two extent)."""
    idx = start + jnp.arange(size, dtype=jnp.int32)
    return idx, idx < limit


def load(ref, mask, other=0):
    """Masked load; masked lanes read `other` (never uninitialised memory, which is NaN in interpret mode)."""
    return plgpu.load(ref, mask=mask, other=other)


def store(ref, val, mask):
    plgpu.store(ref, val.astype(ref.dtype), mask=mask)


def load_tile(ref, lead, row0, row_mask, ncols: int, col_lim):
    """[len(row_mask), ncols] tile of ref[*lead, row0:, :]; zero (and not read) outside row_mask, cols < col_lim."""
    _, cmask = span(0, ncols, col_lim)
    view = ref.at[(*lead, pl.ds(row0, row_mask.shape[0]), pl.ds(0, ncols))]
    return load(view, row_mask[:, None] & cmask[None, :])


def store_tile(ref, lead, row0, val, row_mask, col_lim):
    _, cmask = span(0, val.shape[1], col_lim)
    view = ref.at[(*lead, pl.ds(row0, val.shape[0]), pl.ds(0, val.shape[1]))]
    store(view, val, row_mask[:, None] & cmask[None, :])


def precision(dtype):
    # float32 inputs: full IEEE products (Triton and XLA would otherwise use TF32); bf16 products are exact.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot_nt(a, b):
    """a [M, d] @ b[N, d]^T -> [M, N] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision(a.dtype),
                           preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """a [M, d] @ b[d, N] -> [M, N] float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision(a.dtype),
                           preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- softmax pieces
def visible(k_pos, q_pos):
    """Key slot visible to a query: a real slot (pos >= 0) not after the query. Callers broadcast."""
    return (k_pos >= 0) & (k_pos <= q_pos)


def online_softmax_step(m, l, s, vis):
    """One key block of a streaming softmax over rows of s [R, N] (float32).

    Returns the new running max/sum, p = exp(s - m_new) (0 where invisible) and the rescale factor of the
    previous partial results. Masking p by `vis` (not only s by NEG) keeps fully invisible rows at l = 0.
    """
    s = jnp.where(vis, s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
    return m_new, alpha * l + jnp.sum(p, axis=-1), p, alpha


def safe_inv(l):
    """1/l, and 0 for a row that saw no visible key (it contributes 0, never NaN)."""
    return jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)


def fold_heads(x, num_kv_heads: int):
    """[B, H, ...] -> [B, K, G, ...]: query head h = kv * G + g uses kv head h // G (a free reshape)."""
    b, h = x.shape[:2]
    return x.reshape(b, num_kv_heads, h // num_kv_heads, *x.shape[2:])


# ----------------------------------------------------------------------------- test inputs
def random_positions(key, batch: int, n: int, holes: float = 0.1):
    """k_pos [batch, n] as the engine's caches hold them: left padding (-1) of a random length per sequence
    (the last sequence has a single real slot), increasing original positions with gaps (pruned tokens), and
    a few -1 holes (evicted slots). Returns (k_pos, last position of each sequence [batch])."""
    kc, kg, kh = jax.random.split(key, 3)
    count = jax.random.randint(kc, (batch,), 1, n + 1).at[-1].set(1)
    slot = jnp.arange(n)[None, :]
    real = slot >= n - count[:, None]
    pos = jnp.cumsum(jnp.where(real, 1 + jax.random.randint(kg, (batch, n), 0, 3), 0), axis=1) - 1
    hole = jax.random.bernoulli(kh, holes, (batch, n)) & (slot < n - 1)
    k_pos = jnp.where(real & ~hole, pos, -1).astype(jnp.int32)
    return k_pos, pos[:, -1].astype(jnp.int32)
