#!/usr/bin/env python3
"""kvq's decode attention against its peers on the same GPU, in one run.

Reads kvq_bench's JSON (its decode_attention/... cases) and times, at each case's shape (one query
token per sequence, fp16 queries):
  - PyTorch SDPA over a dense fp16 cache: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    q [B, Hq, 1, D], k and v [B, Hkv, T, D];
  - FlashInfer (if importable, or installed from --wheels: flashinfer-python and apache-tvm-ffi
    wheels, pip --no-deps into a scratch directory), BatchDecodeWithPagedKVCacheWrapper over a paged
    cache of the case's page size, fp16 and fp8 (e4m3, k_scale = v_scale = 1), use_tensor_cores=True;
    plan() once outside the timed graph, run() inside it.
Both are timed as kvq_bench times kvq (compare_torch.GraphTimer): CUDA graphs of back-to-back calls,
replays timed with events, cold (L2 flushed) and hot. Speedup = peer time / kvq time.

    python3 bench/compare_decode.py --kvq-json bench.json [--wheels DIR] --out-json decode.json --out-md decode.md

Each peer is tried on its own: one that fails (not installed, out of memory, a JIT error) is reported
in the table and does not stop the others.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_torch  # noqa: E402  (GraphTimer, load_kvq, fmt_time)

NAME = re.compile(r"^decode_attention/half/(?P<scheme>[a-z_]+)/B(?P<B>\d+)_T(?P<T>\d+)_Hq(?P<Hq>\d+)_Hkv(?P<Hkv>\d+)"
                  r"_D(?P<D>\d+)_P(?P<P>\d+)$")


def install_wheels(wheels):
    """pip install --no-deps flashinfer-python and apache-tvm-ffi from the wheels in `wheels` (pip picks
    the one built for this Python) into a scratch directory put first on sys.path."""
    target = tempfile.mkdtemp(prefix="kvq_peers_")
    if not any(f.endswith(".whl") for f in os.listdir(wheels)):
        return f"no wheels in {wheels}"
    rc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--find-links",
                         wheels, "--target", target, "flashinfer-python", "apache-tvm-ffi"]).returncode
    if rc != 0:
        return f"pip install from {wheels} failed ({rc})"
    sys.path.insert(0, target)
    return None


def sdpa_fn(torch, r):
    import torch.nn.functional as F
    q = torch.randn(r["B"], r["Hq"], 1, r["D"], dtype=torch.float16, device="cuda")
    k = torch.randn(r["B"], r["Hkv"], r["T"], r["D"], dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), (k, v, q)


def flashinfer_fn(torch, flashinfer, r, kv_dtype):
    b, t, p = r["B"], r["T"], r["P"]
    pages_per_seq = (t + p - 1) // p
    pages = b * pages_per_seq
    indptr = torch.arange(0, b + 1, dtype=torch.int32, device="cuda") * pages_per_seq
    indices = torch.randperm(pages, dtype=torch.int32, device="cuda")  # shuffled pages, as kvq's case
    last = torch.full((b,), t - (pages_per_seq - 1) * p, dtype=torch.int32, device="cuda")
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=indptr,
        paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
    wrapper.plan(indptr, indices, last, r["Hq"], r["Hkv"], r["D"], p, q_data_type=torch.float16,
                 kv_data_type=kv_dtype)
    cache = torch.randn(pages, 2, p, r["Hkv"], r["D"], dtype=torch.float16, device="cuda").to(kv_dtype)
    q = torch.randn(b, r["Hq"], r["D"], dtype=torch.float16, device="cuda")
    if kv_dtype == torch.float16:
        return lambda: wrapper.run(q, cache), (workspace, cache, q, wrapper)
    return lambda: wrapper.run(q, cache, k_scale=1.0, v_scale=1.0), (workspace, cache, q, wrapper)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvq-json", nargs="+", required=True)
    ap.add_argument("--wheels", default=None, help="directory with the flashinfer-python and apache-tvm-ffi wheels")
    ap.add_argument("--out-json", default="decode.json")
    ap.add_argument("--out-md", default="decode.md")
    args = ap.parse_args()

    context, runs = compare_torch.load_kvq(args.kvq_json)
    rows = []
    for name, run in sorted(runs.items()):
        m = NAME.match(name)
        if m and "median_us" in run:
            r = {k: int(v) for k, v in m.groupdict().items() if k != "scheme"}
            r.update(scheme=m["scheme"], kvq_case=name, kvq_us=run["median_us"], kvq_hot_us=run.get("hot_us"),
                     bytes=run.get("bytes"), calls=int(run.get("calls_per_replay", 20)))
            rows.append(r)
    if not rows:
        print("compare_decode.py: no decode_attention cases in the kvq JSON; nothing to compare")
        return 0
    import torch
    if not torch.cuda.is_available():
        print("compare_decode.py: no usable CUDA GPU for PyTorch")
        return 0
    flashinfer, fi_error = None, None
    if args.wheels:
        fi_error = install_wheels(args.wheels)
    if fi_error is None:
        try:
            import flashinfer  # noqa: F811
        except Exception as e:  # not installed, or its import failed
            fi_error = f"{type(e).__name__}: {e}"
    timer = compare_torch.GraphTimer(torch)
    peers = [("sdpa_fp16", lambda r: sdpa_fn(torch, r))]
    if flashinfer is not None:
        peers += [("flashinfer_fp16", lambda r: flashinfer_fn(torch, flashinfer, r, torch.float16)),
                  ("flashinfer_fp8", lambda r: flashinfer_fn(torch, flashinfer, r, torch.float8_e4m3fn))]
    for r in rows:
        for peer, make in peers:
            try:
                fn, keep = make(r)
                r[peer + "_us"], r[peer + "_hot_us"] = timer.time(fn, r["calls"], 30)
                del keep
            except Exception as e:  # one peer failing must not lose the others
                r[peer + "_error"] = f"{type(e).__name__}: {e}"
            torch.cuda.empty_cache()
        print(f"  {r['kvq_case']}: kvq {r['kvq_us']:.1f} us; " +
              ", ".join(f"{p} {r.get(p + '_us', float('nan')):.1f} us" for p, _ in peers), flush=True)

    copy = float(context.get("copy_GBps", 0) or 0)
    names = [p for p, _ in peers]
    lines = [f"## Decode attention: kvq vs peers on {context.get('gpu', torch.cuda.get_device_name())} "
             f"(torch {torch.__version__}, flashinfer {getattr(flashinfer, '__version__', None) or fi_error})", "",
             "Cold (L2 flushed before each replay), per call; speedup = peer time / kvq time; kvq % = of copy on "
             "the bytes kvq reads (codes, scales, q, out).", "",
             "| case | kvq | kvq % copy | " + " | ".join(names) + " | " + " | ".join(f"vs {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * (2 * len(names))]
    for r in rows:
        pct = f"{100 * r['bytes'] / (r['kvq_us'] * 1e-6) / 1e9 / copy:.0f}%" if copy and r.get("bytes") else "-"
        times = [compare_torch.fmt_time(r.get(n + "_us")) if n + "_us" in r else "failed" for n in names]
        ratios = [compare_torch.ratio(r.get(n + "_us"), r["kvq_us"]) for n in names]
        lines.append(f"| {r['kvq_case'].split('/', 2)[2]} | {compare_torch.fmt_time(r['kvq_us'])} | {pct} | " +
                     " | ".join(times) + " | " + " | ".join(ratios) + " |")
    failed = [f"{r['kvq_case']} {n}: {r[n + '_error']}" for r in rows for n in names if n + "_error" in r]
    if failed:
        lines += ["", "Failed: " + "; ".join(failed)]
    if fi_error:
        lines += ["", f"FlashInfer not timed: {fi_error}"]
    md = "\n".join(lines) + "\n"
    print(md)
    with open(args.out_md, "w") as f:
        f.write(md)
    with open(args.out_json, "w") as f:
        json.dump({"context": context, "torch": torch.__version__, "rows": rows,
                   "flashinfer": getattr(flashinfer, "__version__", None), "flashinfer_error": fi_error}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
