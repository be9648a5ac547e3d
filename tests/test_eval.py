"""The evaluation harness: perplexity against plain full-sequence logits, exact KV accounting, the needle
generator's placement, and agreement."""
from __future__ import annotations

import numpy as np
import pytest
import jax

import pyrajax
from pyrajax.cache import FAMILIES, PyramidConfig, make_plan
from pyrajax.eval import (INSTRUCTION, NEEDLE, QUESTION, agreement, compare, needle_prompts, perplexity,
                          ruler_requests)
from tests.conftest import SHARED_DATA

# protect_tail=0: on these 48-token prompts a protected tail would count inside the budget and exceed it
TINY_BUDGET = PyramidConfig(name="b", prefill_schedule="budget", gen_rule="budget", budget=0.6, min_tokens=0, gen_block=4,
                            recent_ratio=0.1, protect_tail=0)
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
                                  recent_ratio=0.1, protect_tail=0, **FAMILIES[f]) for f in FAMILIES if f != "budget"]


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
    # Adaptive head budgets allocate every KV head the ceiling's slots: up to head_ceiling x the budget.
    most = (policy.budget * (policy.head_ceiling if policy.adaptive else 1.0)
            if isinstance(policy, PyramidConfig) else 1.0)
    assert r["kv_fraction"] <= most
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
    # 64 + 16 tokens fit under the default floor: min_tokens=0 lets the budgets bite (and protect_tail=0 keeps a
    # protected tail, which counts inside the budget, from exceeding it on such short prompts)
    assert main(common + ["--policies", "full", "h2o-0.7:min_tokens=0,protect_tail=0"]) == 0
    assert main(common + ["--append", "--policies", "streaming-0.7:num_sinks=8,min_tokens=0,protect_tail=0"]) == 0
    res = json.loads(out.read_text())
    names = ["full", "h2o-0.7:min_tokens=0,protect_tail=0", "streaming-0.7:num_sinks=8,min_tokens=0,protect_tail=0"]
    assert list(res["results"]) == names and len(res["runs"]) == 2
    assert res["results"][names[2]]["config"]["num_sinks"] == 8
    assert all(r["ppl"]["kv_fraction"] <= (r["config"]["budget"] or 1.0) for r in res["results"].values())
    assert res["results"][names[1]]["ppl"]["kv_fraction"] < 1.0
    assert out.with_suffix(".png").stat().st_size > 0
    assert family("streaming-0.7:num_sinks=8") == "streaming:num_sinks=8" and family("h2o-0.45") == "h2o"


# ---------------------------------------------------------------------------------------------------------
# The quality grid

def test_prefill_flops():
    from pyrajax.eval import prefill_flops, prefill_flops_fraction
    cfg = pyrajax.preset("smollm2-135m")
    assert prefill_flops_fraction(cfg, "full", 2048) == 1.0
    # PyramidInfer prunes hidden states: deeper layers process fewer tokens
    assert prefill_flops_fraction(cfg, "budget-0.45", 2048) < 0.8
    assert prefill_flops_fraction(cfg, "paper", 2048) < 1.0
    # the others run the whole prompt through every layer, plus their scoring
    assert prefill_flops_fraction(cfg, "streaming-0.45", 2048) == 1.0  # recency: nothing to score
    for name in ("snapkv-0.45", "pyramidkv-0.45", "h2o-0.45"):
        assert 1.0 < prefill_flops_fraction(cfg, name, 2048) < 1.3, name
    # under the floor nothing is compressed: the full cache's programs run
    assert prefill_flops_fraction(cfg, "budget-0.45", 100, max_new=50) == 1.0
    # the full cache's count, written out: weights and the attention square per layer, then the LM head
    tiny = pyrajax.preset("tiny")
    D, F, H, K, hd, n = tiny.dim, tiny.ffn_dim, tiny.num_heads, tiny.num_kv_heads, tiny.head_dim, 100
    per_layer = 2 * n * (D * (H + 2 * K) * hd + H * hd * D + 3 * D * F) + 4 * n * n * hd * H
    assert prefill_flops(tiny, "full", n) == tiny.num_layers * per_layer + 2 * D * tiny.vocab_size


def test_grid_deadline_judges_by_the_last_row_of_the_task():
    import time
    from pyrajax.eval import _too_late
    rows = {("full", "needle"): dict(task="needle", seconds=30.0),
            ("full", "ppl-512"): dict(task="ppl-512", seconds=1.0)}
    now = time.monotonic()
    assert not _too_late(rows, "needle", now, None)
    assert _too_late(rows, "needle", now, 40.0)  # 30 s * 1.1 + 15 s margin
    assert not _too_late(rows, "ppl-512", now, 40.0)
    assert not _too_late(rows, "chat-exact", now, 40.0)  # never measured: it starts while there is time
    assert _too_late(rows, "chat-exact", now - 30, 40.0)  # but nothing starts in the last 15 s


