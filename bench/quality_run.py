"""The quality grid with the pyramid sweep in one run, as made on the H200 (one lease, parallel workers):

    python -m bench.quality_run --out /tmp/res/quality.json --deadline 1260 [--essays DIR --text FILE]

1. `pyrajax eval grid --workers N`: full, then every family and every sweep variant of `bench.pyramid_sweep`
   at the sweep budgets (0.45 and 256);
2. `bench.pyramid_sweep pick` ranks the variants on those rows;
3. the grid again (`--append`): the chosen variant, every family and `paper` at the other budgets.
The settings below are the grid's for this model on one GPU: compiling dominates, so lengths are few and the
samples many. Everything a phase did not reach before the deadline is listed by the grid as not started.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench import pyramid_sweep
from pyrajax.cache import FAMILIES

SWEEP_BUDGETS = ["0.45", "256"]
OTHER_BUDGETS = ["0.25", "512", "0.6", "128", "1024"]
GRID = ["--tasks", "ppl", "ppl-long", "ruler", "chat", "--ruler-protocols", "aware", "--ppl-lengths", "512",
        "--ppl-long-lengths", "2048", "--ppl-chunks", "32", "--ruler-lengths", "1000", "2000", "--ruler-n", "20",
        "--ruler-new-tokens", "48", "--chat-new-tokens", "48", "--dtype", "float32", "--impl", "xla",
        "--batch-tokens", "16384", "--quiet", "--no-plots"]


def families_at(budgets: list[str]) -> list[str]:
    return [f"{fam}-{b}" for b in budgets for fam in FAMILIES if fam != "pyramid"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality_run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline", type=float, default=1260.0, help="seconds for the whole run")
    ap.add_argument("--workers", type=int, default=8)  # 12 ran out of device memory autotuning (H200, aa33bfe)
    ap.add_argument("--commit")
    args, extra = ap.parse_known_args(argv)  # the rest goes to `pyrajax eval grid` (e.g. --essays DIR --text FILE)
    started = time.monotonic()
    grid = [sys.executable, "-m", "pyrajax.eval", "grid", *GRID, *extra, "--out", args.out,
            "--workers", str(args.workers)] + (["--commit", args.commit] if args.commit else [])
    left = lambda: str(max(args.deadline - (time.monotonic() - started), 1.0))

    sweep = pyramid_sweep.policies(SWEEP_BUDGETS)
    first = [p for b in SWEEP_BUDGETS for p in families_at([b]) + [s for s in sweep if f"-{b}:" in s]]
    subprocess.run(grid + ["--append", "--deadline", left(), "--policies", *first], check=False)
    pick = subprocess.run([sys.executable, "-m", "bench.pyramid_sweep", "pick", "--grid", args.out, "--budgets",
                           *SWEEP_BUDGETS], capture_output=True, text=True)
    chosen = pick.stdout.strip()
    print(f"chosen pyramid settings: {chosen or '(none: ' + pick.stderr.strip() + ')'}", flush=True)
    second = ([pyramid_sweep.policy_name(chosen, b) for b in OTHER_BUDGETS] if chosen else []) + ["paper"]
    second += families_at(OTHER_BUDGETS)
    subprocess.run(grid + ["--append", "--deadline", left(), "--policies", *second], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
