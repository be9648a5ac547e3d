"""Fused projections (one wqkv and one w_gate_up matmul per layer) against the unfused maths, and the checkpoint
format, which stays unfused."""
from __future__ import annotations

import ast
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange

import pyrajax
import pyrajax.generate  # noqa: F401  (the module; `pyrajax.generate` the attribute is the function)
from pyrajax import model
from pyrajax.params import LAYER_FIELDS, fuse_layer, load_checkpoint, save_checkpoint

gen = sys.modules["pyrajax.generate"]

CFG = pyrajax.ModelConfig(vocab_size=128, dim=64, ffn_dim=96, num_layers=3, num_heads=8, num_kv_heads=2,
                          head_dim=8, max_positions=512)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# The unfused projections, written against the checkpoint's weights (the layer's views of them).
def unfused_qkv(lp, x, pos, cfg):
    h = model.rms_norm(x, lp.attn_norm, cfg.norm_eps)
    split = lambda w: rearrange(h @ w, "b t (n d) -> b t n d", d=cfg.head_dim)  # noqa: E731
    return (model.rope(split(lp.wq), pos, cfg.rope_theta), model.rope(split(lp.wk), pos, cfg.rope_theta),
            split(lp.wv))


def unfused_queries(lp, x, pos, cfg):
    return unfused_qkv(lp, x, pos, cfg)[0]


def unfused_mlp(lp, x):
    return (jax.nn.silu(x @ lp.w_gate) * (x @ lp.w_up)) @ lp.w_down


@pytest.fixture
def unfused(monkeypatch):
    """Run the engine with the unfused projections (jit caches cleared on both sides, so nothing compiled with
    one version is reused by the other)."""
    jax.clear_caches()
    monkeypatch.setattr(gen, "qkv", unfused_qkv)
    monkeypatch.setattr(gen, "queries", unfused_queries)
    monkeypatch.setattr(model, "qkv", unfused_qkv)
    monkeypatch.setattr(model, "mlp", unfused_mlp)
    yield
    jax.clear_caches()


@pytest.fixture(scope="module")
def params():
    return pyrajax.random_params(jax.random.key(11), CFG, scale=0.25)


def test_fused_layout_holds_the_checkpoint_weights(params):
    lp = params.layers[0]
    D, K, G, hd = CFG.dim, CFG.num_kv_heads, CFG.q_per_kv, CFG.head_dim
    assert lp.wqkv.shape == (D, K, G + 2, hd) and lp.w_gate_up.shape == (D, 2, CFG.ffn_dim)
    # per KV head k: its query heads k*G .. k*G+G-1, then its key, then its value
    for k in range(K):
        for g in range(G):
            h = k * G + g
            np.testing.assert_array_equal(lp.wqkv[:, k, g], lp.wq[:, h * hd:(h + 1) * hd])
        np.testing.assert_array_equal(lp.wqkv[:, k, G], lp.wk[:, k * hd:(k + 1) * hd])
        np.testing.assert_array_equal(lp.wqkv[:, k, G + 1], lp.wv[:, k * hd:(k + 1) * hd])
    # fusing the views again gives the same layer, also with copied KV heads (the tensor-parallel layout)
    weights = {f: getattr(lp, f) for f in LAYER_FIELDS}
    again = fuse_layer(weights, CFG)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(lp)):
        np.testing.assert_array_equal(a, b)
    copied = fuse_layer(weights, CFG, kv_copies=4)
    assert copied.wqkv.shape == (D, K * 4, G // 4 + 2, hd)
    for f in LAYER_FIELDS:
        np.testing.assert_array_equal(getattr(copied, f), getattr(lp, f), err_msg=f)


def test_fused_logits_equal_unfused(unfused, request):
    # scale 0.1: activations of a trained model's size; fp32 rounding alone then stays well below 1e-6
    params = pyrajax.random_params(jax.random.key(11), CFG, scale=0.1)
    toks = np.random.default_rng(0).integers(3, CFG.vocab_size, size=(3, 21))
    want = np.asarray(pyrajax.logits(params, toks, CFG))  # unfused (the fixture patched the model)
    jax.config.update("jax_enable_x64", True)
    try:  # the unfused maths in float64: what both fp32 paths approximate
        exact = np.asarray(pyrajax.logits(jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params),
                                          toks, CFG))
    finally:
        jax.config.update("jax_enable_x64", False)
    request.getfixturevalue("monkeypatch").undo()
    jax.clear_caches()
    got = np.asarray(pyrajax.logits(params, toks, CFG))
    assert rel_err(got, want) <= 1e-6
    assert rel_err(got, exact) <= 1.5 * rel_err(want, exact) + 1e-7  # fusing costs no accuracy
    # the KV-head copies of tensor parallelism compute the same logits
    copied = params.replace(layers=tuple(fuse_layer({f: getattr(lp, f) for f in LAYER_FIELDS}, CFG, kv_copies=2)
                                         for lp in params.layers))
    assert rel_err(pyrajax.logits(copied, toks, CFG), want) <= 1e-6


@pytest.mark.parametrize("cache", ["paper", "pyramid-0.45:min_tokens=0"])
def test_fused_generation_equals_unfused(params, unfused, request, cache):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, CFG.vocab_size, n).tolist() for n in (150, 61)]  # ragged, long enough to prune
    gcfg = pyrajax.GenerationConfig(model=CFG, max_new_tokens=20, cache=cache, stop_ids=())
    want = pyrajax.generate(params, prompts, gcfg)
    request.getfixturevalue("monkeypatch").undo()
    jax.clear_caches()
    got = pyrajax.generate(params, prompts, gcfg)
    assert got.tokens == want.tokens
    assert got.stats["lengths_at_end"] == want.stats["lengths_at_end"]
    if cache != "full":
        assert got.stats["compressed"] and got.stats["kv_fraction"] < 1


def test_save_writes_the_unfused_format(params, tmp_path):
    dst = save_checkpoint(params, CFG, tmp_path / "ck")
    meta = json.loads((dst / "params" / "_METADATA").read_text())["tree_metadata"]
    names = {ast.literal_eval(k) for k in meta}  # keys are tuple reprs: "('layers', '0', 'wq')"
    assert {("layers", "0", f) for f in LAYER_FIELDS} <= names
    assert not any("wqkv" in n or "w_gate_up" in n for key in names for n in key)
    loaded, cfg = load_checkpoint(dst, jnp.float32)
    assert cfg == CFG
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
