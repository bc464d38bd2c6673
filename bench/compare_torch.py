#!/usr/bin/env python3
"""kvq against the same operations written as a PyTorch user would, timed the same way in one run.

The PyTorch side is plain code (eager, timed for the paper's rows), and the same functions under
torch.compile (static shapes, one compiled graph per shape: dynamo's recompile limit is raised, since
at its default of 8 it silently falls back to eager). The kvq side is kvq_bench: its JSON from this
run (--kvq-json, the default workload and paper mode) or kvq_bench run from here on the matching
cases (--kvq-bench). With --kvq-ops, kvq is also timed in this process through its torch custom
ops (examples/torch, importable as kvq_torch), by the same timer as torch. The rows: the engines'
shapes, the paged append in both scale schemes (torch: index_copy_ of torch-quantized rows; for keys
per channel per page, each sequence's open page of keys quantized where it fills), decode attention (torch: SDPA
over a dense fp16 cache, enable_gqa; kvq: decode_attention over the same K and V appended to its
int8 pages) and the paper's; --only and --match (a regex of kvq case names) pick some.

    PYTHONPATH=examples/torch python3 bench/compare_torch.py --kvq-bench build/bench/kvq_bench --kvq-ops \
        --only decode --out-json torch_decode.json --out-md torch_decode.md

Both sides are timed alike (kvq_bench.cu states the method): each call is captured `calls` times
back to back into a CUDA graph (20; fewer for calls of more than 400 MB, the same rule as
kvq_bench), and graph replays are timed with CUDA events. Cold: the L2 is flushed (a read of a 256 MB
buffer) before each replay; hot: replays back to back. Before each timed replay a GPU spin covers
Python's launch of the replay, so the window holds GPU work only. Per call = replay / calls, median
over the replays. GB/s counts the same bytes on both sides (kvq_bench's `bytes` counter: input +
output + fp32 scales, once).

    python3 bench/compare_torch.py --kvq-json bench.json paper.json --out-json torch.json --out-md compare.md

Prints markdown tables: time of each, and kvq's speedup (torch time / kvq time: > 1 is kvq faster).
"""

import argparse
import json
import math
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

PAPER_SHAPES = [(1024, 64), (2048, 128), (16384, 256), (65536, 256), (131072, 256), (131072, 1024),
                (131072, 2048), (131072, 4096), (131072, 8192), (262144, 128)]
HEADLINE = (131072, 8192)
DTYPES = ("float", "half", "bfloat16")
ELEMENT_BYTES = {"float": 4, "half": 2, "bfloat16": 2}

# op -> (the kvq_bench case that does the same work: op/granularity, title)
OPS = {
    "per_channel": ("quantize/{dtype}/per_channel", "per-channel (scales on the GPU)"),
    "per_token": ("quantize/{dtype}/per_token", "per-token (scales on the GPU)"),
    "given": ("quantize_with_scales/{dtype}/per_channel", "given per-channel scales"),
    "dequantize": ("dequantize/{dtype}/per_channel", "dequantize (per-channel)"),
    "per_channel_g128": ("quantize/{dtype}/per_channel_g128", "per-channel, groups of 128 tokens"),
    "per_token_g32": ("quantize/{dtype}/per_token_g32", "per-token, groups of 32 channels"),
    "given_per_token": ("quantize_with_scales/{dtype}/per_token", "given per-token scales"),
    "dequantize_per_token": ("dequantize/{dtype}/per_token", "dequantize (per-token)"),
    "given_g128": ("quantize_with_scales/{dtype}/per_channel_g128", "given per-channel scales, groups of 128"),
    "dequantize_g128": ("dequantize/{dtype}/per_channel_g128", "dequantize (per-channel, groups of 128)"),
    "append_kv": ("append_kv/{dtype}/per_token_head", "paged append of K and V (per token-head)"),
    "append_kv_by_page": ("append_kv/{dtype}/keys_per_channel_page",
                          "paged append of K and V (keys per channel per page, values per token-head)"),
    "decode_attention": ("decode_attention/{dtype}/per_token_head", "decode attention (torch: SDPA, dense fp16)"),
}
HEADLINE_OPS = ("per_channel", "per_token", "given", "dequantize", "per_channel_g128", "per_token_g32")
ROW_OPS = ("per_token", "given_per_token", "dequantize_per_token")
VIEW_OPS = ("per_channel_g128", "given_g128", "dequantize_g128", "per_token")

# The engines' shapes (kvq_bench.cu, engine_cases): rows one head wide, [T, H, D] and [B, H, T, D].
HEAD_DIMS = (64, 80, 96, 128, 256)
ENGINE_ROWS = (64, 2048, 16384, 65536, 262144, 1048576)
VIEWS = [("THD", dict(tokens=128, heads=8, batch=1, channels=128)),
         ("THD", dict(tokens=32768, heads=8, batch=1, channels=64)),
         ("THD", dict(tokens=32768, heads=8, batch=1, channels=128)),
         ("THD", dict(tokens=32768, heads=8, batch=1, channels=256)),
         ("BHTD", dict(tokens=8192, heads=8, batch=4, channels=128))]

