"""PNG plots from a sweep JSON (or, for the pyramid only, a throughput JSON).

    python -m bench.plots bench/results/sweep-llama2-7b-p512-n256.json [--out-dir DIR]

throughput_vs_batch.png: generated tok/s against batch, one curve per policy (its largest batch ringed, the
batch that ran out of memory marked x on the axis), the HF peers as points. pyramid_lengths.png: KV length per
layer for each policy (after prefill, at the end, and the layer's capacity), at the sweep's reference batch.
Runs anywhere matplotlib is installed (no GPU needed): plot on the workstation from the fetched JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as e:  # the GPU machine may lack it; the JSON is enough to plot elsewhere
    raise SystemExit(f"bench.plots needs matplotlib ({e}); plot from the JSON on a machine that has it") from None


def throughput_vs_batch(res: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, p in enumerate(res["settings"]["policies"]):
        ok = sorted((r for r in res["rows"] if r["policy"] == p and r["status"] == "ok"), key=lambda r: r["batch"])
        if not ok:
            continue
        color = f"C{i}"
        ax.plot([r["batch"] for r in ok], [r["tokens_per_second"] for r in ok], "o-", color=color, label=p)
        ax.plot(ok[-1]["batch"], ok[-1]["tokens_per_second"], "o", ms=13, mfc="none", color=color)
        bad = res["max_batch"][p].get("first_failing_batch")
        if bad and res["max_batch"][p]["limit"] == "oom":
            ax.plot(bad, 0, "x", ms=10, mew=2, color=color, clip_on=False)
    for j, r in enumerate(r for r in res["peers"] if r["status"] == "ok"):
        ax.plot(r["batch"], r["tokens_per_second"], "s^Dv"[j % 4], ms=9, color="k", mfc="none" if j else "k",
                label=f"HF {r['mode']}", linestyle="none")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch (x: out of memory)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{res['model']}, {res['prompt']}+{res['new']} tokens, {res.get('device')}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pyramid_lengths(rows: list[dict], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, r in enumerate(rows):
        color, label = f"C{i}", f"{r['policy']} ({r['kv_fraction']:.0%} KV)"
        layers = range(len(r["lengths_at_end"]))
        ax.plot(layers, r["lengths_after_prefill"], "-", color=color, label=f"{label}: after prefill")
        ax.plot(layers, r["lengths_at_end"], "--", color=color, label="at the end")
        ax.plot(layers, r["capacity_per_layer"], ":", color=color, alpha=0.7, label="capacity")
    ax.set_xlabel("layer")
    ax.set_ylabel("KV length (tokens, sequence 0)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=len(rows), loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def length_rows(res: dict) -> list[dict]:
    """One row per policy: the reference batch if it ran, else its largest batch."""
    if "runs" in res:  # a bench.throughput JSON
        return [dict(r, policy=r["cache"]) for r in res["runs"]]
    out = []
    for p in res["settings"]["policies"]:
        ok = [r for r in res["rows"] if r["policy"] == p and r["status"] == "ok"]
        ref = [r for r in ok if r["batch"] == res["settings"]["peer_batch"]]
        if ok:
            out.append((ref or sorted(ok, key=lambda r: r["batch"]))[-1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a bench.sweep (or bench.throughput) result")
    ap.add_argument("--out-dir", default=None, help="default: next to the JSON")
    args = ap.parse_args(argv)
    res = json.loads(Path(args.json).read_text())
    out = Path(args.out_dir) if args.out_dir else Path(args.json).parent
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if res.get("benchmark") == "sweep":
        throughput_vs_batch(res, out / "throughput_vs_batch.png")
        written.append(out / "throughput_vs_batch.png")
    rows = length_rows(res)
    if rows:
        batch = ", ".join(sorted({f"b{r.get('batch', res.get('batch'))}" for r in rows}))
        pyramid_lengths(rows, f"KV length per layer: {res['model']}, {res['prompt']}+{res['new']}, {batch}",
                        out / "pyramid_lengths.png")
        written.append(out / "pyramid_lengths.png")
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
