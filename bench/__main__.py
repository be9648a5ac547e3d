"""python -m bench {throughput,sweep,peer,plots,kernels,parity,profile,longrun,serve,ceilings,tp_plan} [ARGS...]:
one entry point for the benchmarks.

    python -m bench sweep --model llama2-7b --cache full paper budget-0.45
    python -m bench peer --model llama2-7b --mode static-compile
    python -m bench plots bench/results/sweep-llama2-7b-p512-n256.json
    python -m bench profile --model llama2-7b --runs full:1 budget-0.45:1 full:32 budget-0.45:32
    python -m bench longrun --calls 1000
    python -m bench serve --model llama2-7b --cache full budget-0.45 --slots 32 --rates 1 2 4 8 16
    python -m bench tp_plan --model llama2-70b --tp 2 4 8
"""
from __future__ import annotations

import importlib
import inspect
import runpy
import sys
from pathlib import Path

COMMANDS = {"throughput": "bench.throughput", "sweep": "bench.sweep", "peer": "bench.hf_peer",
            "plots": "bench.plots", "kernels": "bench.kernels", "parity": "bench.parity",
            "profile": "bench.profile", "longrun": "bench.longrun", "serve": "bench.serve",
            "ceilings": "bench.ceilings", "tp_plan": "bench.tp_plan"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    name, rest = COMMANDS[argv[0]], argv[1:]
    module = importlib.import_module(name)
    sys.argv = [f"python -m {name}", *rest]
    if not hasattr(module, "main"):  # a plain script
        runpy.run_path(str(Path(module.__file__)), run_name="__main__")
        return 0
    takes_argv = bool(inspect.signature(module.main).parameters)
    return (module.main(rest) if takes_argv else module.main()) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
