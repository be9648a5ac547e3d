"""A functional LLaMA: pure functions over the `Params` pytree.

Every token carries its original position (`pos`, int32, -1 for padding). Rotary embeddings and causal masks
are built from those positions, never from array indices, so the same code serves padded batches and pruned
(pyramid) token sets.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from jaxtyping import Array, Float, Int

from pyrajax.config import ModelConfig
from pyrajax.params import LayerParams, Params

NEG_INF = -1e30  # finite, so a row with no visible key gives a uniform softmax instead of NaN


def embed(params: Params, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    return jnp.take(params.embed, tokens, axis=0)


def rms_norm(x: Float[Array, "... D"], w: Float[Array, " D"], eps: float) -> Float[Array, "... D"]:
    # Same order of operations as HF's LlamaRMSNorm: normalise in float32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def rope(x: Float[Array, "B T N hd"], pos: Int[Array, "B T"], theta: float) -> Float[Array, "B T N hd"]:
    """Rotary embedding (rotate-half layout) at explicit per-token positions."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = pos.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def visible(q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"]) -> jax.Array:
    """[B, T, S] causal mask from original positions; padding keys (pos -1) are never visible."""
    return (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])


def attention(q: Float[Array, "B T H hd"], k: Float[Array, "B S K hd"], v: Float[Array, "B S K hd"],
              q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"]) -> Float[Array, "B T H hd"]:
    """Grouped-query attention with the mask built from positions (float32 softmax)."""
    K = k.shape[2]
    qg = rearrange(q, "b t (k g) d -> b k g t d", k=K)
    s = jnp.einsum("bkgtd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
    s = jnp.where(visible(q_pos, k_pos)[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->bkgtd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return rearrange(o, "b k g t d -> b t (k g) d")


def prefill_attention_path(impl: str, dtype, tensor_parallel: bool) -> str:
    """Which kernel runs a prefill's self-attention: "cudnn" (fused, never materialising [B, H, S, S]) on a
    GPU in half precision on one device, where cuDNN's flash attention applies; "masked" (`attention`)
    elsewhere, and always with impl="xla". cuDNN has no float32 flash attention, and the sharded path keeps
    XLA's partitioning of the einsums."""
    gpu = jax.default_backend() in ("gpu", "cuda")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if impl != "xla" and gpu and half and not tensor_parallel else "masked"


def prefill_attention(q: Float[Array, "B T H hd"], k: Float[Array, "B T K hd"], v: Float[Array, "B T K hd"],
                      pos: Int[Array, "B T"], path: str = "masked") -> Float[Array, "B T H hd"]:
    """Causal self-attention of a prefill's tokens, padding last. Prefill keeps each sequence's tokens as a
    prefix of its rows in ascending position (padding, pos -1, after them; pruning keeps that order), so the
    position mask equals an index-causal mask cut at the sequence's length, which is what `jax.nn.
    dot_product_attention` expresses with `is_causal` and per-sequence lengths ("cudnn", or "xla": the same
    semantics on any backend, for checks). Padding rows come out as zeros (never read; zeros keep them finite).
    path="masked": `attention`, from positions."""
    if path == "masked":
        return attention(q, k, v, pos, pos)
    lengths = jnp.sum(pos >= 0, axis=1).astype(jnp.int32)
    try:
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                         key_value_seq_lengths=lengths, implementation=path)
    except (NotImplementedError, ValueError, RuntimeError) as e:  # at trace time: no cuDNN, or a shape it refuses
        if path != "cudnn":
            raise
        import warnings
        warnings.warn(f"cuDNN prefill attention unavailable ({e}); using the masked XLA attention", stacklevel=2)
        return attention(q, k, v, pos, pos)
    return jnp.where((pos >= 0)[:, :, None, None], o, 0).astype(q.dtype)


def mlp(lp: LayerParams, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    gate_up = jnp.einsum("btd,dcf->btcf", x, lp.w_gate_up)  # one matmul for both: [B, T, 2, F]
    return (jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]) @ lp.w_down


def queries(lp: LayerParams, x: Float[Array, "B T D"], pos: Int[Array, "B T"], cfg: ModelConfig):
    """Rotated queries [B, T, H, hd] alone (the pyramid's window scoring recomputes them for W rows): the query
    columns of wqkv only."""
    q = jnp.einsum("btd,dkgh->btkgh", rms_norm(x, lp.attn_norm, cfg.norm_eps), lp.wqkv[:, :, :-2])
    return rope(rearrange(q, "b t k g h -> b t (k g) h"), pos, cfg.rope_theta)


def qkv(lp: LayerParams, x: Float[Array, "B T D"], pos: Int[Array, "B T"], cfg: ModelConfig):
    """Normalise, project (one fused matmul) and rotate: q [B,T,H,hd], k and v [B,T,K,hd] (k after RoPE, as
    cached). K here is the weights' (virtual) KV heads: K*kv_copies under tensor parallelism."""
    h = rms_norm(x, lp.attn_norm, cfg.norm_eps)
    y = jnp.einsum("btd,dkgh->btkgh", h, lp.wqkv)  # [B, T, K, G + 2, hd]: per KV head its queries, key, value
    q = rearrange(y[:, :, :, :-2], "b t k g h -> b t (k g) h")
    return rope(q, pos, cfg.rope_theta), rope(y[:, :, :, -2], pos, cfg.rope_theta), y[:, :, :, -1]


def finish_layer(lp: LayerParams, x, attn_out: Float[Array, "B T H hd"], cfg: ModelConfig):
    """Output projection, residual, MLP block and its residual."""
    x = x + rearrange(attn_out, "b t n d -> b t (n d)") @ lp.wo
    return x + mlp(lp, rms_norm(x, lp.mlp_norm, cfg.norm_eps))


def lm_logits(params: Params, x: Float[Array, "B T D"], cfg: ModelConfig) -> Float[Array, "B T V"]:
    h = rms_norm(x, params.final_norm, cfg.norm_eps)
    w = params.embed.T if params.lm_head is None else params.lm_head
    return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)


def forward(params: Params, tokens: Int[Array, "B T"], pos: Int[Array, "B T"], cfg: ModelConfig,
            between_layers=lambda x: x):
    """Full-sequence logits with no cache (the reference path for perplexity and checks). `between_layers`
    maps each layer's output (tensor parallelism pins it replicated there)."""
    x = embed(params, tokens)
    for lp in params.layers:
        q, k, v = qkv(lp, x, pos, cfg)
        x = between_layers(finish_layer(lp, x, attention(q, k, v, pos, pos), cfg))
    return lm_logits(params, x, cfg)
