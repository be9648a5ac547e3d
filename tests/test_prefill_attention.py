"""Prefill self-attention through `jax.nn.dot_product_attention` (cuDNN on a GPU, never [B, H, S, S]): its
causal mask with per-sequence lengths must equal pyrajax's position mask on ragged and pruned token sets. On
the CPU the call's "xla" implementation stands in for cuDNN: the same arguments, the same semantics."""
from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np

import pyrajax
from pyrajax import cache as kvc
from pyrajax import model

gen = importlib.import_module("pyrajax.generate")  # the module (`pyrajax.generate` is also the function)


def _pos(rows, T):
    out = np.full((len(rows), T), -1, np.int32)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return jnp.asarray(out)


def _qkv(rng, B, T, H=6, K=2, hd=16):
    return (jnp.asarray(rng.standard_normal((B, T, n, hd)), jnp.float32) for n in (H, K, K))


def test_lengths_mask_equals_the_position_mask_on_ragged_and_pruned_rows():
    rng = np.random.default_rng(0)
    T = 37  # odd, not a power of two
    # a full row, a ragged one (padding last), a pruned one (ascending positions with gaps), a single token
    rows = [np.arange(T), np.arange(20), np.sort(rng.choice(90, 25, replace=False)), np.array([0])]
    pos = _pos(rows, T)
    q, k, v = _qkv(rng, len(rows), T)
    want = np.asarray(model.attention(q, k, v, pos, pos))
    got = np.asarray(model.prefill_attention(q, k, v, pos, path="xla"))
    valid = np.asarray(pos >= 0)
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-6)
    assert np.all(got[~valid] == 0), "padding rows must come out as zeros"
    # The equivalence rests on prefill's order (ascending positions, padding last): out of order, it fails.
    shuffled = _pos([rows[0][::-1]], T)
    q1, k1, v1 = q[:1], k[:1], v[:1]
    assert not np.allclose(np.asarray(model.prefill_attention(q1, k1, v1, shuffled, path="xla")),
                           np.asarray(model.attention(q1, k1, v1, shuffled, shuffled)), atol=1e-3)


def test_the_cudnn_path_is_chosen_only_where_it_applies(monkeypatch):
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert model.prefill_attention_path("auto", bf16, False) == "masked"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert model.prefill_attention_path("auto", bf16, False) == "cudnn"
    assert model.prefill_attention_path("pallas", jnp.float16, False) == "cudnn"
    assert model.prefill_attention_path("xla", bf16, False) == "masked"  # impl="xla": XLA everywhere
    assert model.prefill_attention_path("auto", f32, False) == "masked"  # cuDNN has no fp32 flash attention
    assert model.prefill_attention_path("auto", bf16, True) == "masked"  # tensor parallel: XLA's partitioning


def test_prefill_with_the_lengths_mask_equals_the_position_mask(monkeypatch):
    """A whole pyramid prefill (hidden-state pruning from the middle layer, a ragged batch) with the lengths
    path keeps the same tokens and gives the same logits as with the position mask."""
    cfg = dataclasses.replace(pyrajax.preset("tiny"), num_layers=6)
    params = pyrajax.random_params(jax.random.key(0), cfg, scale=0.2)
    lens = (97, 180, 251)
    rng = np.random.default_rng(1)
    policy = kvc.cache_preset("pyramid-0.25:min_tokens=0")
    plan = kvc.make_plan(policy, 256, 16, cfg.num_layers, requests=tuple((n, 16) for n in lens))
    seq = kvc.make_seq_plan(plan, list(lens), 16)
    tokens = np.full((len(lens), plan.prompt_bucket), cfg.pad_id, np.int32)
    for b, n in enumerate(lens):
        tokens[b, :n] = rng.integers(0, cfg.vocab_size, n)
    assert np.any(np.asarray(seq.enter) < np.asarray(lens)[:, None]), "no hidden-state pruning: vacuous"

    def run(path):
        monkeypatch.setattr(gen, "prefill_attention_path", lambda *_: path)
        with jax.disable_jit():  # fresh traces: the path is read while tracing
            return gen.prefill(params, jnp.asarray(tokens), seq, plan=plan, cfg=cfg)

    (want, want_cache), (got, got_cache) = run("masked"), run("xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(want_cache.layers, got_cache.layers):
        assert np.array_equal(np.asarray(a.pos), np.asarray(b.pos))
