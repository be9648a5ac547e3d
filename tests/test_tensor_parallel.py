"""Tensor parallelism on 8 fake CPU devices: TP = 2, 4, 8 against one device, token for token.

The device count is fixed when jax starts its backends, so this module runs itself in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the outer test below); the other test modules of the same
pytest process keep their one device. Inside, the tests compare sharded runs with the single-device run of the
same weights: two tiny GQA models, 2 KV heads (copied over 4 and 8 devices: the replicated-KV case) and 8 KV
heads (split at every TP).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEVICES = 8
INNER = os.environ.get("PYRAJAX_TP_WORKER") == "1"

if not INNER:
    def test_tensor_parallel_on_fake_cpu_devices():
        # LLVM's cheaper passes: compiles 2x faster on CPU (compiling is nearly all of these tests' time)
        flags = (f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true")
        env = dict(os.environ, PYRAJAX_TP_WORKER="1", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", __file__],
                           cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                           timeout=900)
        summary = r.stdout[-6000:] + r.stderr[-3000:]
        assert r.returncode == 0, summary
        passed = re.search(r"(\d+) passed", r.stdout)
        assert passed and int(passed.group(1)) >= 20 and "skipped" not in r.stdout, summary

else:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pyrajax
    from pyrajax import sharding as shd
    from pyrajax.engine import make_engine
    from pyrajax.generate import TRACE_COUNTS
    from pyrajax.params import load_checkpoint, save_checkpoint

    assert len(jax.devices()) == DEVICES, jax.devices()

    def tiny(kv_heads: int) -> pyrajax.ModelConfig:
        return pyrajax.ModelConfig(vocab_size=128, dim=64, ffn_dim=96, num_layers=2, num_heads=8,
                                   num_kv_heads=kv_heads, head_dim=8, max_positions=512)

    MODELS = {}

    def model(kv_heads: int):
        if kv_heads not in MODELS:
            cfg = tiny(kv_heads)
            MODELS[kv_heads] = pyrajax.random_params(jax.random.key(kv_heads), cfg, scale=0.25), cfg
        return MODELS[kv_heads]

    RNG = np.random.default_rng(0)
    PROMPTS = [RNG.integers(3, 128, n).tolist() for n in (150, 61, 97)]  # ragged: three lengths, one bucket
    # The paper's settings with a short window and small blocks: its generation rule cuts within 12 new tokens
    # (its cosine prefill schedule prunes nothing in 2 layers); the budget presets with no floor, so that these
    # short prompts are compressed.
    PAPER = "paper:recent_ratio=0.05,gen_block=4"
    POLICIES = ["full", PAPER, "pyramid-0.45:min_tokens=0", "snapkv-0.45:min_tokens=0"]

    def run(params, cfg, cache, impl="xla", prompts=PROMPTS, new=12):
        gcfg = pyrajax.GenerationConfig(model=cfg, max_new_tokens=new, cache=cache, stop_ids=(), impl=impl)
        return pyrajax.generate(params, prompts, gcfg)

    def local_shapes(x) -> set:
        return {tuple(s.data.shape) for s in x.addressable_shards}

    @pytest.mark.parametrize("kv_heads", [2, 8])
    @pytest.mark.parametrize("tp", [2, 4, 8])
    def test_layout_puts_each_device_its_share(kv_heads, tp):
        params, cfg = model(kv_heads)
        mesh = pyrajax.make_mesh(tp=tp)
        sharded = pyrajax.shard(params, cfg, mesh)
        assert shd.mesh_of(sharded) is mesh and shd.mesh_of(params) is None
        copies = max(1, tp // kv_heads)
        lp = sharded.layers[0]
        assert lp.kv_copies == copies
        D, hd, F, V = cfg.dim, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
        G = cfg.q_per_kv // copies
        assert lp.wqkv.shape == (D, kv_heads * copies, G + 2, hd)
        assert local_shapes(lp.wqkv) == {(D, kv_heads * copies // tp, G + 2, hd)}  # whole KV-head groups
        assert local_shapes(lp.wo) == {(cfg.num_heads * hd // tp, D)}
        assert local_shapes(lp.w_gate_up) == {(D, 2, F // tp)} and local_shapes(lp.w_down) == {(F // tp, D)}
        assert local_shapes(sharded.embed) == {(V // tp, D)} and local_shapes(sharded.lm_head) == {(D, V // tp)}
        assert local_shapes(lp.attn_norm) == {(D,)}
        assert all(len({s.device for s in x.addressable_shards}) == tp for x in jax.tree.leaves(sharded))
        # the checkpoint views drop the copies again: the same weights as on one device
        for f in ("wq", "wk", "wv", "w_gate", "w_up"):
            np.testing.assert_array_equal(getattr(lp, f), getattr(params.layers[0], f), err_msg=f)

    @pytest.mark.parametrize("kv_heads", [2, 8])
    def test_logits_equal_single_device(kv_heads):
        params, cfg = model(kv_heads)
        toks = RNG.integers(3, 128, size=(3, 37))
        want = np.asarray(pyrajax.logits(params, toks, cfg))
        for tp in (2, 4, 8):
            got = pyrajax.logits(pyrajax.shard(params, cfg, pyrajax.make_mesh(tp=tp)), toks, cfg)
            assert got.sharding.mesh.shape["tp"] == tp
            assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max(), tp

    # Compiling is nearly all of the time here, so the 8-KV-head model (split over heads at every TP: 4 heads a
    # device at TP 2, one at TP 8) skips TP 4; the 2-KV-head model runs all three (split, 2 and 4 copies).
    @pytest.mark.parametrize("cache", POLICIES)
    @pytest.mark.parametrize("kv_heads,tps", [(2, (2, 4, 8)), (8, (2, 8))])
    def test_greedy_tokens_equal_single_device(kv_heads, tps, cache):
        params, cfg = model(kv_heads)
        want = run(params, cfg, cache)
        assert want.stats["tp"] == 1 and want.stats["compressed"] == (cache != "full")
        for tp in tps:
            got = run(pyrajax.shard(params, cfg, pyrajax.make_mesh(tp=tp)), cfg, cache)
            assert got.tokens == want.tokens, (tp, cache)
            # the same selections and evictions on every device: the same cache lengths, layer by layer
            assert got.stats["lengths_after_prefill"] == want.stats["lengths_after_prefill"], (tp, cache)
            assert got.stats["lengths_at_end"] == want.stats["lengths_at_end"], (tp, cache)
            assert got.stats["kv_bytes"] == want.stats["kv_bytes"] and got.stats["tp"] == tp
            # each device holds its KV heads: 1/tp of the model's, or one whole copied head
            heads_per_device = max(kv_heads // tp, 1)
            assert got.stats["kv_bytes_per_device"] * kv_heads == want.stats["kv_bytes"] * heads_per_device

    def test_per_head_selection_is_refused_under_tensor_parallelism():
        params, cfg = model(2)
        with pytest.raises(ValueError, match="per_head cache selection does not run tensor-parallel"):
            run(pyrajax.shard(params, cfg, pyrajax.make_mesh(tp=2)), cfg, "snapkv-0.45:min_tokens=0:per_head=true")

    def test_engine_state_is_split_over_kv_heads_and_compiles_once_per_bucket():
        params, cfg = model(2)
        mesh = pyrajax.make_mesh(tp=4)
        sharded = pyrajax.shard(params, cfg, mesh)
        policy = pyrajax.cache_preset("pyramid-0.45:min_tokens=0")
        engine = make_engine(sharded, cfg, [policy], slots=2, max_prompt=64, max_new=16)
        lc = engine.state.cache.layers[0]
        assert lc.k.sharding.spec == jax.sharding.PartitionSpec(None, "tp")
        assert local_shapes(lc.k) == {(2, 1, lc.k.shape[2], cfg.head_dim)}  # 4 copies of 2 heads: 1 per device
        assert lc.pos.sharding.is_fully_replicated and engine.state.token.sharding.is_fully_replicated
        # generate: a second batch of the same bucket (other prompts, lengths and step counts) compiles nothing
        prompts = [RNG.integers(3, 128, n).tolist() for n in (40, 33)]
        run(sharded, cfg, policy, prompts=prompts, new=10)
        before = dict(TRACE_COUNTS)
        again = run(sharded, cfg, policy, prompts=[RNG.integers(3, 128, n).tolist() for n in (35, 47)], new=7)
        assert dict(TRACE_COUNTS) == before and all(len(t) == 7 for t in again.tokens)

    def test_pallas_kernels_run_inside_shard_map():
        # interpret-mode Pallas on CPU: the kernels that GPUs run, per device on its heads (TP 4: 2 KV heads
        # copied twice, each device one head and 2 of its 4 query heads)
        params, cfg = model(2)
        prompts = PROMPTS[1:]
        # all four kernels: window rows, accumulated scores (decode eviction), both gathers
        cache = "pyramid-0.45:min_tokens=0:gen_scorer=accumulated"
        want = run(params, cfg, cache, impl="pallas", prompts=prompts, new=8)
        assert want.stats["compressed"]
        got = run(pyrajax.shard(params, cfg, pyrajax.make_mesh(tp=4)), cfg, cache, impl="pallas", prompts=prompts,
                  new=8)
        assert got.tokens == want.tokens and got.stats["lengths_at_end"] == want.stats["lengths_at_end"]

    def test_kernels_inside_shard_map_lower_for_cuda(monkeypatch):
        # The compiled (Triton) path of every shard-mapped kernel at TP 4, lowered for CUDA on this CPU host: each
        # device runs the Pallas call on its own heads, and only the head-averaged rows cross devices (one psum).
        import functools
        import pallas_kernels._common as common
        monkeypatch.setattr(common, "on_gpu", lambda: True)
        S, I32, BF, F32 = jax.ShapeDtypeStruct, jnp.int32, jnp.bfloat16, jnp.float32
        B, H, K, C, hd, W, n, m, D = 4, 8, 4, 96, 64, 13, 80, 40, 512
        cases = {  # name: (function, argument shapes, Pallas calls, all-reduces)
            "decode_attention": (shd.decode_attention, (S((B, H, hd), BF), S((B, K, C, hd), BF), S((B, K, C, hd), BF),
                                                        S((B, C), I32), S((B,), I32), S((), I32)), 1, 1),
            "window_rows": (shd.window_rows, (S((B, W, H, hd), BF), S((B, n, K, hd), BF), S((B, W), I32),
                                              S((B, n), I32)), 2, 1),
            "score_reduction": (shd.score_reduction, (S((B, H, W, hd), BF), S((B, K, n, hd), BF), S((B, W), I32),
                                                      S((B, n), I32), S((B, W), F32)), 2, 1),
            "gather_hidden": (shd.gather_hidden, (S((B, m), I32), S((B, n, D), BF), S((B, n), I32)), 1, 0),
            "gather_kv": (shd.gather_kv, (S((B, m), I32), S((B, n, K, hd), BF), S((B, n, K, hd), BF),
                                          S((B, n), I32)), 1, 0),
        }
        mesh = pyrajax.make_mesh(tp=4)
        for name, (fn, specs, calls, reduces) in cases.items():
            text = jax.jit(functools.partial(fn, impl="pallas", mesh=mesh)).trace(*specs).lower(
                lowering_platforms=("cuda",)).as_text()
            got = (text.count("__gpu$xla.gpu.triton"), text.count("all_reduce"), text.count("all_gather"))
            assert got == (calls, reduces, 0), (name, got)

    def test_unsharded_checkpoint_restores_into_shards(tmp_path):
        params, cfg = model(2)
        save_checkpoint(params, cfg, tmp_path / "ck")  # written from one device, as the converters do
        mesh = pyrajax.make_mesh(tp=4)
        loaded, got_cfg = pyrajax.load(tmp_path / "ck", dtype="float32", mesh=mesh)
        assert got_cfg == cfg and shd.mesh_of(loaded) is mesh
        want = pyrajax.shard(params, cfg, mesh)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
            assert a.sharding == b.sharding and local_shapes(a) == local_shapes(b)
            assert len(a.addressable_shards) == 4 and len({s.device for s in a.addressable_shards}) == 4
            np.testing.assert_array_equal(a, b)
        lp = loaded.layers[1]
        assert local_shapes(lp.wqkv) == {(cfg.dim, 1, 4 // 2 + 2, cfg.head_dim)}  # a copied head and its queries
        assert local_shapes(loaded.embed) == {(cfg.vocab_size // 4, cfg.dim)}
        # in another dtype (cast on the devices) and in use
        bf16, _ = load_checkpoint(tmp_path / "ck", jnp.bfloat16, mesh=mesh)
        assert bf16.layers[0].wqkv.dtype == jnp.bfloat16 and local_shapes(bf16.layers[0].wqkv) == local_shapes(lp.wqkv)
        assert run(loaded, cfg, "full", prompts=PROMPTS[1:], new=6).tokens == \
            run(params, cfg, "full", prompts=PROMPTS[1:], new=6).tokens

    def test_damaged_checkpoint_is_refused_before_sharding(tmp_path):
        params, cfg = model(8)
        bad = params.layers[1].replace(wo=params.layers[1].wo.at[0, 0].set(jnp.nan))
        save_checkpoint(params.replace(layers=(params.layers[0], bad)), cfg, tmp_path / "bad")
        with pytest.raises(ValueError, match=r"weight layers\.1\.wo in .* holds 1 NaN and 0 infinite values"):
            pyrajax.load(tmp_path / "bad", mesh=pyrajax.make_mesh(tp=2))

    def test_70b_plan_per_device_bytes():
        from bench.tp_plan import plan_rows, table
        rows = plan_rows("llama2-70b", [2, 4, 8], 32, 512, 256, ["full", "pyramid-0.45"])
        cfg = pyrajax.preset("llama2-70b")
        L, D, F, V, hd, K = cfg.num_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim, cfg.num_kv_heads
        matrices = 2 * V * D + L * (D * (cfg.num_heads + 2 * K) * hd + cfg.num_heads * hd * D + 3 * D * F)
        norms = (2 * L + 1) * D
        full_kv = 2 * L * 32 * K * (512 + 256) * hd * 2
        for r in rows:
            tp = r["tp"]
            assert r["weights_bytes"] == 2 * (matrices + norms)
            assert r["weights_bytes_per_device"] == 2 * (matrices // tp + norms)  # norms replicated
            full, pyramid = r["caches"]["full"], r["caches"]["pyramid-0.45"]
            assert full["kv_bytes"] == full_kv and full["kv_bytes_per_device"] == full_kv // tp
            assert pyramid["kv_bytes_per_device"] == pyramid["kv_bytes"] // tp < 0.5 * full_kv // tp
        assert "| 8 | 16.06 |" in table(rows)  # 128.5 GiB of bf16 weights over 8 devices

    def test_bench_throughput_runs_split(tmp_path):
        import json

        from bench import throughput
        out = tmp_path / "tp.json"
        assert throughput.main(["--model", "tiny", "--batch", "2", "--prompt", "16", "--new", "3", "--repeat", "1",
                                "--cache", "full", "--tp", "2", "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        run = res["runs"][0]
        assert res["tp"] == run["tp"] == 2 and len(run["peak_memory_bytes_per_device"]) == 2
        assert res["params_bytes_per_device"] < res["params_bytes"] and run["kv_bytes_per_device"] * 2 == run["kv_bytes"]
        assert run["roofline"]["tokens_per_second"] > 0
