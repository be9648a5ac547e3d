"""Per-device memory of a model under tensor parallelism, from shapes alone (no weights, no device memory):

    python -m bench tp_plan [--model llama2-70b] [--tp 2 4 8] [--batch 32 --prompt 512 --new 256]
                            [--cache full budget-0.45 pyramid-0.45]

The params are `jax.eval_shape`d in the layout `pyrajax.sharding` gives them at each TP (KV heads copied where
there are fewer than devices) and the engine's decode state for the batch (`generate`'s bucket and plan) is
`jax.eval_shape`d from prefill; each array's NamedSharding over a mesh of that many devices (fake CPU devices:
this process sets them itself) gives its per-device shard. KV is the K and V arrays, split over KV heads;
"other" is the rest of the cache, replicated on every device (positions, and the window rows / accumulated
scores that the pyramid and the baselines select by).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

TP_MAX = 8


def _fake_devices(n: int) -> None:
    """n CPU devices, set before jax starts its backends (the plan needs shardings, never a GPU)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_num_cpu_devices", n)


def plan_rows(model: str, tps: list[int], batch: int, prompt: int, new: int, caches: list[str]) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import pyrajax
    from pyrajax import cache as kvc
    from pyrajax import sharding as shd
    from pyrajax.engine import _state_shapes
    from pyrajax.generate import bucket
    from pyrajax.params import Params, fuse_layer, random_checkpoint_tree

    cfg = pyrajax.preset(model)
    S, T = bucket(prompt, 16), bucket(new, 16)
    rows = []
    for tp in tps:
        mesh = shd.make_mesh(tp=tp)
        lay = shd.layout(cfg, tp)

        def fused():  # the params pytree of this layout, abstractly
            tree = random_checkpoint_tree(jax.random.key(0), cfg, jnp.bfloat16)
            return Params(embed=tree["embed"], final_norm=tree["final_norm"], lm_head=tree.get("lm_head"),
                          layers=tuple(fuse_layer(tree["layers"][str(i)], cfg, lay.kv_copies)
                                       for i in range(cfg.num_layers)))
        shapes = jax.eval_shape(fused)
        specs = shd.param_specs(cfg, lay) if tp > 1 else jax.tree.map(lambda _: jax.sharding.PartitionSpec(), shapes)
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                              shd.named(mesh, specs))
        row = dict(model=model, tp=tp, kv_copies=lay.kv_copies, batch=batch, prompt=prompt, new=new,
                   weights_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)),
                   weights_bytes_per_device=shd.bytes_per_device(params), caches={})
        leaves, tree = jax.tree.flatten(shapes)
        for name in caches:
            policy = kvc.cache_preset(name)
            protected = kvc.protected_outside(policy, prompt)
            if not kvc.compresses(policy, prompt, new, cfg.num_layers, protected):
                policy = kvc.PyramidConfig.full()
            plan = kvc.make_plan(policy, S, T, cfg.num_layers, requests=((prompt, new, protected),))
            cache = _state_shapes((tree, tuple(leaves)), cfg, plan, plan, S, batch, "xla")
            sharded = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), cache,
                                   shd.named(mesh, shd.state_specs(cache, mesh)))
            kv = [(lc.k, lc.v) for lc in sharded.layers]
            row["caches"][name] = dict(
                kv_bytes=sum(a.size * a.dtype.itemsize for pair in kv for a in pair) // lay.kv_copies,
                kv_bytes_per_device=shd.bytes_per_device(kv),
                other_bytes_per_device=shd.bytes_per_device(sharded) - shd.bytes_per_device(kv),
                capacity_per_layer=list(plan.capacity))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table: GiB per device."""
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    names = list(rows[0]["caches"])
    head = ["TP", "weights / device"] + [f"{n} KV / device (+ replicated)" for n in names] + \
        [f"total with {names[-1]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        c = r["caches"]
        last = c[names[-1]]
        total = r["weights_bytes_per_device"] + last["kv_bytes_per_device"] + last["other_bytes_per_device"]
        cells = [str(r["tp"]), gib(r["weights_bytes_per_device"])]
        cells += [f"{gib(c[n]['kv_bytes_per_device'])} (+ {gib(c[n]['other_bytes_per_device'])})" for n in names]
        lines.append("| " + " | ".join(cells + [gib(total)]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-70b")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--cache", nargs="+", default=["full", "budget-0.45", "pyramid-0.45"])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args(argv)
    _fake_devices(max(args.tp))
    rows = plan_rows(args.model, args.tp, args.batch, args.prompt, args.new, args.cache)
    print(f"{args.model}, bf16, batch {args.batch}, {args.prompt} + {args.new} tokens: GiB per device")
    print(table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
