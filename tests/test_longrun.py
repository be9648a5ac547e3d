"""A long run stays flat (the CI-sized version of `python -m bench longrun`): after one call per combination
of policy, prompt bucket and batch bucket, more calls compile nothing and leave no jax array behind."""
from __future__ import annotations

import jax

import pyrajax
from bench.longrun import long_run
from pyrajax.config import ModelConfig

CFG = ModelConfig(vocab_size=64, dim=32, ffn_dim=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                  max_positions=128)
H2O = "h2o-0.3:min_tokens=0,gen_block=4,protect_tail=4"  # compresses these short prompts


def test_long_run_is_flat():
    params = pyrajax.random_params(jax.random.key(0), CFG)
    report = long_run(params, CFG, calls=120, policies=["full", H2O], prompt_lens=[12, 40], batches=[1, 3],
                      new_tokens=4)
    assert report["compressed"] == {"full": False, H2O: True}  # each policy ran its own programs
    assert report["checks"] == dict(no_recompilation=True, live_arrays_flat=True, rss_flat=True), report
