"""The ablation sweep that chooses the `pyramid` family's settings (the best-policy issue).

Each variant is a complete set of `PyramidConfig` overrides on the `pyramid-<B>` preset, so a row's policy name
says exactly what ran whatever `cache.FAMILIES["pyramid"]` holds at the time. The variants run inside the
quality grid (`pyrajax eval grid`, same tasks, same JSON rows) at the sweep budgets; `pick` ranks them there
and the winner becomes the family:

    python -m bench.pyramid_sweep policies --budgets 0.45 256          # names for `pyrajax eval grid --policies`
    python -m bench.pyramid_sweep pick --grid bench/results/quality-smollm2-135m-instruct.json --budgets 0.45 256
    python -m bench.pyramid_sweep report --grid ... --budgets 0.45 256 --out bench/results/sweep-pyramid-smollm2.json

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

# Today's family: accumulated attention (H2O) chooses, every token through the first third of the layers.
_ACC = "prune_from=0.3333,propagate=1.0,budget_profile='linear',scorer='accumulated',pool_kernel=1"
# SnapKV-style choice from the last 32 queries, pooled over 7 keys, with late hidden-state pruning.
_SNAP = ("prune_from=0.3333,propagate=1.0,budget_profile='linear',scorer='window',observe=32,pool_kernel=7,"
         "recency_weight=(1.0,1.0)")
VARIANTS = {
    "acc": _ACC,
    "snap": _SNAP,
    "snap-max": _SNAP + ",window_reduce='max'",
    "snap+acc": _SNAP + ",gen_scorer='accumulated'",
    "snap-max+acc+v": _SNAP + ",window_reduce='max',gen_scorer='accumulated',value_weighted=True",
    "snap+acc-p2": _SNAP.replace("propagate=1.0", "propagate=2.0") + ",gen_scorer='accumulated'",
    "snap+acc-late": _SNAP.replace("prune_from=0.3333", "prune_from=0.5") + ",gen_scorer='accumulated'",
    "snap+v": _SNAP + ",value_weighted=True",
}
# A fairness check, not a candidate: SnapKV with the same 32-query observation window the variants use.
CHECKS = {"snapkv-obs32": ("snapkv", "observe=32")}
METRICS = (("ppl-2048", False), ("ppl-512", False), ("ruler-aware", True))


def policy_name(variant: str, budget: str) -> str:
    return f"pyramid-{budget}:{VARIANTS[variant]}"


def policies(budgets: list[str]) -> list[str]:
    out = [policy_name(v, b) for b in budgets for v in VARIANTS]
    return out + [f"{fam}-{b}:{o}" for b in budgets for fam, o in CHECKS.values()]


def _scores(rows: list[dict], budgets: list[str]) -> dict:
    """{variant: {(budget, metric): value relative to full (ppl) or points (ruler)}} for complete variants."""
    by = {(r["policy"], r["task"]): r for r in rows}
    out = {}
    for v in VARIANTS:
        got = {}
        for b in budgets:
            for task, _ in METRICS:
                r, full = by.get((policy_name(v, b), task)), by.get(("full", task))
                if r is None or full is None or "score" not in r:
                    break
                got[(b, task)] = r["score"] if task.startswith("ruler") else r["score"] / full["score"]
        if len(got) == len(budgets) * len(METRICS):
            out[v] = got
    return out


def rank(rows: list[dict], budgets: list[str]) -> list[tuple[str, int, float]]:
    """(variant, rank sum, mean ruler-aware) best first, over the variants with every row present."""
    scores = _scores(rows, budgets)
    total = {v: 0 for v in scores}
    for b in budgets:
        for task, higher in METRICS:
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
    args = ap.parse_args(argv)
    if args.command == "policies":
        print("\n".join(policies(args.budgets)))
        return 0
    if args.grid is None:
        ap.error(f"{args.command} needs --grid")
    grid = json.loads(args.grid.read_text())
    ranked = rank(grid["rows"], args.budgets)
    if not ranked:
        print(f"no variant has every row of {args.budgets} x {[m for m, _ in METRICS]} in {args.grid}",
              file=sys.stderr)
        return 1
    if args.command == "pick":
        print(VARIANTS[ranked[0][0]])
        return 0
    names = set(policies(args.budgets))
    report = dict(env=grid["env"], budgets=args.budgets, metrics=[m for m, _ in METRICS], variants=VARIANTS,
                  checks=CHECKS, ranking=[dict(variant=v, rank_sum=s, ruler_aware_mean=r) for v, s, r in ranked],
                  chosen=ranked[0][0], rows=[r for r in grid["rows"] if r["policy"] in names or r["policy"] == "full"])
    out = args.out or Path("bench/results/sweep-pyramid-smollm2-135m-instruct.json")
    out.write_text(json.dumps(report, indent=1))
    for v, s, r in ranked:
        print(f"{v:>16}  rank sum {s:3d}  ruler-aware {r:5.1f}")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