# The paged cache's append cases (paged_ops.cu, paged_cases): (decode, tokens, page size), 8 KV heads
# of 128 channels. A decode step of S sequences writes one token into each one's page; a prefill
# chunk writes T tokens of one sequence into shuffled pages.
PAGED = [(True, 1, 16), (True, 8, 16), (True, 64, 16), (True, 256, 16), (False, 32768, 16), (False, 32768, 64)]
PAGED_HEADS, PAGED_DIM = 8, 128
# Scheme 2 (keys per channel per page), fp16 only in kvq_bench: decode steps of 8 / 64 / 256
# sequences at random offsets of their open page, and the same prefills.
PAGED_BY_PAGE = [(True, 8, 16), (True, 64, 16), (True, 256, 16), (False, 32768, 16), (False, 32768, 64)]

# Decode attention (paged_ops.cu, attention_cases; issue 18's targets): (batch, tokens a sequence),
# 32 query / 8 KV heads of 128 channels, fp16 queries, pages of 64 tokens. torch: SDPA over a dense
# fp16 cache (enable_gqa); kvq: decode_attention over its int8 pages.
DECODE = [(8, 32768), (1, 131072), (32, 1024), (128, 2048)]
DECODE_Q_HEADS, DECODE_PAGE = 32, 64

MAX_CALLS_PER_REPLAY = 20
REPLAY_BYTES = 8e9  # kvq_bench.cu: kReplayBytes


def calls_per_replay(nbytes):
    """kvq_bench.cu's calls_per_replay: 20 calls, fewer when 20 would move more than 8 GB."""
    return int(min(max(math.floor(REPLAY_BYTES / nbytes), 1), MAX_CALLS_PER_REPLAY))


def shape_name(r):
    t, d = r["tokens"], r["channels"]
    if r["layout"] == "decode":
        return f"B{r['batch']}_T{t}_Hq{r['q_heads']}_Hkv{r['heads']}_D{d}_P{r['page_size']}"
    if r["layout"] == "paged":
        return (f"decode_S{t}" if r["decode"] else f"prefill_T{t}") + f"_H{r['heads']}_D{d}_P{r['page_size']}"
    if r["layout"] == "rows":
        return f"rows{t}_D{d}"
    if r["layout"] == "THD":
        return f"THD_T{t}_H{r['heads']}_D{d}"
    if r["layout"] == "BHTD":
        return f"BHTD_B{r['batch']}_H{r['heads']}_T{t}_D{d}"
    return f"T{t}_D{d}"


def make_row(dtype, layout, op, tokens, channels, heads=1, batch=1, eager=False):
    r = dict(dtype=dtype, layout=layout, op=op, tokens=tokens, channels=channels, heads=heads, batch=batch,
             eager=eager)
    r["kvq_case"] = OPS[op][0].format(dtype=dtype) + "/auto/" + shape_name(r)
    r["elements"] = batch * heads * tokens * channels
    return r


def make_paged_row(dtype, decode, tokens, page_size, op="append_kv"):
    r = dict(dtype=dtype, layout="paged", op=op, tokens=tokens, channels=PAGED_DIM, heads=PAGED_HEADS,
             batch=1, eager=False, decode=decode, page_size=page_size)
    r["kvq_case"] = OPS[op][0].format(dtype=dtype) + "/" + shape_name(r)
    r["elements"] = 2 * tokens * PAGED_HEADS * PAGED_DIM  # K and V
    return r


def make_decode_row(batch, tokens):
    r = dict(dtype="half", layout="decode", op="decode_attention", tokens=tokens, channels=PAGED_DIM,
             heads=PAGED_HEADS, q_heads=DECODE_Q_HEADS, batch=batch, eager=False, page_size=DECODE_PAGE)
    r["kvq_case"] = OPS["decode_attention"][0].format(dtype="half") + "/" + shape_name(r)
    r["elements"] = 2 * batch * tokens * PAGED_HEADS * PAGED_DIM  # K and V
    return r


def cases(quick):
    """The rows to compare: the engines' shapes first (torch.compile only: per-token rows for D in
    {64, 128, 256} in every dtype and for 80 and 96 in fp16; the per-head views with keys per
    channel in groups of 128 and values per token), then every op and dtype at the paper's headline
    size and the paper's path (fp32, given scales) on its other shapes (eager too)."""
    rows = []
    for dt in DTYPES:
        for d in HEAD_DIMS:
            if d in (80, 96) and dt != "half":
                continue
            for op in ROW_OPS:
                rows += [make_row(dt, "rows", op, n, d) for n in ENGINE_ROWS]
    for dt in DTYPES:
        for layout, v in VIEWS:
            rows += [make_row(dt, layout, op, **v) for op in VIEW_OPS]
    rows += [make_paged_row(dt, *p) for dt in DTYPES for p in PAGED]
    rows += [make_paged_row("half", *p, op="append_kv_by_page") for p in PAGED_BY_PAGE]
    rows += [make_decode_row(*b) for b in DECODE]
    rows += [make_row(dt, "matrix", op, *HEADLINE, eager=True) for dt in DTYPES for op in HEADLINE_OPS]
    if not quick:
        rows += [make_row("float", "matrix", "given", t, d, eager=True) for (t, d) in PAPER_SHAPES if (t, d) != HEADLINE]
    return rows


