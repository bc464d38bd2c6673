#!/usr/bin/env python3
"""Draw the accuracy plot: attention-output error per layer for every int8 scheme.

Reads the per-layer CSV written by `kvq_accuracy --data DIR --csv FILE` and writes one PNG with three
panels sharing the layer axis: K quantized (V exact), V quantized (K exact, with the attention mass on
token 0 as grey bars), and K and V both quantized. With --keep-csv (a `kvq_accuracy --keep 1` run),
the recommended pair and per-channel V are also drawn with token 0 kept in fp16. A scheme whose
numbers equal another's (per-token in groups of 128 channels when head_dim <= 128) is drawn once.

    python bench/accuracy/plot_accuracy.py smollm2.csv bench/results/accuracy.png \
        --keep-csv smollm2_keep1.csv --title "SmolLM2-135M"
"""
import argparse
import csv
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCHEMES = [  # id, label, colour, line style
    ("tok", "per-token", "tab:blue", "-"),
    ("tok32", "per-token, 32 ch", "tab:cyan", "--"),
    ("tok128", "per-token, 128 ch", "tab:purple", ":"),
    ("ch", "per-channel, whole seq.", "tab:red", "-"),
    ("ch32", "per-channel, 32 tok", "tab:orange", "--"),
    ("ch128", "per-channel, 128 tok", "tab:green", "-"),
]
PAIRS = [("K ch128 + V tok", "K per-channel 128 tok + V per-token", "black", "-"),
         ("K tok32 + V tok", "K per-token 32 ch + V per-token", "tab:gray", "--")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("png")
    ap.add_argument("--keep-csv", help="kvq_accuracy --keep 1 output: adds the token-0-in-fp16 curves")
    ap.add_argument("--title", default="")
    args = ap.parse_args()

    def load(path):
        series = defaultdict(dict)  # config -> layer -> output error
        sink = {}
        for r in csv.DictReader(open(path, newline="")):
            layer = int(r["layer"])
            series[r["config"]][layer] = float(r["output_error"])
            sink[layer] = float(r["sink_attention"])
        return series, sink

    series, sink = load(args.csv)
    kept = load(args.keep_csv)[0] if args.keep_csv else {}
    layers = sorted(sink)
    same = {}  # scheme id -> the earlier scheme id it duplicates
    for i, (sid, *_rest) in enumerate(SCHEMES):
        for other, *_r in SCHEMES[:i]:
            if all(series.get(p + sid) == series.get(p + other) for p in ("K ", "V ", "KV ")):
                same[sid] = other
                break

    fig, axes = plt.subplots(3, 1, figsize=(12.5, 11), sharex=True)
    panels = [("K quantized, V exact", "K "), ("V quantized, K exact", "V "), ("K and V quantized", "KV ")]
    for ax, (title, prefix) in zip(axes, panels):
        for sid, label, colour, style in SCHEMES:
            data = series.get(prefix + sid)
            if not data or sid in same:
                continue
            dup = [s for s, o in same.items() if o == sid]
            if dup:
                label += " (= " + ", ".join(dict((s, l) for s, l, _, _ in SCHEMES)[d] for d in dup) + ")"
            ax.plot(layers, [data[l] for l in layers], style, color=colour, marker=".", label=label)
        if prefix == "KV ":
            for cfg, label, colour, style in PAIRS:
                if cfg in series:
                    ax.plot(layers, [series[cfg][l] for l in layers], style, color=colour, marker="o",
                            markersize=3, linewidth=2, label=label)
            if "K ch128 + V tok" in kept:
                ax.plot(layers, [kept["K ch128 + V tok"][l] for l in layers], ":", color="black", marker="s",
                        markersize=3, linewidth=2, label="K per-channel 128 tok + V per-token, token 0 in fp16")
        if prefix == "V " and "V ch" in kept:
            ax.plot(layers, [kept["V ch"][l] for l in layers], ":", color="tab:red", marker="s", markersize=3,
                    label="per-channel, whole seq., token 0 in fp16")
        ax.set_yscale("log")
        ax.set_ylabel("attention-output rel. L2")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(True, which="both", alpha=0.3)
        if prefix == "V ":
            twin = ax.twinx()
            twin.bar(layers, [sink[l] for l in layers], color="grey", alpha=0.18, width=0.8)
            twin.set_ylim(0, 1)
            twin.set_ylabel("attention on token 0 (bars)", color="grey")
        ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.1, 0.5), frameon=False)
    axes[-1].set_xlabel("layer")
    if args.title:
        fig.suptitle(args.title, fontsize=11)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
