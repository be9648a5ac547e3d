"""The ablation sweep that chooses the `pyramid` family's settings (the best-policy issue).

Each variant is a set of `PyramidConfig` overrides on today's `pyramid-<B>` preset. The variants run inside the
quality grid (`pyrajax eval grid`, same tasks, same JSON rows) at the sweep budgets; `pick` ranks them there
(printing the winner's name) and the winner becomes the family:

    python -m bench.pyramid_sweep policies --budgets 0.45 256          # names for `pyrajax eval grid --policies`
    python -m bench.pyramid_sweep pick --grid bench/results/quality-smollm2-135m-instruct.json --budgets 0.45 256
    python -m bench.pyramid_sweep report --grid ... --budgets 0.25 0.45 0.6 256 512 \
        --metrics ppl-2048 ruler-aware --out bench/results/sweep-pyramid-smollm2-135m-instruct-scorer.json

Ranking: per sweep budget and metric (ppl-2048 and ppl-512 over the full cache's, lower is better; the
calibrated ruler-aware average, higher is better) each variant gets its rank among the variants; the lowest
rank sum wins, ties going to the higher ruler-aware average. Ranks, not a weighted sum, so that no scale
between perplexity ratios and RULER points has to be assumed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Overrides on today's `pyramid-<B>` (cache.FAMILIES["pyramid"]); "" is the family itself. A grid row keeps the
# name it ran under (`name_when_measured`, `measured_at`) when a family's defaults later change and the row is
# renamed to what it means under the new defaults. The sweep of the previous round (accumulated vs window scores,
# late pruning, propagation, value weighting) is recorded in bench/results/sweep-pyramid-smollm2-135m-instruct.json.
VARIANTS = {
    "obs32-pool21": "",  # the family: the last 32 queries' attention, max-pooled over 21 keys
    "newest-pool21": "observe=1",  # the newest query alone (TOVA's scorer), pooled over 21 keys
    "newest": "observe=1:pool_kernel=1",  # the newest query alone, no pooling (the family until aa33bfe)
}
# A fairness check, not a candidate: SnapKV pooled as widely as the family.
CHECKS = {"snapkv-pool21": ("snapkv", "pool_kernel=21")}
METRICS = (("ppl-2048", False), ("ppl-512", False), ("ruler-aware", True))


def policy_name(variant: str, budget: str) -> str:
    return f"pyramid-{budget}" + (f":{VARIANTS[variant]}" if VARIANTS[variant] else "")


def policies(budgets: list[str]) -> list[str]:
    out = [policy_name(v, b) for b in budgets for v in VARIANTS]
    return out + [f"{fam}-{b}:{o}" for b in budgets for fam, o in CHECKS.values()]


def _scores(rows: list[dict], budgets: list[str], metrics=METRICS) -> dict:
    """{variant: {(budget, metric): value relative to full (ppl) or points (ruler)}} for complete variants."""
    by = {(r["policy"], r["task"]): r for r in rows}
    out = {}
    for v in VARIANTS:
        got = {}
        for b in budgets:
            for task, _ in metrics:
                r, full = by.get((policy_name(v, b), task)), by.get(("full", task))
                if r is None or full is None or "score" not in r:
                    break
                got[(b, task)] = r["score"] if task.startswith("ruler") else r["score"] / full["score"]
        if len(got) == len(budgets) * len(metrics):
            out[v] = got
    return out


def rank(rows: list[dict], budgets: list[str], metrics=METRICS) -> list[tuple[str, int, float]]:
    """(variant, rank sum, mean ruler-aware) best first, over the variants with every row present."""
    scores = _scores(rows, budgets, metrics)
    total = {v: 0 for v in scores}
    for b in budgets:
        for task, higher in metrics:
            order = sorted(scores, key=lambda v: -scores[v][(b, task)] if higher else scores[v][(b, task)])
            for i, v in enumerate(order):
                total[v] += i
    ruler = {v: sum(scores[v][(b, "ruler-aware")] for b in budgets) / len(budgets) for v in scores}
    return sorted(((v, total[v], ruler[v]) for v in scores), key=lambda x: (x[1], -x[2]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pyramid_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["policies", "pick", "report"])
    ap.add_argument("--budgets", nargs="+", default=["0.45", "256"])
    ap.add_argument("--grid", type=Path, help="the quality grid JSON holding the variants' rows")
    ap.add_argument("--out", type=Path, help="report: the sweep JSON to write")
    ap.add_argument("--metrics", nargs="+", choices=[m for m, _ in METRICS], default=[m for m, _ in METRICS],
                    help="tasks ranked (a variant needs every one at every budget)")
    args = ap.parse_args(argv)
    if args.command == "policies":
        print("\n".join(policies(args.budgets)))
        return 0
    if args.grid is None:
        ap.error(f"{args.command} needs --grid")
    grid = json.loads(args.grid.read_text())
    metrics = [m for m in METRICS if m[0] in args.metrics]
    ranked = rank(grid["rows"], args.budgets, metrics)
    if not ranked:
        print(f"no variant has every row of {args.budgets} x {args.metrics} in {args.grid}",
              file=sys.stderr)
        return 1
    if args.command == "pick":
        print(ranked[0][0])
        return 0
    names = set(policies(args.budgets))
    report = dict(env=grid["env"], budgets=args.budgets, metrics=args.metrics, variants=VARIANTS,
                  checks=CHECKS, ranking=[dict(variant=v, rank_sum=s, ruler_aware_mean=r) for v, s, r in ranked],
                  chosen=ranked[0][0], rows=[r for r in grid["rows"] if r["policy"] in names or r["policy"] == "full"])
    out = args.out or Path("bench/results/sweep-pyramid-smollm2-135m-instruct-scorer.json")
    out.write_text(json.dumps(report, indent=1))
    for v, s, r in ranked:
        print(f"{v:>16}  rank sum {s:3d}  ruler-aware {r:5.1f}")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
