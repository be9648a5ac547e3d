"""bench.throughput: with several runs, each is measured in its own subprocess (peak memory is a per-process
high-water mark), and the parent merges them into the usual single JSON."""
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
    slow = throughput.roofline(cfg, 10**6, 2, 8, 3, stats, dict(copy_bytes_per_second=1e9, matmul_flops_per_second=1e9))
    fast = throughput.roofline(cfg, 10**6, 2, 8, 3, stats, dict(copy_bytes_per_second=2e9, matmul_flops_per_second=2e9))
    assert abs(fast["tokens_per_second"] / slow["tokens_per_second"] - 2) < 1e-9