ROW_KEYS = {"policy": str, "family": str, "budget": (float, int), "task": str, "length": int, "score": float,
            "higher_is_better": bool, "kv_fraction": float, "prefill_flops_fraction": float, "n": int}


def test_grid_smoke_writes_rows_and_plots(smol_dir, tmp_path):
    """`pyrajax eval grid --smoke` end to end (the first 2 layers of the real model, 2 RULER samples at 512
    tokens in both protocols, 2 chat prompts, short perplexity, one needle): the JSON has the required row
    shape, one PNG per task, and --append recomputes only what is missing."""
    import json
    from pyrajax.eval import grid_main
    if not (SHARED_DATA / "paul-graham-essays").is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA}")
    text = tmp_path / "text.txt"
    text.write_text((SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text()[:6000])
    out = tmp_path / "quality.json"
    common = ["--smoke", "--checkpoint", str(smol_dir), "--text", str(text), "--out", str(out), "--quiet"]
    assert grid_main(common + ["--tasks", "ppl", "ruler", "chat", "needle"]) == 0
    doc = json.loads(out.read_text())
    assert doc["env"]["complete"] and doc["env"]["platform"] == "cpu"
    rows = {(r["policy"], r["task"]): r for r in doc["rows"]}
    tasks = ["ppl-128", "ruler-aware", "ruler-agnostic", "chat-exact", "needle"]
    assert set(rows) == {(p, t) for p in ("full", "budget-0.45") for t in tasks}
    for r in doc["rows"]:
        for key, kind in ROW_KEYS.items():
            assert isinstance(r[key], kind), (r["policy"], r["task"], key, r[key])
        assert r["higher_is_better"] == (r["task"] != "ppl-128")
        assert 0 < r["kv_fraction"] <= 1.0 and r["kv_bytes"] > 0
        assert r["task"] == "ppl-128" or 0 <= r["score"] <= 100
    for t in tasks:
        assert rows[("full", t)]["kv_fraction"] == 1.0 and rows[("full", t)]["prefill_flops_fraction"] == 1.0
        assert (tmp_path / f"quality-{t}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for t in ("ruler-aware", "ruler-agnostic", "needle"):  # 512-token prompts: the budget bites
        assert rows[("budget-0.45", t)]["kv_fraction"] < 0.8
        assert rows[("budget-0.45", t)]["prefill_flops_fraction"] < 1.0
    aware = rows[("budget-0.45", "ruler-aware")]
    assert aware["n"] == 4 and set(aware["cells"]) == {"niah_single_1", "vt"}
    assert set(aware["cells"]["vt"]) == {"512"} and len(aware["cells"]["vt"]["512"]["scores"]) == 2
    # chat prompts fit under the floor: the policy runs the full cache's programs and matches it
    chat = rows[("budget-0.45", "chat-exact")]
    assert chat["score"] == 100.0 and chat["kv_fraction"] == 1.0 and chat["compressed_requests"] == 0

    # resume: a missing row is computed, the others are kept as they were
    doc["rows"] = [r for r in doc["rows"] if (r["policy"], r["task"]) != ("budget-0.45", "chat-exact")]
    out.write_text(json.dumps(doc))
    assert grid_main(common + ["--append", "--tasks", "chat", "--no-plots"]) == 0
    again = json.loads(out.read_text())
    assert len(again["env"]["runs"]) == 2 and len(again["rows"]) == len(rows)
    kept = {(r["policy"], r["task"]): r["seconds"] for r in again["rows"]}
    assert all(kept[k] == r["seconds"] for k, r in rows.items() if k != ("budget-0.45", "chat-exact"))
    assert ("budget-0.45", "chat-exact") in kept

    # merge: rows of another file (a worker's, its RULER row without the summary) join --out and are calibrated
    # by the full cache's cells there
    worker = [{k: v for k, v in r.items() if k not in ("score", "vs_full")} for r in again["rows"]
              if r["policy"] != "full"]
    (tmp_path / "worker.json").write_text(json.dumps(dict(env=again["env"], rows=worker)))
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps(dict(env=again["env"], rows=[r for r in again["rows"] if r["policy"] == "full"])))
    assert grid_main(["--checkpoint", str(smol_dir), "--merge", str(tmp_path / "worker.json"),
                      "--out", str(merged)]) == 0
    m = {(r["policy"], r["task"]): r for r in json.loads(merged.read_text())["rows"]}
    assert set(m) == set(kept)
    assert m[("budget-0.45", "ruler-aware")]["score"] == rows[("budget-0.45", "ruler-aware")]["score"]


def test_ruler_protocols_of_the_full_cache_equal_one_prompt(smol):
    """Under the full cache, the query-agnostic protocol (context prefilled, then the question forced through
    decode steps as a suffix) answers exactly as the one-turn prompt context + question does, and the
    query-aware protocol exactly as generating from its prompt directly."""
    from pyrajax.generate import GenerationConfig, bucket, generate
    from pyrajax.eval import ruler_eval
    from pyrajax.tasks.ruler import ESSAYS_DIR, ruler_samples
    if not any(ESSAYS_DIR.glob("*.txt")):
        pytest.skip(f"no essays in {ESSAYS_DIR}")
    params, cfg = smol
    tok = pyrajax.get_tokenizer(cfg)
    samples = ruler_samples(tok, "niah_single_1", 512, 2, seed=0)
    new = 8
    agnostic = ruler_eval(params, cfg, samples, "full", "agnostic", new, batch=2, progress=False)
    # Generating as many tokens as the agnostic run's question + answer gives the one-prompt run the same
    # cache shapes (programs compile once); its first `new` tokens are the answer to compare.
    T = bucket(max(len(s["question_ids"]) for s in samples) + new, 16)
    gcfg = GenerationConfig(model=cfg, max_new_tokens=T)
    one = generate(params, [s["context_ids"] + s["question_ids"] for s in samples], gcfg)
    assert agnostic["tokens"] == [t[:new] for t in one.tokens]
    assert all(t.startswith("The special magic number") for t in agnostic["texts"])  # real answers
    aware = ruler_eval(params, cfg, samples, "full", "aware", T, batch=2, progress=False)
    assert aware["tokens"] == generate(params, [s["aware_ids"] for s in samples], gcfg).tokens


def test_worker_argv_drops_what_the_parent_sets():
    from pyrajax.eval import _worker_argv
    argv = ["--tasks", "ppl", "chat", "--policies", "h2o-0.45", "budget-0.45:recency_weight=(1.0,1.0)",
            "--workers", "4", "--out", "x.json", "--deadline=100", "--append", "--ruler-n", "3", "--quiet"]
    assert _worker_argv(argv) == ["--tasks", "ppl", "chat", "--ruler-n", "3"]


def test_pyramid_sweep_ranks_by_rank_sum():
    from bench import pyramid_sweep as sw
    budgets = ["0.45", "256"]
    rows = [dict(policy="full", task="ppl-2048", score=10.0), dict(policy="full", task="ppl-512", score=20.0),
            dict(policy="full", task="ruler-aware", score=100.0)]
    # "newest-pool21" is best on every metric, "newest" second; "obs32-pool21" lacks a row and is not ranked
    quality = {"newest-pool21": (10.1, 20.2, 90.0), "newest": (10.3, 20.4, 60.0), "obs32-pool21": (10.0, 20.0, 99.0)}
    for v, (p2, p5, ra) in quality.items():
        for b in budgets:
            for task, s in (("ppl-2048", p2), ("ppl-512", p5), ("ruler-aware", ra)):
                if not (v == "obs32-pool21" and b == "256" and task == "ppl-512"):
                    rows.append(dict(policy=sw.policy_name(v, b), task=task, score=s))
    ranked = sw.rank(rows, budgets)
    assert [v for v, _, _ in ranked] == ["newest-pool21", "newest"]
    assert ranked[0][1] == 0 and ranked[1][1] == 6 and ranked[0][2] == 90.0
    assert sw.policy_name("obs32-pool21", "0.45") == "pyramid-0.45"  # the family itself: no empty override
    # ranked on fewer metrics, the variant without ppl-512 at 256 takes part (and wins)
    assert sw.rank(rows, budgets, metrics=(("ppl-2048", False), ("ruler-aware", True)))[0][0] == "obs32-pool21"


@pytest.mark.parametrize("argv, says", [
    (["grid", "--ruler-n", "0"], "--ruler-n: 0 is too small"),
    (["grid", "--policies", "budget-2.0"], "--policies"),
    (["grid", "--workers", "x"], "--workers: 'x' is not an int"),
    (["--context", "1"], "--context: 1 is too small"),
    (["--policies", "nope"], "unknown cache preset"),
])
def test_eval_cli_refuses_bad_arguments_before_loading(argv, says, capsys):
    from pyrajax.eval import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_ruler_requests_group_by_length_or_into_one_bucket():
    samples = [dict(aware_ids=[5] * n, context_ids=[5] * (n - 3), question_ids=[7, 8], max_new_tokens=30, length=n)
               for n in (512, 512, 1000)]
    by_length = ruler_requests(samples, "agnostic")
    assert [r["group"] for r in by_length] == [512, 512, 1000]
    assert [(len(r["prompt"]), r["suffix"], r["max_new"]) for r in by_length] == [(509, [7, 8], 30)] * 2 + [(997, [7, 8], 30)]
    one = ruler_requests(samples, "aware", new_tokens=16, one_bucket=True)
    assert len({r["group"] for r in one}) == 1 and [len(r["prompt"]) for r in one] == [512, 512, 1000]
    assert all(r["suffix"] == [] and r["max_new"] == 16 for r in one)
