#!/usr/bin/env python3
"""kvq against the same operations written as a PyTorch user would, timed the same way in one run.

The PyTorch side is plain code (eager), and the same functions under torch.compile (static
shapes, default mode). The kvq side is kvq_bench itself, run from here with a filter that selects
the matching cases (or read from a JSON file it wrote earlier in the same session).

Both sides are timed alike: a warm-up, then per call an L2 flush (a read of a 256 MB buffer), on
the PyTorch side a GPU spin that covers Python's dispatch (kvq_bench's C++ launch hides behind its
flush kernel), CUDA events around the call, the median over the same number of calls as kvq_bench uses. GB/s counts
the same bytes on both sides (kvq_bench's `bytes` counter: input + output + fp32 scales, once).

    python3 bench/compare_torch.py --kvq-bench build/bench/kvq_bench --out-json torch.json --out-md compare.md

Prints a markdown table: time of each, and kvq's speedup (torch time / kvq time: > 1 is kvq faster).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PAPER_SHAPES = [(1024, 64), (2048, 128), (16384, 256), (65536, 256), (131072, 256), (131072, 1024),
                (131072, 2048), (131072, 4096), (131072, 8192), (262144, 128)]
HEADLINE = (131072, 8192)

# op -> the kvq_bench case that does the same work (op/dtype/granularity/variant/shape)
KVQ_CASE = {
    "per_channel": "quantize/{dtype}/per_channel/auto/{shape}",
    "per_token": "quantize/{dtype}/per_token/auto/{shape}",
    "given": "quantize_with_scales/{dtype}/per_channel/auto/{shape}",
    "dequantize": "dequantize/{dtype}/per_channel/auto/{shape}",
    "per_channel_g128": "quantize/{dtype}/per_channel_g128/auto/{shape}",
    "per_token_g32": "quantize/{dtype}/per_token_g32/auto/{shape}",
}
OP_TITLE = {
    "per_channel": "per-channel (scales on the GPU)",
    "per_token": "per-token (scales on the GPU)",
    "given": "given per-channel scales",
    "dequantize": "dequantize (per-channel)",
    "per_channel_g128": "per-channel, groups of 128 tokens",
    "per_token_g32": "per-token, groups of 32 channels",
}


def cases(quick):
    """(dtype, tokens, channels, op): every op and dtype at the headline size, the anchors' small
    rows, and the paper's path (fp32, given scales) on every paper shape for the plot."""
    out = [(dt, *HEADLINE, op) for dt in ("float", "half", "bfloat16") for op in KVQ_CASE]
    out += [("half", 262144, 128, "per_token"), ("float", 16384, 256, "per_token"), ("half", 16384, 256, "per_token")]
    if not quick:
        out += [("float", t, d, "given") for (t, d) in PAPER_SHAPES if (t, d) != HEADLINE]
    return out


def kvq_name(dtype, tokens, channels, op):
    return KVQ_CASE[op].format(dtype=dtype, shape=f"T{tokens}_D{channels}")


def iterations(elements):
    """The same sample counts as kvq_bench (iterations_for in kvq_bench.cu)."""
    return 20 if elements >= 1 << 26 else 50 if elements >= 1 << 22 else 200


# --- the PyTorch user's code ------------------------------------------------------------------

