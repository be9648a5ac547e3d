"""The evaluation harness: perplexity against plain full-sequence logits, exact KV accounting, the needle
generator's placement, and agreement."""
from __future__ import annotations

import numpy as np
import pytest
import jax

import pyrajax
from pyrajax.cache import FAMILIES, PyramidConfig, make_plan
from pyrajax.eval import INSTRUCTION, NEEDLE, QUESTION, agreement, compare, needle_prompts, perplexity
from tests.conftest import SHARED_DATA

TINY_BUDGET = PyramidConfig(name="b", prefill_schedule="budget", gen_rule="budget", budget=0.6, min_tokens=0, gen_block=4,
                            recent_ratio=0.1)
CTX, CONT = 48, 24


@pytest.fixture(scope="module")
def tiny():
    cfg = pyrajax.preset("tiny")
    return pyrajax.random_params(jax.random.key(0), cfg, scale=0.2), cfg


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(0).integers(3, 256, size=3 * (CTX + CONT) + 10).astype(np.int32)


def test_full_perplexity_equals_logits_loss(tiny, stream):
    params, cfg = tiny
    # 3 chunks in batches of 2: the second batch carries a filler row that must not count.
    r = perplexity(params, cfg, stream, "full", CTX, CONT, batch_size=2, progress=False)
    assert r["n_chunks"] == 3 and r["scored_tokens"] == 3 * CONT
    chunks = stream[:3 * (CTX + CONT)].reshape(3, CTX + CONT)
    logp = np.asarray(jax.nn.log_softmax(pyrajax.logits(params, chunks, cfg), axis=-1), np.float64)
    # Position t predicts token t + 1: the continuation tokens CTX .. CTX+CONT-1.
    nll = -np.take_along_axis(logp[:, CTX - 1:-1], chunks[:, CTX:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(r["chunk_nll"], nll.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(r["ppl"], np.exp(nll.mean()), rtol=1e-5)
    assert r["kv_fraction"] == 1.0


FAMILY_POLICIES = [PyramidConfig(name=f, prefill_schedule="budget", gen_rule="budget", budget=0.6, min_tokens=0, gen_block=4,
                                  recent_ratio=0.1, **FAMILIES[f]) for f in FAMILIES if f != "budget"]


@pytest.mark.parametrize("policy", ["paper", TINY_BUDGET, *FAMILY_POLICIES],
                         ids=["paper", "budget", *(p.name for p in FAMILY_POLICIES)])
def test_kv_bytes_are_the_plan_capacities(tiny, stream, policy):
    params, cfg = tiny
    r = perplexity(params, cfg, stream, policy, CTX, CONT, max_chunks=2, progress=False)
    # perplexity prefills CTX - 1 tokens (bucket 64) and forces CONT + 1 through decode steps
    plan = make_plan(pyrajax.cache_preset(policy) if isinstance(policy, str) else policy, 64, CONT + 1,
                     cfg.num_layers, requests=((CTX - 1, CONT + 1),))
    per = cfg.kv_bytes_per_token_layer(4)  # float32
    assert r["capacity_per_layer"] == list(plan.capacity)
    assert r["kv_bytes_per_layer"] == [c * per for c in plan.capacity]
    assert r["kv_bytes"] == sum(plan.capacity) * per
    assert r["full_kv_bytes"] == cfg.num_layers * (64 + CONT + 1) * per
    assert r["kv_fraction"] <= (policy.budget if isinstance(policy, PyramidConfig) else 1.0)
    assert np.isfinite(r["ppl"])


def test_needle_is_where_it_says(smol_dir):
    if not (SHARED_DATA / "paul-graham-essays").is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA / 'paul-graham-essays'}")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smol_dir / "tokenizer")
    depths = (0, .25, .5, .75, 1.0)
    prompts = needle_prompts(tok, SHARED_DATA / "paul-graham-essays", lengths=(1024, 2048), depths=depths)
    assert len(prompts) == 10 and len({p["passkey"] for p in prompts}) == 10
    for p in prompts:
        assert p["n_tokens"] == len(p["ids"]) and abs(len(p["ids"]) - p["length"]) <= 0.05 * p["length"]
        assert abs(p["depth"] - p["requested_depth"]) <= 0.03
        text = tok.decode(p["ids"])
        needle = NEEDLE.format(key=p["passkey"])
        assert text.count(p["passkey"]) == 2 and text.count(needle) == 1
        start = text.index(INSTRUCTION.strip()) + len(INSTRUCTION.strip())
        end = text.rindex(QUESTION)
        rel = (text.index(needle) - start) / (end - start - len(needle))
        assert abs(rel - p["requested_depth"]) <= 0.03, (p["length"], p["requested_depth"], rel)


def test_agreement_of_full_with_itself(tiny):
    params, cfg = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (20, 33, 40)]
    r = agreement(params, cfg, prompts, "full", n=16, progress=False)
    assert r["agreement"] == 1.0 and r["per_prompt"] == [1.0] * 3
    assert r["first_divergence"] == [None] * 3


def test_compare():
    assert compare([1, 2, 3], [1, 2, 3]) == (1.0, None)
    assert compare([1, 2, 3, 4], [1, 5, 3, 4]) == (0.75, 1)
    assert compare([1, 2, 3], [1, 2]) == (1.0, 2)  # the shorter ended first


def test_eval_cli_appends_policies(smol_dir, tmp_path):
    """`pyrajax eval` end to end on the real model and a small text file: a second run with --append adds its
    policies to the same JSON (one curve per family in the PNG)."""
    import json
    from pyrajax.eval import family, main
    text = tmp_path / "text.txt"
    text.write_text((SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text()[:6000])
    out = tmp_path / "eval.json"
    common = ["--checkpoint", str(smol_dir), "--text", str(text), "--tasks", "ppl", "--context", "64",
              "--continuation", "16", "--max-chunks", "2", "--batch", "2", "--out", str(out)]
    # 64 + 16 tokens fit under the default floor: min_tokens=0 lets the budgets bite
    assert main(common + ["--policies", "full", "h2o-0.7:min_tokens=0"]) == 0
    assert main(common + ["--append", "--policies", "streaming-0.7:num_sinks=8,min_tokens=0"]) == 0
    res = json.loads(out.read_text())
    names = ["full", "h2o-0.7:min_tokens=0", "streaming-0.7:num_sinks=8,min_tokens=0"]
    assert list(res["results"]) == names and len(res["runs"]) == 2
    assert res["results"][names[2]]["config"]["num_sinks"] == 8
    assert all(r["ppl"]["kv_fraction"] <= (r["config"]["budget"] or 1.0) for r in res["results"].values())
    assert res["results"][names[1]]["ppl"]["kv_fraction"] < 1.0
    assert out.with_suffix(".png").stat().st_size > 0
    assert family("streaming-0.7:num_sinks=8") == "streaming:num_sinks=8" and family("h2o-0.45") == "h2o"