# --- the PyTorch user's code ------------------------------------------------------------------

def make_ops(torch):
    """{op: fn}. Each fn takes the tensor in its layout (and scales or codes) and returns what kvq
    returns: (codes, scales) for a quantize with scales on the GPU, codes, or values."""

    def scale_of(amax):
        scale = amax.float() / 127
        return torch.where(scale > 0, scale, 1.0)  # an all-zero group would divide by zero

    def codes(x, scale):
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8)  # round: half to even

    def token_groups(x):
        """x with its token axis split into groups of 128 (x.ndim + 1 dims), and the groups' axis + 1."""
        if x.ndim == 2:  # [T, D]
            t, d = x.shape
            return x.view(t // 128, 128, d), 1
        if x.ndim == 3:  # [T, H, D]
            t, h, d = x.shape
            return x.view(t // 128, 128, h, d), 1
        b, h, t, d = x.shape  # [B, H, T, D]
        return x.view(b, h, t // 128, 128, d), 3

    def per_channel(x):  # x (T, D): one scale per channel, over all tokens
        scale = scale_of(x.abs().amax(dim=0, keepdim=True))
        return codes(x, scale), scale

    def per_token(x):  # one scale per row (token, or token and head), over the last axis
        scale = scale_of(x.abs().amax(dim=-1, keepdim=True))
        return codes(x, scale), scale

    def given(x, scale):  # calibrated scales, broadcast over x
        return codes(x, scale)

    def dequantize(q, scale, dtype):
        return (q.float() * scale).to(dtype)

    def per_channel_g128(x):  # KIVI-style keys: a scale per channel per 128 tokens
        xg, axis = token_groups(x)
        scale = scale_of(xg.abs().amax(dim=axis, keepdim=True))
        return codes(xg, scale).view(x.shape), scale

    def given_g128(x, scale):
        xg, _ = token_groups(x)
        return codes(xg, scale).view(x.shape)

    def dequantize_g128(q, scale, dtype):
        qg, _ = token_groups(q)
        return (qg.float() * scale).to(dtype).view(q.shape)

    def per_token_g32(x):  # llama.cpp-like blocks: a scale per 32 channels of a token
        t, d = x.shape
        xg = x.view(t, d // 32, 32)
        scale = scale_of(xg.abs().amax(dim=2, keepdim=True))
        return codes(xg, scale).view(t, d), scale

    def write_per_token(x, slots, cache, scales):  # x [T, H, D] into cache [slots, H, D], scales [slots, H]
        q, scale = per_token(x.float())
        cache.index_copy_(0, slots, q)
        scales.index_copy_(0, slots, scale.squeeze(-1))

    def append_kv(k, v, slots, k_cache, v_cache, k_scales, v_scales):
        """vLLM's reshape_and_cache with int8 per token-head, as a PyTorch user writes it: k, v
        [T, H, D]; caches [slots, H, D] int8 (NHD pages, flattened), scales [slots, H] fp32."""
        write_per_token(k, slots, k_cache, k_scales)
        write_per_token(v, slots, v_cache, v_scales)

    def append_kv_by_page(k, v, slots, seq_ids, positions, k_cache, v_cache, k_scales, v_scales, k_open, decode):
        """Scheme 2 as a PyTorch user writes it with static shapes (capturable: no data-dependent
        sizes): k, v [T, H, D]; caches [slots, H, D] int8 (NHD pages, flattened); k_scales [pages, H,
        D] and v_scales [slots, H] fp32; k_open [seqs, page_size, H, D] in k's dtype, each sequence's
        open page of keys; seq_ids and positions int64. Values per token-head as append_kv. A decode
        step (one token a sequence) puts each key in its open page, quantizes every such page per
        channel and keeps the result where the token is its page's last (torch.where against the
        page as it was); a prefill chunk (one sequence, from a page's start) quantizes its whole pages
        straight from k and leaves the rest in the open page."""
        ps = k_open.shape[1]
        write_per_token(v, slots, v_cache, v_scales)
        pages = k_cache.view(-1, ps, *k_cache.shape[1:])
        if decode:
            offset = positions % ps
            k_open[seq_ids, offset] = k
            tail = k_open[seq_ids].float()  # [T, page_size, H, D]
            ks = scale_of(tail.abs().amax(dim=1))
            page = slots // ps
            closes = offset == ps - 1
            pages.index_copy_(0, page, torch.where(closes.view(-1, 1, 1, 1), codes(tail, ks.unsqueeze(1)), pages[page]))
            k_scales.index_copy_(0, page, torch.where(closes.view(-1, 1, 1), ks, k_scales[page]))
        else:
            t = k.shape[0]
            full = t // ps * ps
            kp = k[:full].float().view(-1, ps, *k.shape[1:])
            ks = scale_of(kp.abs().amax(dim=1))
            page = slots[:full:ps] // ps
            pages.index_copy_(0, page, codes(kp, ks.unsqueeze(1)))
            k_scales.index_copy_(0, page, ks)
            if full < t:
                k_open[seq_ids[full:], positions[full:] % ps] = k[full:]

    def decode_attention(q, k, v):
        """One query token per sequence over a dense fp16 cache: q [B, Hq, 1, D], k, v [B, Hkv, T, D]."""
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return {"per_channel": per_channel, "per_token": per_token, "given": given, "dequantize": dequantize,
            "append_kv": append_kv, "append_kv_by_page": append_kv_by_page, "decode_attention": decode_attention,
            "per_channel_g128": per_channel_g128, "per_token_g32": per_token_g32, "given_per_token": given,
            "dequantize_per_token": dequantize, "given_g128": given_g128, "dequantize_g128": dequantize_g128}


# The op that makes the scales (and codes) a given-scales or dequantize op reads.
SOURCE_OP = {"given": "per_channel", "dequantize": "per_channel", "given_per_token": "per_token",
             "dequantize_per_token": "per_token", "given_g128": "per_channel_g128",
             "dequantize_g128": "per_channel_g128"}


def make_args(torch, ops, r, tdt):
    """The inputs of row r's op: x in its layout, uniform in [-1, 1) (never zeros)."""
    t, d, h, b = r["tokens"], r["channels"], r["heads"], r["batch"]
    if r["layout"] == "paged":  # as paged_ops.cu: twice the pages needed, handed out shuffled
        ps = r["page_size"]
        pages = 2 * (t if r["decode"] else (t + ps - 1) // ps) + 1
        order = torch.randperm(pages, device="cuda")
        if r["decode"]:
            slots = order[:t] * ps + torch.randint(0, ps, (t,), device="cuda")
        else:
            pos = torch.arange(t, device="cuda")
            slots = order[pos // ps] * ps + pos % ps
        k, v = ((torch.rand(t, h, d, device="cuda") * 2 - 1).to(tdt) for _ in range(2))
        caches = [torch.zeros(pages * ps, h, d, dtype=torch.int8, device="cuda") for _ in range(2)]
        scales = [torch.ones(pages * ps, h, device="cuda") for _ in range(2)]
        if r["op"] != "append_kv_by_page":
            return (k, v, slots, *caches, *scales)
        # paged_ops.cu's scheme-2 cases: a decode step's sequence t at offset slot % page_size of its
        # open page (the page's earlier rows in k_open); a prefill is positions 0 to T - 1 of sequence 0.
        seq_ids = torch.arange(t, device="cuda") if r["decode"] else torch.zeros(t, dtype=torch.int64, device="cuda")
        positions = slots % ps if r["decode"] else torch.arange(t, device="cuda")
        k_scales = torch.ones(pages, h, d, device="cuda")
        k_open = (torch.rand(t if r["decode"] else 1, ps, h, d, device="cuda") * 2 - 1).to(tdt)
        return (k, v, slots, seq_ids, positions, *caches, k_scales, scales[1], k_open, r["decode"])
    if r["layout"] == "decode":
        q = (torch.rand(b, r["q_heads"], 1, d, device="cuda") * 2 - 1).to(tdt)
        k, v = ((torch.rand(b, h, t, d, device="cuda") * 2 - 1).to(tdt) for _ in range(2))
        return (q, k, v)
    shape = {"matrix": (t, d), "rows": (t, d), "THD": (t, h, d), "BHTD": (b, h, t, d)}[r["layout"]]
    x = (torch.rand(*shape, device="cuda") * 2 - 1).to(tdt)
    op = r["op"]
    if op not in SOURCE_OP:
        return (x,)
    q, scale = ops[SOURCE_OP[op]](x)
    return (q, scale, tdt) if op.startswith("dequantize") else (x, scale)


def configure_dynamo(torch):
    """One compiled specialization per (op, shape, dtype): raise dynamo's per-function limits so that
    none silently falls back to eager."""
    import torch._dynamo
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        try:  # the names changed across releases; set whichever this one has
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
        except Exception:
            pass


class GraphTimer:
    """Times a function as kvq_bench times a call: `calls` back to back in a CUDA graph, replays
    timed with events, cold (L2 flushed first) and hot (back to back); ms per call, medians."""

    def __init__(self, torch):
        self.torch = torch
        self.flush_buf = torch.zeros(256 << 20 >> 2, dtype=torch.int32, device="cuda")
        self.start = torch.cuda.Event(enable_timing=True)
        self.stop = torch.cuda.Event(enable_timing=True)
        self.spin_cycles = 100_000  # about 50 us of GPU clock: covers Python's replay launch

    def time(self, fn, calls, replays):
        torch = self.torch
        fn()  # outside the capture: compiles, autotunes, allocates
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        out = {}
        for mode in ("cold", "hot"):
            ms = []
            for i in range(replays + 1):  # the first is warm-up
                if mode == "cold":
                    self.flush_buf.max()  # a read: leaves clean lines, like kvq_bench's flush kernel
                else:
                    torch.cuda._sleep(self.spin_cycles)
                self.start.record()
                graph.replay()
                self.stop.record()
                self.stop.synchronize()
                if i > 0:
                    ms.append(self.start.elapsed_time(self.stop) / calls)
            out[mode] = statistics.median(ms) * 1e3
        del graph
        return out["cold"], out["hot"]


def replays_for(elements):
    """kvq_bench.cu's iterations_for: replays per case."""
    return 15 if elements >= 1 << 26 else 30 if elements >= 1 << 22 else 50


def mismatches(torch, a, b):
    """Elements whose bits differ (codes, or dequantized values compared as integers)."""
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
        a, b = a.view(bits), b.view(bits)
    return int((a != b).sum().item())


def torch_dtype(torch, name):
    return {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}[name]


def time_row(torch, row, ops, compiled, timer, compile_mode):
    """torch.compile (and eager, for the rows marked so) for one row; fills the row's times."""
    tdt = torch_dtype(torch, row["dtype"])
    op = row["op"]
    args = make_args(torch, ops, row, tdt)
    if op not in compiled:
        compiled[op] = torch.compile(ops[op], dynamic=False, mode=compile_mode)
    nbytes = row.get("bytes") or row["elements"] * (ELEMENT_BYTES[row["dtype"]] + 1)
    calls = row.get("calls_per_replay") or calls_per_replay(nbytes)
    replays = replays_for(row["elements"])
    row["calls_per_replay"] = calls
    t0 = time.time()
    out = compiled[op](*args)  # compiles for this shape and dtype
    row["compile_seconds"] = round(time.time() - t0, 1)
    row["compile_us"], row["compile_hot_us"] = timer.time(lambda: compiled[op](*args), calls, replays)
    if row["eager"]:
        row["eager_us"], row["eager_hot_us"] = timer.time(lambda: ops[op](*args), calls, replays)
    # Same code, two backends: do they agree? (Triton may divide differently from eager CUDA.)
    if out is None:  # an in-place op (the paged append): nothing returned to compare
        row["compile_mismatches"] = 0
    else:
        ref = ops[op](*args)
        a, b = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
        row["compile_mismatches"] = mismatches(torch, a, b)
    print(f"  torch {row['dtype']:8s} {shape_name(row):24s} {op:20s} compile {row['compile_us']:10.2f} us cold "
          f"{row['compile_hot_us']:10.2f} us hot (compiled in {row['compile_seconds']} s)"
          + (f"   eager {row['eager_us']:10.1f} us" if row["eager"] else ""), flush=True)


def time_torch(torch, rows, compile_mode, save, deadline):
    """Times every row, calling save() after each (a run cut short still leaves its rows)."""
    ops = make_ops(torch)
    compiled = {}
    timer = GraphTimer(torch)
    for row in rows:
        if time.time() > deadline:
            row["error"] = "not timed: the run's deadline passed"
            continue
        try:
            time_row(torch, row, ops, compiled, timer, compile_mode)
        except Exception as e:  # one failed row (out of memory, a compile error) must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"  torch {row['dtype']} {shape_name(row)} {row['op']}: FAILED {row['error']}", flush=True)
        torch.cuda.empty_cache()
        save()


# --- kvq through its torch ops (examples/torch), in this process --------------------------------

def per_head(x):
    """kvq's view of a row's tensor: [T, D] as it is; [T, H, D] and [B, H, T, D] as [heads, T, D]
    (channels contiguous, strides as they are: no copy)."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x.permute(1, 0, 2)
    b, h, t, d = x.shape
    return x.reshape(b * h, t, d)


# row op -> (granularity, group) of the kvq call
KVQ_SPEC = {"per_channel": ("per_channel", 0), "per_token": ("per_token", 0), "given": ("per_channel", 0),
            "dequantize": ("per_channel", 0), "per_channel_g128": ("per_channel", 128),
            "per_token_g32": ("per_token", 32), "given_per_token": ("per_token", 0),
            "dequantize_per_token": ("per_token", 0), "given_g128": ("per_channel", 128),
            "dequantize_g128": ("per_channel", 128)}


def kvq_call(torch, kvq_torch, row, args, tdt):
    """A no-argument callable that runs row's op through kvq's torch ops on the same inputs as
    torch's (args, from make_args), or None where the row has no kvq op."""
    op = row["op"]
    if op == "append_kv":
        k, v, slots, k_cache, v_cache, k_scales, v_scales = args
        ps, h, d = row["page_size"], row["heads"], row["channels"]
        pools = [c.view(-1, ps, h, d) for c in (k_cache, v_cache)]
        scales = [sc.view(-1, ps, h) for sc in (k_scales, v_scales)]
        return lambda: torch.ops.kvq.append_kv(k, v, slots, *pools, *scales, "NHD", "per_token_head")
    if op == "append_kv_by_page":
        k, v, slots, seq_ids, positions, k_cache, v_cache, k_scales, v_scales, k_open, _ = args
        ps, h, d = row["page_size"], row["heads"], row["channels"]
        pools = [c.view(-1, ps, h, d) for c in (k_cache, v_cache)]
        ids, pos = seq_ids.to(torch.int32), positions.to(torch.int32)
        return lambda: torch.ops.kvq.append_kv(k, v, slots, *pools, k_scales, v_scales.view(-1, ps, h), "NHD",
                                               "keys_per_channel_page", ids, pos, k_open)
    if op == "decode_attention":  # the same K and V appended to a kvq cache, then attended from it
        q, k, v = args
        b, h, t, d = k.shape
        pages_per_seq = (t + row["page_size"] - 1) // row["page_size"]
        cache = kvq_torch.PagedKvCache(b * pages_per_seq, row["page_size"], h, d, max_seqs=b,
                                       max_pages_per_seq=pages_per_seq)
        for s in range(b):
            cache.append(k[s].transpose(0, 1).contiguous(), v[s].transpose(0, 1).contiguous(), seqs=[s], counts=[t])
        q3 = q.squeeze(2)
        table, lens, _ = cache.tables(range(b))
        return lambda: kvq_torch.decode_attention(cache, q3, table, lens, t)
    if op not in KVQ_SPEC:
        return None
    granularity, group = KVQ_SPEC[op]
    x = per_head(make_args(torch, None, dict(row, op="per_token"), tdt)[0] if op in SOURCE_OP else args[0])
    if op in SOURCE_OP:  # given scales and dequantize: kvq's own scales and codes of the same kind of input
        q, scale = kvq_torch.quantize(x, granularity, group)
        if op.startswith("dequantize"):
            return lambda: kvq_torch.dequantize(q, scale, granularity, group, tdt)
        return lambda: kvq_torch.quantize_with_scales(x, scale, granularity, group)
    return lambda: kvq_torch.quantize(x, granularity, group)


def time_kvq_ops(torch, rows, save, deadline):
    """kvq through kvq_torch's ops, timed by the same GraphTimer as torch: row['kvq_ops_us'] and
    row['kvq_ops_hot_us']."""
    import kvq_torch
    timer = GraphTimer(torch)
    for row in rows:
        if time.time() > deadline:
            break
        try:
            tdt = torch_dtype(torch, row["dtype"])
            fn = kvq_call(torch, kvq_torch, row, make_args(torch, make_ops(torch), row, tdt), tdt)
            if fn is None:
                continue
            calls = row.get("calls_per_replay") or calls_per_replay(row["elements"] * (ELEMENT_BYTES[row["dtype"]] + 1))
            row["kvq_ops_us"], row["kvq_ops_hot_us"] = timer.time(fn, calls, replays_for(row["elements"]))
            print(f"  kvq_torch {row['dtype']:8s} {shape_name(row):24s} {row['op']:20s} {row['kvq_ops_us']:10.2f} us cold "
                  f"{row['kvq_ops_hot_us']:10.2f} us hot", flush=True)
        except Exception as e:
            row["kvq_ops_error"] = f"{type(e).__name__}: {e}"
            print(f"  kvq_torch {row['dtype']} {shape_name(row)} {row['op']}: FAILED {row['kvq_ops_error']}", flush=True)
        torch.cuda.empty_cache()
        save()


# --- compiling ahead in parallel ----------------------------------------------------------------

def precompile_worker(rows, compile_mode):
    """Compiles each row's op for its shape once, filling inductor's on-disk caches, so that the
    timing process's own compiles hit them instead of compiling serially."""
    import torch
    configure_dynamo(torch)
    ops = make_ops(torch)
    compiled = {}
    for r in rows:
        try:
            tdt = torch_dtype(torch, r["dtype"])
            args = make_args(torch, ops, r, tdt)
            if r["op"] not in compiled:
                compiled[r["op"]] = torch.compile(ops[r["op"]], dynamic=False, mode=compile_mode)
            compiled[r["op"]](*args)
            del args
        except Exception as e:  # the timing process compiles (and reports) it again
            print(f"  precompile {r['kvq_case']}: {type(e).__name__}: {e}", flush=True)
    torch.cuda.synchronize()
    return len(rows)


def precompile(rows, jobs, compile_mode):
    t0 = time.time()
    # Each worker compiles on one thread (inductor would otherwise start a pool per process).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    ctx = multiprocessing.get_context("spawn")
    shares = [rows[i::jobs] for i in range(jobs)]
    try:
        with ctx.Pool(jobs) as pool:
            done = sum(pool.starmap(precompile_worker, [(share, compile_mode) for share in shares if share]))
        print(f"precompiled {done} graphs in {jobs} processes in {time.time() - t0:.0f} s", flush=True)
    except Exception as e:
        print(f"compare_torch.py: precompiling failed ({type(e).__name__}: {e}); compiling while timing", flush=True)
    finally:
        os.environ.pop("TORCHINDUCTOR_COMPILE_THREADS", None)


# --- kvq's side -------------------------------------------------------------------------------

def run_kvq(bench, names, out_json):
    # Google Benchmark names a case "<our name>/iterations:N/manual_time": match the prefix.
    pattern = "^(" + "|".join(names) + ")/"
    cmd = [bench, f"--benchmark_filter={pattern}", f"--benchmark_out={out_json}", "--benchmark_out_format=json"]
    print("running kvq_bench on the matching cases...", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:  # a failed case has no number; the others are still worth comparing
        print(f"compare_torch.py: kvq_bench exited with {rc}; its failed cases show as '-'", flush=True)
    return rc


def load_kvq(paths):
    """kvq_bench's context and its runs by case name, from one or more of its JSON files."""
    context, runs = {}, {}
    for path in paths:
        if not os.path.exists(path):  # kvq_bench found no GPU, or did not get far enough to write
            print(f"compare_torch.py: no kvq results in {path}", flush=True)
            continue
        with open(path) as f:
            data = json.load(f)
        context = context or data.get("context", {})
        # the case's name, without Google Benchmark's /iterations:N/manual_time
        runs.update({b["name"].split("/iterations:")[0]: b for b in data.get("benchmarks", [])
                     if b.get("run_type", "iteration") == "iteration"})
    return context, runs


# --- output -----------------------------------------------------------------------------------

def fmt_time(us):
    if us is None:
        return "-"
    return f"{us:.2f} us" if us < 100 else f"{us:.1f} us" if us < 1000 else f"{us / 1000:.3f} ms"


def pct_copy(row, key, copy):
    us = row.get(key)
    if us is None or not row.get("bytes") or not copy:
        return "-"
    return f"{100 * row['bytes'] / (us * 1e-6) / 1e9 / copy:.0f}%"


def ratio(num, den):
    return f"{num / den:.2f}x" if num and den else "-"


def engine_markdown(rows, copy):
    lines = ["### Engine shapes: kvq vs torch.compile", "",
             "Per call inside CUDA graphs, both sides timed alike; cold = L2 flushed before each replay, hot = "
             "replays back to back. Speedup = torch time / kvq time (> 1: kvq is faster); % = the bytes "
             "the op must move (MB: its input read and its output written, as kvq_bench counts them, "
             "whatever either side moves besides) at the cold time, of the device-to-device copy rate.", "",
             "| dtype | shape | op | MB | kvq cold | torch.compile cold | kvq % copy | torch % copy | speedup cold | "
             "kvq hot | torch.compile hot | speedup hot | kvq op in torch cold / hot |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["layout"] == "matrix":
            continue
        mb = f"{r['bytes'] / 1e6:.3g}" if r.get("bytes") else "-"
        lines.append(
            f"| {r['dtype']} | {shape_name(r)} | {OPS[r['op']][1]} | {mb} | {fmt_time(r.get('kvq_us'))} | "
            f"{fmt_time(r.get('compile_us'))} | {pct_copy(r, 'kvq_us', copy)} | {pct_copy(r, 'compile_us', copy)} | "
            f"{ratio(r.get('compile_us'), r.get('kvq_us'))} | {fmt_time(r.get('kvq_hot_us'))} | "
            f"{fmt_time(r.get('compile_hot_us'))} | {ratio(r.get('compile_hot_us'), r.get('kvq_hot_us'))} | "
            f"{fmt_time(r.get('kvq_ops_us'))} / {fmt_time(r.get('kvq_ops_hot_us'))} |")
    return lines


def paper_markdown(rows, copy):
    lines = ["### The paper's shapes: kvq vs eager PyTorch and torch.compile (cold)", "",
             "| dtype | T x D | op | kvq (auto) | kvq % copy | torch eager | torch.compile | torch % copy | "
             "kvq vs compile | kvq vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["layout"] != "matrix":
            continue
        extra = ""
        if r["op"] == "per_channel" and r.get("kvq_us") and r.get("bytes"):  # whole-sequence: two reads of x
            moved = r["bytes"] + r["elements"] * ELEMENT_BYTES[r["dtype"]]
            extra = f" (2 reads: {100 * moved / (r['kvq_us'] * 1e-6) / 1e9 / copy:.0f}%)" if copy else ""
        lines.append(
            f"| {r['dtype']} | {r['tokens']} x {r['channels']} | {OPS[r['op']][1]} | {fmt_time(r.get('kvq_us'))} | "
            f"{pct_copy(r, 'kvq_us', copy)}{extra} | {fmt_time(r.get('eager_us'))} | {fmt_time(r.get('compile_us'))} | "
            f"{pct_copy(r, 'compile_us', copy)} | {ratio(r.get('compile_us'), r.get('kvq_us'))} | "
            f"{ratio(r.get('eager_us'), r.get('kvq_us'))} |")
    return lines


def markdown(rows, copy, header, floor):
    lines = [header, "", floor, ""] + engine_markdown(rows, copy) + [""] + paper_markdown(rows, copy)
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "PyTorch failed on: " + "; ".join(
            f"{r['dtype']} {shape_name(r)} {r['op']} ({r['error']})" for r in failed)]
    mism = [r for r in rows if r.get("compile_mismatches")]
    if mism:
        lines += ["", "torch.compile's output differed from eager's in: " + ", ".join(
            f"{r['dtype']} {shape_name(r)} {r['op']} ({r['compile_mismatches']} elements)" for r in mism)]
    missing = [r for r in rows if r.get("kvq_us") is None]
    if missing:
        lines += ["", f"No kvq number for {len(missing)} rows, e.g. {missing[0]['kvq_case']}"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--kvq-bench", help="path of kvq_bench: run it here on the matching cases")
    src.add_argument("--kvq-json", nargs="+", help="JSON files kvq_bench wrote (--benchmark_out) in this run")
    ap.add_argument("--out-json", default="torch.json")
    ap.add_argument("--out-md", default="compare.md")
    ap.add_argument("--quick", action="store_true", help="skip the fp32 sweep over the paper's shapes")
    ap.add_argument("--only", choices=("all", "engine", "paper", "paged", "decode"), default="all",
                    help="the engines' shapes, the paper's, both (default), or the paged append or decode attention rows alone")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: PyTorch's default)")
    ap.add_argument("--jobs", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                    help="processes that compile ahead in parallel (1: compile while timing)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="stop timing rows after this many seconds")
    ap.add_argument("--match", default=None, help="only the rows whose kvq case name matches this regular expression")
    ap.add_argument("--kvq-ops", action="store_true",
                    help="also time kvq through its torch ops (examples/torch, importable as kvq_torch) in this process")
    args = ap.parse_args()
    deadline = time.time() + args.deadline_s

    def wanted(r):
        if args.only in ("paged", "decode"):
            return r["layout"] == args.only
        return args.only == "all" or (r["layout"] == "matrix") == (args.only == "paper")

    rows = [r for r in cases(args.quick) if wanted(r) and (args.match is None or re.search(args.match, r["kvq_case"]))]

    # kvq first, while nothing else holds GPU memory.
    kvq_json, kvq_rc = args.kvq_json, 0
    if args.kvq_bench:
        kvq_json = [os.path.join(tempfile.mkdtemp(prefix="kvq_compare_"), "kvq.json")]
        kvq_rc = run_kvq(args.kvq_bench, sorted({r["kvq_case"] for r in rows}), kvq_json[0])
    context, runs = load_kvq(kvq_json)
    copy = float(context.get("copy_GBps", 0) or 0)
    for r in rows:
        run = runs.get(r["kvq_case"])
        if run and "median_us" in run:
            r["kvq_us"] = run["median_us"]
            r["kvq_hot_us"] = run.get("hot_us")
            r["bytes"] = run["bytes"]
            r["calls_per_replay"] = int(run.get("calls_per_replay", 0)) or None

    try:  # after kvq_bench: torch would otherwise keep GPU memory for its caching allocator
        import torch
    except ImportError as e:
        print(f"compare_torch.py: PyTorch is not importable ({e}); nothing to compare.")
        return 1
    if not torch.cuda.is_available():
        print("compare_torch.py: no usable CUDA GPU for PyTorch; nothing to compare.")
        return 0
    configure_dynamo(torch)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    gpu = context.get("gpu") or torch.cuda.get_device_name()
    header = (f"## kvq vs PyTorch on {gpu} (copy {copy:.0f} GB/s; torch {torch.__version__}, "
              f"triton {triton_version}, torch.compile mode {args.compile_mode or 'default'})")
    floor = (f"kvq_bench's floor (an empty kernel timed the same way): {context.get('floor_us', '?')} us cold, "
             f"{context.get('floor_hot_us', '?')} us hot per call.")

    def save():
        with open(args.out_md, "w") as f:
            f.write(markdown(rows, copy, header, floor))
        result = {"gpu": gpu, "copy_GBps": copy, "torch": torch.__version__, "triton": triton_version,
                  "compile_mode": args.compile_mode or "default",
                  "method": "CUDA graphs of calls_per_replay back-to-back calls, replays timed with events; "
                            "cold: 256 MB read before each replay; hot: replays back to back (a GPU spin covers "
                            "the launch); medians per call",
                  "kvq_context": context, "rows": rows}
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=1)

    if args.jobs > 1:
        print(f"compiling {len(rows)} graphs ahead in {args.jobs} processes...", flush=True)
        precompile(rows, args.jobs, args.compile_mode)
    print("timing PyTorch (torch.compile; eager for the paper's rows)...", flush=True)
    time_torch(torch, rows, args.compile_mode, save, deadline)
    if args.kvq_ops:
        print("timing kvq through its torch ops (kvq_torch), the same way...", flush=True)
        time_kvq_ops(torch, rows, save, deadline)
    print()
    print(markdown(rows, copy, header, floor))
    print(f"wrote {args.out_md} and {args.out_json}")
    return 1 if kvq_rc != 0 or any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
