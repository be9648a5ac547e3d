"""bench.throughput: with several runs, each is measured in its own subprocess (peak memory is a per-process
high-water mark), and the parent merges them into the usual single JSON; bench.serve's load and summary."""
from __future__ import annotations

import json
import os

from bench import throughput

WORKLOAD = ["--model", "tiny", "--batch", "2", "--prompt", "8", "--new", "3", "--repeat", "1"]


def test_each_policy_in_its_own_process(tmp_path):
    out = tmp_path / "tp.json"
    assert throughput.main([*WORKLOAD, "--cache", "full", "paper", "--commit", "abc", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "throughput" and res["model"] == "tiny" and res["commit"] == "abc"
    assert res["params_bytes"] > 0 and res["device"]
    assert [r["cache"] for r in res["runs"]] == ["full", "paper"]
    pids = [r["pid"] for r in res["runs"]]
    assert len(set(pids)) == 2 and os.getpid() not in pids  # fresh peaks: no run inherits another's
    for r in res["runs"]:
        assert "peak_memory_bytes" in r and len(r["first_tokens"]) == 3 and r["roofline"]["tokens_per_second"] > 0


def test_single_policy_stays_in_process(tmp_path):
    out = tmp_path / "tp.json"
    assert throughput.main([*WORKLOAD, "--cache", "full", "--out", str(out)]) == 0
    assert [r["pid"] for r in json.loads(out.read_text())["runs"]] == [os.getpid()]


def test_rooflines_use_the_measured_ceilings(tmp_path):
    """The JSON records the ceilings measured at the start, and the roofline follows them: with twice the
    bandwidth and matmul rate, ideal time halves."""
    from bench import ceilings
    c = ceilings.measure()
    assert c["copy_bytes_per_second"] > 1e8 and c["matmul_flops_per_second"] > 1e8 and c["device"]
    out = tmp_path / "tp.json"
    assert throughput.main([*WORKLOAD, "--cache", "full", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    run = res["runs"][0]
    assert run["ceilings"] == res["ceilings"] and res["ceilings"]["copy_bytes_per_second"] > 0
    stats = dict(lengths_after_prefill=[[8] * 2] * 2, lengths_at_end=[[11] * 2] * 2)
    import pyrajax
    cfg = pyrajax.preset("tiny")
    ideal = lambda rate: throughput.roofline(cfg, 10**6, 2, 8, 3, stats, dict(copy_bytes_per_second=rate,  # noqa: E731
                                                                             matmul_flops_per_second=rate))
    slow, fast = ideal(1e9), ideal(2e9)
    assert abs(fast["tokens_per_second"] / slow["tokens_per_second"] - 2) < 1e-9


def test_serve_load_is_poisson_and_summarized():
    """bench serve's workload (Poisson arrivals, lengths in range) and its percentiles, without a server."""
    import argparse
    import numpy as np
    from bench.serve import requests_per_rate, summarize, workload
    args = argparse.Namespace(requests=2000, prompt_min=128, prompt_max=2048, new_min=64, new_max=512)
    assert requests_per_rate(args, 32) == 2000 and requests_per_rate(args, 1000) == 3000  # 3 per slot at least
    w = workload(args, rate=4.0, vocab=1000, seed=0, n=requests_per_rate(args, 32))
    times = np.array([t for t, _, _ in w])
    assert times[0] == 0 and np.all(np.diff(times) >= 0)
    assert abs(len(w) / times[-1] - 4.0) < 0.4  # mean rate
    assert all(128 <= len(p) <= 2048 and 64 <= n <= 512 for _, p, n in w)
    records = [dict(status=200, sent=0.0, first=0.5, last=0.5 + 0.01 * (n - 1), tokens=n) for n in (10, 20, 30)]
    records.append(dict(status=503, sent=0.0))
    s = summarize(records, [{"pyrajax_requests_running": 3.0, "pyrajax_kv_cache_live_bytes": 10.0}])
    assert s["ok"] == 3 and s["refused"] == 1 and s["output_tokens"] == 60
    assert abs(s["tpot_s"]["p50"] - 0.01) < 1e-9 and s["ttft_s"]["p99"] == 0.5 and s["slots_in_use_max"] == 3.0