def make_ops(torch):
    def scale_of(amax):
        scale = amax.float() / 127
        return torch.where(scale > 0, scale, 1.0)  # an all-zero group would divide by zero

    def codes(x, scale):
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8)  # round: half to even

    def per_channel(x):  # x (T, D): one scale per channel, over all tokens
        scale = scale_of(x.abs().amax(dim=0, keepdim=True))
        return codes(x, scale), scale

    def per_token(x):  # one scale per token
        scale = scale_of(x.abs().amax(dim=1, keepdim=True))
        return codes(x, scale), scale

    def given(x, scale):  # calibrated per-channel scales
        return codes(x, scale)

    def dequantize(q, scale, dtype):
        return (q.float() * scale).to(dtype)

    def per_channel_g128(x):  # KIVI-style keys: a scale per channel per 128 tokens
        t, d = x.shape
        xg = x.view(t // 128, 128, d)
        scale = scale_of(xg.abs().amax(dim=1, keepdim=True))
        return codes(xg, scale).view(t, d), scale

    def per_token_g32(x):  # llama.cpp-like blocks: a scale per 32 channels of a token
        t, d = x.shape
        xg = x.view(t, d // 32, 32)
        scale = scale_of(xg.abs().amax(dim=2, keepdim=True))
        return codes(xg, scale).view(t, d), scale

    return {"per_channel": per_channel, "per_token": per_token, "given": given, "dequantize": dequantize,
            "per_channel_g128": per_channel_g128, "per_token_g32": per_token_g32}


class Timer:
    """CUDA events around each call after an L2 flush, median of `n` calls, as kvq_bench does."""

    def __init__(self, torch):
        self.torch = torch
        self.flush_buf = torch.zeros(256 << 20 >> 2, dtype=torch.int32, device="cuda")
        self.start = torch.cuda.Event(enable_timing=True)
        self.stop = torch.cuda.Event(enable_timing=True)
        self.spin_cycles = 2_000_000  # about 1 ms of GPU clock

    def median_us(self, fn, n, warmup=3):
        for _ in range(warmup):
            fn()
        self.torch.cuda.synchronize()
        ms = []
        for _ in range(n):
            self.flush_buf.max()  # a read: leaves clean lines, like kvq_bench's flush kernel
            # Keep the GPU busy while Python dispatches fn (tens of microseconds for torch.compile's
            # guards), so the window holds the GPU work only, as for kvq_bench's C++ launches. Without
            # it, decode-sized calls timed Python overhead (about 5x the anchors' torch.compile times).
            self.torch.cuda._sleep(self.spin_cycles)
            self.start.record()
            fn()
            self.stop.record()
            self.stop.synchronize()
            ms.append(self.start.elapsed_time(self.stop))
        return statistics.median(ms) * 1e3


def mismatches(torch, a, b):
    """Elements whose bits differ (codes, or dequantized values compared as integers)."""
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
        a, b = a.view(bits), b.view(bits)
    return int((a != b).sum().item())


def time_torch(torch, rows, compile_mode, save):
    """Times every row, calling save() after each (a run cut short still leaves its rows)."""
    ops = make_ops(torch)
    compiled = {}
    timer = Timer(torch)
    dtypes = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
    for row in rows:
        try:
            time_row(torch, row, ops, compiled, timer, dtypes[row["dtype"]], compile_mode)
        except Exception as e:  # one failed row (out of memory, a compile error) must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"  torch {row['dtype']} T{row['tokens']}_D{row['channels']} {row['op']}: FAILED {row['error']}",
                  flush=True)
        torch.cuda.empty_cache()
        save()


def time_row(torch, row, ops, compiled, timer, tdt, compile_mode):
    """Eager, then compiled, for one row; fills the row's times."""
    dt, t, d, op = row["dtype"], row["tokens"], row["channels"], row["op"]
    x = (torch.rand(t, d, device="cuda") * 2 - 1).to(tdt)
    q, scale = ops["per_channel"](x)  # inputs of `given` and `dequantize`
    if op not in compiled:
        compiled[op] = torch.compile(ops[op], dynamic=False, mode=compile_mode)
    if op == "given":
        args = (x, scale)
    elif op == "dequantize":
        args = (q, scale, tdt)
    else:
        args = (x,)
    n = iterations(t * d)
    row["iterations"] = n
    row["eager_us"] = timer.median_us(lambda: ops[op](*args), n)
    t0 = time.time()
    out = compiled[op](*args)  # compiles for this shape and dtype
    row["compile_seconds"] = round(time.time() - t0, 1)
    row["compile_us"] = timer.median_us(lambda: compiled[op](*args), n)
    # Same code, two backends: do they agree? (Triton may divide differently from eager CUDA.)
    ref = ops[op](*args)
    a, b = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    row["compile_mismatches"] = mismatches(torch, a, b)
    print(f"  torch {dt:8s} T{t}_D{d} {op:17s} eager {row['eager_us']:10.1f} us   "
          f"compile {row['compile_us']:10.1f} us   (compiled in {row['compile_seconds']} s)", flush=True)


def run_kvq(bench, names, out_json):
    # Google Benchmark names a case "<our name>/iterations:N/manual_time": match the prefix.
    pattern = "^(" + "|".join(names) + ")/"
    cmd = [bench, f"--benchmark_filter={pattern}", f"--benchmark_out={out_json}", "--benchmark_out_format=json"]
    print("running kvq_bench on the matching cases...", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:  # a failed case has no number; the others are still worth comparing
        print(f"compare_torch.py: kvq_bench exited with {rc}; its failed cases show as '-'", flush=True)
    return rc


def load_kvq(path):
    if not os.path.exists(path):  # kvq_bench found no GPU, or did not get far enough to write
        print(f"compare_torch.py: no kvq results in {path}", flush=True)
        return {}, {}
    with open(path) as f:
        data = json.load(f)
    # op/dtype/granularity/variant/shape, without Google Benchmark's /iterations:N/manual_time
    runs = {"/".join(b["name"].split("/")[:5]): b for b in data.get("benchmarks", [])
            if b.get("run_type", "iteration") == "iteration"}
    return data.get("context", {}), runs


def fmt_time(us):
    if us is None:
        return "-"
    return f"{us:.2f} us" if us < 100 else f"{us:.1f} us" if us < 1000 else f"{us / 1000:.3f} ms"


ELEMENT_BYTES = {"float": 4, "half": 2, "bfloat16": 2}


def fmt_bw(row, key, copy):
    """GB/s and % of copy; for whole-sequence per-channel also % of copy counting both reads of x."""
    us = row.get(key)
    if us is None or not row.get("bytes"):
        return ""
    gbps = row["bytes"] / (us * 1e-6) / 1e9
    if not copy:
        return f" ({gbps:.0f} GB/s)"
    text = f" ({gbps:.0f} GB/s, {100 * gbps / copy:.0f}%"
    if row["op"] == "per_channel":
        moved = row["bytes"] + row["tokens"] * row["channels"] * ELEMENT_BYTES[row["dtype"]]
        text += f"; 2 reads: {100 * moved / (us * 1e-6) / 1e9 / copy:.0f}%"
    return text + ")"


def ratio(num, den):
    return f"{num / den:.2f}x" if num and den else "-"


def markdown(rows, copy, header):
    lines = [header, "",
             "Times are medians; GB/s and % of the device-to-device copy count input + output + fp32 scales "
             "once (whole-sequence per-channel must read its input twice). Speedup = torch time / kvq time "
             "(> 1: kvq is faster).", "",
             "| dtype | T x D | op | kvq (auto) | torch eager | torch.compile | kvq vs compile | kvq vs eager |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['tokens']} x {r['channels']} | {OP_TITLE[r['op']]} | "
            f"{fmt_time(r.get('kvq_us'))}{fmt_bw(r, 'kvq_us', copy)} | {fmt_time(r.get('eager_us'))} | "
            f"{fmt_time(r.get('compile_us'))}{fmt_bw(r, 'compile_us', copy)} | "
            f"{ratio(r.get('compile_us'), r.get('kvq_us'))} | {ratio(r.get('eager_us'), r.get('kvq_us'))} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "PyTorch failed on: " + "; ".join(
            f"{r['dtype']} T{r['tokens']}_D{r['channels']} {r['op']} ({r['error']})" for r in failed)]
    mism = [r for r in rows if r.get("compile_mismatches")]
    if mism:
        lines += ["", "torch.compile's output differed from eager's in: " + ", ".join(
            f"{r['dtype']} T{r['tokens']}_D{r['channels']} {r['op']} ({r['compile_mismatches']} elements)" for r in mism)]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--kvq-bench", help="path of kvq_bench: run it here on the matching cases")
    src.add_argument("--kvq-json", help="a JSON file kvq_bench wrote (--benchmark_out) instead of running it")
    ap.add_argument("--out-json", default="torch.json")
    ap.add_argument("--out-md", default="compare.md")
    ap.add_argument("--quick", action="store_true", help="skip the fp32 sweep over the paper's shapes")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: PyTorch's default)")
    args = ap.parse_args()

    rows = [dict(dtype=dt, tokens=t, channels=d, op=op, kvq_case=kvq_name(dt, t, d, op))
            for (dt, t, d, op) in cases(args.quick)]

    # kvq first, while nothing else holds GPU memory.
    kvq_json, kvq_rc = args.kvq_json, 0
    if args.kvq_bench:
        kvq_json = os.path.join(tempfile.mkdtemp(prefix="kvq_compare_"), "kvq.json")
        kvq_rc = run_kvq(args.kvq_bench, sorted({r["kvq_case"] for r in rows}), kvq_json)
    context, runs = load_kvq(kvq_json)
    copy = float(context.get("copy_GBps", 0) or 0)
    for r in rows:
        run = runs.get(r["kvq_case"])
        if run and "median_us" in run:
            r["kvq_us"] = run["median_us"]
            r["bytes"] = run["bytes"]

    try:  # after kvq_bench: torch would otherwise keep GPU memory for its caching allocator
        import torch
        import torch._dynamo
    except ImportError as e:
        print(f"compare_torch.py: PyTorch is not importable ({e}); nothing to compare.")
        return 1
    if not torch.cuda.is_available():
        print("compare_torch.py: no usable CUDA GPU for PyTorch; nothing to compare.")
        return 0
    # One compiled specialization per (op, shape, dtype): raise dynamo's per-function limit so none
    # silently falls back to eager.
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        try:  # the names changed across releases; set whichever this one has
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        except Exception:
            pass
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    gpu = context.get("gpu") or torch.cuda.get_device_name()
    header = (f"## kvq vs PyTorch on {gpu} (copy {copy:.0f} GB/s; torch {torch.__version__}, "
              f"triton {triton_version}, torch.compile mode {args.compile_mode or 'default'})")

    def save():
        with open(args.out_md, "w") as f:
            f.write(markdown(rows, copy, header))
        result = {"gpu": gpu, "copy_GBps": copy, "torch": torch.__version__, "triton": triton_version,
                  "compile_mode": args.compile_mode or "default",
                  "method": "median of CUDA-event times after warm-up, L2 flushed (256 MB read) and the GPU kept busy (~1 ms spin) while each call is dispatched",
                  "kvq_context": context, "rows": rows}
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=1)

    print("timing PyTorch (eager, then torch.compile)...", flush=True)
    time_torch(torch, rows, args.compile_mode, save)
    print()
    print(markdown(rows, copy, header))
    print(f"wrote {args.out_md} and {args.out_json}")
    return 1 if kvq_rc != 0 or any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
