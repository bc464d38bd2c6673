#!/usr/bin/env python3
"""One PNG: GB/s against tensor size for each kvq variant and for torch.compile, with the measured
device-to-device copy bandwidth as a horizontal line.

Left: the paper's path, fp32 -> int8 with given per-channel scales (quantize_with_scales); right:
dequantize int8 -> fp32. kvq numbers come from kvq_bench JSON files (--paper covers every paper
shape and variant), torch.compile's from compare_torch.py's JSON.

    python3 bench/plot_results.py --kvq-json paper.json bench.json --torch-json torch.json --out plot.png
"""

import argparse
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

VARIANTS = ["naive", "tiled", "coarsened", "vectorized", "auto"]
# op/dtype/granularity/variant/shape, then Google Benchmark's /iterations:N/manual_time
NAME = re.compile(r"^(?P<op>\w+)/float/per_channel/(?P<variant>\w+)/T(?P<t>\d+)_D(?P<d>\d+)(/.*)?$")
PANELS = [("quantize_with_scales", "given", "quantize with given scales: fp32 -> int8, per-channel"),
          ("dequantize", "dequantize", "dequantize: int8 -> fp32, per-channel")]


def load_kvq(paths):
    """{(op, variant): {(t, d): (input MB, GB/s)}} and the copy bandwidth, from kvq_bench JSON files."""
    series, copy, l2 = {}, None, None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        ctx = data.get("context", {})
        copy = copy or float(ctx.get("copy_GBps", 0) or 0) or None
        l2 = l2 or float(ctx.get("l2_bytes", 0) or 0) or None
        for b in data.get("benchmarks", []):
            m = NAME.match(b.get("name", ""))
            if not m or "GB/s" not in b or b.get("run_type", "iteration") != "iteration":
                continue
            t, d = int(m["t"]), int(m["d"])
            series.setdefault((m["op"], m["variant"]), {})[(t, d)] = (t * d * 4 / 1e6, b["GB/s"])
    return series, copy, l2


def load_torch(path):
    """{torch op: {(t, d): (input MB, GB/s)}} for torch.compile on fp32."""
    out = {}
    if not path:
        return out
    with open(path) as f:
        data = json.load(f)
    for r in data.get("rows", []):
        if r.get("dtype") != "float" or r.get("layout", "matrix") != "matrix" or not r.get("compile_us") \
                or not r.get("bytes"):
            continue
        t, d = r["tokens"], r["channels"]
        out.setdefault(r["op"], {})[(t, d)] = (t * d * 4 / 1e6, r["bytes"] / (r["compile_us"] * 1e-6) / 1e9)
    return out


def draw(ax, points, label, **style):
    pts = sorted(points.values())
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=label, **style)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvq-json", nargs="+", required=True)
    ap.add_argument("--torch-json")
    ap.add_argument("--out", default="plot.png")
    args = ap.parse_args()

    kvq, copy, l2 = load_kvq(args.kvq_json)
    torch = load_torch(args.torch_json)
    if not kvq:
        print("plot_results.py: no fp32 per-channel kvq cases in the input; nothing to plot")
        return 1

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, (op, torch_op, title) in zip(axes, PANELS):
        for v in VARIANTS:
            draw(ax, kvq.get((op, v), {}), f"kvq {v}", linestyle="-" if v == "auto" else "--",
                 linewidth=2.5 if v == "auto" else 1.2)
        draw(ax, torch.get(torch_op, {}), "torch.compile", color="black", linestyle=":", linewidth=2)
        if copy:
            ax.axhline(copy, color="gray", linewidth=1)
            ax.annotate(f"device-to-device copy {copy:.0f} GB/s", (0.01, copy), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 4), fontsize=8, color="gray")
        if l2:
            ax.axvline(l2 / 1e6, color="gray", linewidth=0.8, linestyle=":")
            ax.annotate("L2", (l2 / 1e6, 0.02), xycoords=("data", "axes fraction"), textcoords="offset points",
                        xytext=(3, 0), fontsize=8, color="gray")
        ax.set_xscale("log")
        ax.set_xlabel("fp32 tensor size (MB, T x D x 4 bytes)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s (input + output + scales, decimal)")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, 0.93))
    fig.suptitle("kvq on the paper's shapes: bandwidth against tensor size (median of CUDA-event times, L2 flushed)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
